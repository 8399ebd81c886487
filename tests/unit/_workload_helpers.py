"""Shared pieces of the workload unit tests: a recording callback and the embedded tokenizer."""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler


class PromptRecorder(BaseCallbackHandler):
    """Keeps every LLM prompt, its tags and its parent run, as LangChain reports them."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def on_llm_start(self, serialized, prompts, *, run_id, parent_run_id=None, tags=None, metadata=None, **kw):
        with self._lock:
            self.calls.append({"prompt": prompts[0], "tags": list(tags or []), "metadata": dict(metadata or {}),
                               "invocation_params": kw.get("invocation_params", {})})

    def roles(self) -> list[str]:
        return [t.split(":", 1)[1] for c in self.calls for t in c["tags"] if t.startswith("role:")]


def words(text: str) -> int:
    """A whitespace token counter, for tests about chunking logic rather than a tokenizer."""
    return len(text.split())


@lru_cache(maxsize=1)
def embedded_counter():
    """The embedded model's tokenizer as a counter (converted once and cached by the model registry)."""
    from chains.workloads.summarize import hf_token_counter
    from langchain_energy.models import load_tokenizer, resolve_model

    return hf_token_counter(load_tokenizer(resolve_model("smollm2-135m").path))


from langchain_core.language_models.fake import FakeListLLM  # noqa: E402


class SlowFakeLLM(FakeListLLM):
    """Test double of a served model: a fake LLM whose async calls take ``sleep`` seconds.

    It counts the calls in flight, so tests read concurrency from ``peak_in_flight`` rather than from timings.
    """

    in_flight: int = 0
    peak_in_flight: int = 0

    async def _acall(self, prompt, stop=None, run_manager=None, **kwargs):
        import asyncio

        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.sleep or 0)
        finally:
            self.in_flight -= 1
        return await super()._acall(prompt, stop, run_manager, **kwargs)
