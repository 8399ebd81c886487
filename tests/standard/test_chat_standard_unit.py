"""LangChain's standard unit tests for `ChatServing` (no engine: construction is lazy)."""

from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_energy import ChatServing


class TestChatServingUnit(ChatModelUnitTests):
    """Standard unit tests; the capability flags are langchain-tests' defaults read from the class."""

    @property
    def chat_model_class(self) -> type[ChatServing]:
        return ChatServing

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # The managed backend: nothing starts until the first call, which these tests never make.
        return {"model": "smollm2-135m"}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return ({"OPENAI_API_KEY": "sk-from-env"},
                {"backend": "openai", "base_url": "http://127.0.0.1:9/v1"},
                {"api_key": "sk-from-env"})
