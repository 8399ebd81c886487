"""`ServingLLM`: a LangChain LLM served by vLLM (managed or by URL) or by Parrot."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.utils import secret_from_env
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

from langchain_energy._auth import key_to_send
from langchain_energy._loop import iterate_sync, run_sync
from langchain_energy.meters.served import serve_on_gpus
from langchain_energy.backends.base import Backend, Completion, SamplingParams
from langchain_energy.backends.openai_compat import OpenAICompatBackend
from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer, shared_server
from langchain_energy.errors import ConfigError, EnergyError
from langchain_energy.models import DEFAULT_MODEL, load_tokenizer, resolve_model
from langchain_energy.scheduling import WorkflowScheduler

_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "ignore_eos", "seed", "priority")


class ServingLLM(BaseLLM):
    """A LangChain LLM whose backend is chosen by name.

    - ``vllm`` (default): a managed local vLLM server, started on first use (the embedded SmolLM2-135M unless
      ``model`` or ``engine`` says otherwise) and stopped at exit.
    - ``openai``: any running vLLM OpenAI-compatible server at ``base_url``.
    - ``parrot``: Parrot's ServeCore at ``base_url``; each call is one semantic call.

    Every call reports its prompt, completion and cached tokens, time to first token and latency in the
    generation's ``generation_info``, and their sums in ``llm_output["token_usage"]``. Concurrent
    ``ainvoke``/``abatch`` calls reach the engine together, where it batches them.

    Example:
        .. code-block:: python

            from langchain_energy import ServingLLM

            llm = ServingLLM(max_tokens=64)            # embedded engine, started on first call
            print(llm.invoke("Name three renewable energy sources."))
            remote = ServingLLM(backend="openai", base_url="http://127.0.0.1:8000/v1", model="smollm2-135m")
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    backend: Literal["vllm", "openai", "parrot"] = "vllm"
    """Which serving system answers: a managed vLLM server, a vLLM server by URL, or Parrot's ServeCore."""
    model: str = DEFAULT_MODEL
    """Registry name, model directory or hub name (for ``openai``/``parrot``: the served model name)."""
    base_url: str | None = None
    """URL of the server for ``openai`` (ending in /v1) and ``parrot``; unused for ``vllm``."""
    engine: EngineConfig | None = None
    """Engine knobs of the managed server (``vllm`` only); default: ``EngineConfig(model=model)``."""
    max_tokens: int = 256
    """Most tokens generated per call."""
    temperature: float = 0.7
    """Sampling temperature (the study's 0.7)."""
    top_p: float = 1.0
    """Nucleus sampling mass (the study's 1.0)."""
    ignore_eos: bool = False
    """Generate exactly ``max_tokens`` tokens (fixed output lengths for experiments)."""
    seed: int | None = None
    """Per-request sampling seed."""
    priority: int | None = None
    """Request priority for an engine started with ``scheduling_policy="priority"`` (lower runs first)."""
    stop: list[str] | None = None
    """Stop strings."""
    api: Literal["chat", "completions"] = "chat"
    """``chat`` applies the model's chat template to the prompt; ``completions`` sends it raw."""
    tokenizer: str | None = None
    """Tokenizer directory for counting tokens (default: the registry model's)."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("OPENAI_API_KEY", default=None))
    """Bearer token for URL servers (default: ``OPENAI_API_KEY``; the managed engine only if its flags ask for one)."""
    gpu_indices: list[int] | None = None
    """GPUs (this machine's indices) that a URL backend's server runs on: only their joules go to calls.
    The managed server knows its own; None for a URL backend leaves every metered GPU attributed."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    """Seconds to wait for a connection before calling the server unreachable."""
    request_timeout_s: float = Field(default=600.0, gt=0)
    """Seconds one request may take in all."""
    scheduler: WorkflowScheduler | None = None
    """A `WorkflowScheduler` (also in the runs' callbacks): each call waits at its gate, if any, and is sent
    with its priority (which replaces ``priority``, except under ``fcfs``). LangChain hands ``_generate`` the
    run of a batch's first prompt only, so every prompt of one ``generate``/``batch`` call of this LLM is
    scheduled as that first run (same priority and workflow; each still takes its own slot at the gate);
    batches of chains or graphs are unaffected: there each call is its own run."""

    _backend: Backend | None = PrivateAttr(default=None)
    _server: VLLMServer | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        self._sampling()  # validate sampling parameters up front, with our own error type
        if self.backend in ("openai", "parrot") and not self.base_url:
            raise ConfigError(f"backend {self.backend!r} needs base_url (the server's address)")
        if self.engine is not None and self.backend != "vllm":
            raise ConfigError("engine knobs apply to the managed vLLM server only (backend='vllm')")

    @classmethod
    def from_server(cls, server: VLLMServer, **kwargs: Any) -> ServingLLM:
        """An LLM talking to an already running `VLLMServer`."""
        return cls(backend="openai", base_url=server.base_url, model=server.served_model_name, **kwargs)

    # -- LangChain plumbing ----------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return f"serving-llm-{self.backend}"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, "base_url": self.base_url,
                **{key: getattr(self, key) for key in _SAMPLING_KEYS}}

    def _sampling(self, stop: list[str] | None = None, **overrides: Any) -> SamplingParams:
        values = {key: getattr(self, key) for key in _SAMPLING_KEYS}
        values.update({k: v for k, v in overrides.items() if k in _SAMPLING_KEYS})
        return SamplingParams(stop=tuple(stop or self.stop or ()), **values)

    def get_backend(self) -> Backend:
        """The backend, created (and for ``vllm`` the server started) on first use."""
        with self._lock:
            if self._backend is None:
                self._backend = self._make_backend()
                if self.gpu_indices is not None:
                    serve_on_gpus(self.gpu_indices)
            return self._backend

    async def _aget_backend(self) -> Backend:
        # Starting a managed server blocks for tens of seconds: keep it off the caller's event loop.
        return self._backend or await asyncio.to_thread(self.get_backend)

    @property
    def server(self) -> VLLMServer | None:
        """The managed server behind a ``vllm`` LLM once started (for /metrics and prefix-cache resets)."""
        return self._server

    def _make_backend(self) -> Backend:
        if self.backend == "parrot":
            try:
                from langchain_energy.backends.parrot import ParrotBackend
            except ImportError as exc:  # pragma: no cover - only in a broken install
                raise EnergyError(f"the Parrot backend is not available: {exc}") from exc
            return ParrotBackend(base_url=self.base_url, model=self.model, tokenizer=self._tokenizer_path(),
                                 request_timeout_s=self.request_timeout_s)
        health_check = None
        base_url = self.base_url
        model = self.model
        if self.backend == "vllm":
            self._server = shared_server(self.engine or EngineConfig(model=self.model))
            base_url, model, health_check = (
                self._server.base_url, self._server.served_model_name, self._server.check_alive)
        return OpenAICompatBackend(base_url, model, api=self.api, connect_timeout_s=self.connect_timeout_s,
                                   request_timeout_s=self.request_timeout_s, health_check=health_check,
                                   api_key=key_to_send(self.api_key, self.backend, self.engine))

    def _tokenizer_path(self) -> str:
        if self.tokenizer:
            return self.tokenizer
        model = self.engine.model if self.engine else self.model
        return resolve_model(model).path

    def get_num_tokens(self, text: str) -> int:
        """Tokens in `text` by the served model's tokenizer."""
        return len(load_tokenizer(self._tokenizer_path()).encode(text, add_special_tokens=False))

    # -- generation ------------------------------------------------------------------------------------
    @staticmethod
    def _result(completions: list[Completion], model: str) -> LLMResult:
        usage = {
            "prompt_tokens": sum(c.prompt_tokens for c in completions),
            "completion_tokens": sum(c.completion_tokens for c in completions),
            "cached_tokens": sum(c.cached_tokens or 0 for c in completions),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        generations = [[Generation(text=c.text, generation_info=c.generation_info())] for c in completions]
        return LLMResult(generations=generations, llm_output={"token_usage": usage, "model_name": model})

    async def _complete_all(self, prompts: list[str], params: SamplingParams, backend: Backend,
                            t_enter: float, engine_start_s: float, run_id: UUID | None = None) -> list[Completion]:
        async def one(prompt: str) -> Completion:
            if self.scheduler is None or run_id is None:
                sent_after = time.monotonic() - t_enter
                completion = await backend.acomplete(prompt, params)
            else:
                async with self.scheduler.admitted(run_id) as priority:
                    sent_after = time.monotonic() - t_enter   # after the gate: the wait there is not the call's
                    completion = await backend.acomplete(prompt, _with_priority(params, priority))
            # Each call's own edges, so a meter can end each prompt of a batch at its own end.
            completion.extra["sent_after_s"] = sent_after
            if engine_start_s > 0:
                completion.extra["engine_start_s"] = engine_start_s
            return completion

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    def _engine_start_s(self, t_enter: float, was_started: bool) -> float:
        # A managed engine started inside this call: reported so that its joules are never the call's.
        took = time.monotonic() - t_enter
        return took if not was_started and took >= _ENGINE_START_MIN_S else 0.0

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        t_enter = time.monotonic()
        params = self._sampling(stop, **kwargs)
        was_started = self._backend is not None
        backend = self.get_backend()
        engine_s = self._engine_start_s(t_enter, was_started)
        completions = run_sync(self._complete_all(prompts, params, backend, t_enter, engine_s, _run_id(run_manager)))
        return self._result(completions, backend.model_name)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        t_enter = time.monotonic()
        params = self._sampling(stop, **kwargs)
        was_started = self._backend is not None
        backend = await self._aget_backend()
        engine_s = self._engine_start_s(t_enter, was_started)
        completions = await self._complete_all(prompts, params, backend, t_enter, engine_s, _run_id(run_manager))
        return self._result(completions, backend.model_name)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        params = self._sampling(stop, **kwargs)
        for event in iterate_sync(self._scheduled_stream(self.get_backend(), prompt, params, _run_id(run_manager))):
            chunk = _chunk(event)
            if run_manager and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        params = self._sampling(stop, **kwargs)
        backend = await self._aget_backend()
        async for event in self._scheduled_stream(backend, prompt, params, _run_id(run_manager)):
            chunk = _chunk(event)
            if run_manager and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _scheduled_stream(self, backend: Backend, prompt: str, params: SamplingParams,
                                run_id: UUID | None) -> AsyncIterator[Any]:
        # The gate's slot is held from the first byte sent to the last event (or until the consumer stops).
        if self.scheduler is None or run_id is None:
            async for event in backend.astream(prompt, params):
                yield event
            return
        async with self.scheduler.admitted(run_id) as priority:
            async for event in backend.astream(prompt, _with_priority(params, priority)):
                yield event


#: Below this, getting the backend was a lookup, not an engine start.
_ENGINE_START_MIN_S = 0.5


def _run_id(run_manager: Any) -> UUID | None:
    return getattr(run_manager, "run_id", None)


def _with_priority(params: SamplingParams, priority: int | None) -> SamplingParams:
    return params if priority is None else dataclasses.replace(params, priority=priority)


def _chunk(event) -> GenerationChunk:
    if event.completion is not None:
        return GenerationChunk(text="", generation_info=event.completion.generation_info())
    return GenerationChunk(text=event.text)
