"""The language model of the Studio graphs, built on first use rather than at import.

Resolution order, per run: the run's ``configurable`` values (``base_url``, ``model``, ``backend``),
then the environment (``LANGCHAIN_ENERGY_BASE_URL``, ``LANGCHAIN_ENERGY_MODEL``,
``LANGCHAIN_ENERGY_BACKEND``), then the managed embedded engine. Models are cached per setting, so
one engine serves every run.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from langchain_core.language_models import BaseLanguageModel
from langchain_core.runnables import RunnableConfig

_cache: dict[tuple, BaseLanguageModel] = {}
_lock = threading.Lock()


def _setting(configurable: dict[str, Any], key: str) -> str | None:
    return configurable.get(key) or os.environ.get(f"LANGCHAIN_ENERGY_{key.upper()}") or None


def studio_llm(config: RunnableConfig | None = None) -> BaseLanguageModel:
    """The chat model for this run's config (see the module docstring for the resolution order), on vLLM or
    Parrot, as ``python -m chains.run`` uses (the workloads are chat-style)."""
    from langchain_energy.chat_models import ChatServing

    configurable = dict((config or {}).get("configurable") or {})
    base_url = _setting(configurable, "base_url")
    model = _setting(configurable, "model") or "smollm2-135m"
    backend = _setting(configurable, "backend") or ("openai" if base_url else "vllm")
    key = (backend, base_url, model)
    with _lock:
        if key not in _cache:
            kwargs: dict[str, Any] = {"backend": backend, "model": model}
            if backend != "vllm":
                kwargs["base_url"] = base_url
            _cache[key] = ChatServing(**kwargs)
        return _cache[key]
