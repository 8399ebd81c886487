"""Small helpers the workloads share: where the LLM comes from, and one capped text call.

A workload accepts either a language model or a function ``config -> model``. The second form lets a
module-level graph (LangGraph Studio) build its model lazily, on the first call, from the run's
``configurable`` values instead of at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from langchain_core.language_models import BaseLanguageModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import Runnable, RunnableConfig

LLMSource = Union[BaseLanguageModel, Callable[[RunnableConfig], BaseLanguageModel]]


def resolve_llm(source: LLMSource, config: RunnableConfig | None = None) -> BaseLanguageModel:
    """The model itself, or the one the factory builds for this run's config."""
    if isinstance(source, BaseLanguageModel):
        return source
    return source(config or {})


async def acall(
    llm: BaseLanguageModel,
    prompt: str,
    *,
    max_tokens: int,
    role: str,
    config: RunnableConfig | None = None,
) -> str:
    """One LLM call capped at ``max_tokens``, tagged with its role; returns the text (chat or not).

    The cap travels as a per-call ``max_tokens`` keyword, which `ChatServing`, `ServingLLM` and the common
    chat models honour; models that do not know it (test fakes) ignore it. A chat model gets the prompt as
    one user message, which is what `ServingLLM`'s chat API sends too: the same tokens either way.
    """
    return await (_tagged(llm, max_tokens, role) | StrOutputParser()).ainvoke(prompt, config)


async def acall_message(
    model: Runnable,
    messages: list[BaseMessage],
    *,
    max_tokens: int,
    role: str,
    config: RunnableConfig | None = None,
) -> AIMessage:
    """One chat-model call (a model with tools bound, say), capped and tagged like `acall`; returns the message."""
    return await _tagged(model, max_tokens, role).ainvoke(messages, config)


def _tagged(model: Runnable, max_tokens: int, role: str) -> Runnable:
    return model.bind(max_tokens=max_tokens).with_config(tags=[f"role:{role}"], metadata={"role": role})


def positive_int(name: str, value: Any) -> int:
    """Validate a size knob (used by the workload builders)."""
    from langchain_energy.errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


async def ainvoke_many(runnable: Any, inputs: list[Any], config: RunnableConfig, limit: int) -> list[Any]:
    """Invoke ``runnable`` on every input, at most ``limit`` at a time, results in input order.

    A semaphore rather than the config's ``max_concurrency``: LangGraph hands that setting down to
    every nested graph, where it would also serialize the parallel branches inside each input.
    """
    import asyncio

    sem = asyncio.Semaphore(limit)
    child = {k: v for k, v in config.items() if k != "max_concurrency"}

    async def one(item: Any) -> Any:
        async with sem:
            return await runnable.ainvoke(item, child)

    return list(await asyncio.gather(*(one(i) for i in inputs)))
