"""What every backend takes (sampling parameters) and gives back (a completion with its accounting)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, runtime_checkable

from langchain_energy.errors import ConfigError

TokenSource = Literal["server", "tokenizer"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of one request, validated on construction.

    Defaults follow the study: temperature 0.7, top_p 1.0.

    Example:
        >>> SamplingParams(max_tokens=64, ignore_eos=True).max_tokens
        64
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    seed: int | None = None
    priority: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.priority is not None and not isinstance(self.priority, int):
            raise ConfigError(f"priority must be an integer (lower runs first), got {self.priority!r}")

    def to_dict(self) -> dict:
        """Plain dict, for logging and metadata files."""
        return asdict(self)


@dataclass
class Completion:
    """One finished request and what it cost the server.

    Attributes:
        text: the generated text.
        prompt_tokens: tokens in the prompt.
        completion_tokens: tokens generated.
        cached_tokens: prompt tokens served from the prefix cache (None when the server does not say).
        ttft_s: seconds from sending the request to the first generated token (None when unknown).
        latency_s: seconds from sending the request to its last byte.
        finish_reason: "stop", "length", ... as the server reports it.
        token_source: "server" when counts come from the server's usage, "tokenizer" when we counted them.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None
    ttft_s: float | None = None
    latency_s: float = 0.0
    finish_reason: str | None = None
    token_source: TokenSource = "server"
    extra: dict = field(default_factory=dict)

    def generation_info(self) -> dict:
        """The per-call accounting as LangChain's `generation_info`."""
        info = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft_s": self.ttft_s,
            "latency_s": self.latency_s,
            "finish_reason": self.finish_reason,
            "token_source": self.token_source,
        }
        info.update(self.extra)
        return info


@dataclass
class StreamEvent:
    """A piece of a streamed completion: text deltas, then one last event carrying the `Completion`."""

    text: str = ""
    completion: Completion | None = None
    tool_calls: tuple[dict, ...] = ()
    """Tool-call deltas of a chat completion as the server streams them (``index``, ``id``, ``function``)."""


@runtime_checkable
class Backend(Protocol):
    """The contract `ServingLLM` relies on. Implementations are async-first and safe to call concurrently."""

    model_name: str

    async def acomplete(self, prompt: str, params: SamplingParams) -> Completion:
        """Generate one completion."""
        ...

    def astream(self, prompt: str, params: SamplingParams) -> AsyncIterator[StreamEvent]:
        """Stream text deltas; the last event carries the finished `Completion`."""
        ...

    async def aclose(self) -> None:
        """Release connections (and sessions, for Parrot)."""
        ...
