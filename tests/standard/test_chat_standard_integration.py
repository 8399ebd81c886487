"""LangChain's standard integration tests for `ChatServing`, on the session's embedded vLLM engine.

Flags say what the class does on this engine: forced tool calls (``tool_choice="any"``/a name, decoded against the
tool's schema), structured output (JSON-schema decoding), JSON mode, usage metadata with cache reads on invoke and
stream, and ``tool_choice="auto"`` through the server's hermes tool-call parser, which the session's engine runs.
The agent loop is an expected failure: the 135M model answers its question in prose instead of calling the tool.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_energy import ChatServing

pytestmark = pytest.mark.engine

#: The session's engine runs the hermes tool-call parser, so "auto" tool choice is served; the 135M model
#: still answers the agent loop's question in prose instead of calling the tool.
_MODEL_ANSWERS_IN_PROSE = pytest.mark.xfail(
    reason="under tool_choice='auto' the 135M model answers in prose instead of calling the tool (a model limit: "
           "forced choices, decoded against the tool's schema, always call it)", strict=True)

_CACHED_PREFIX = "Heat pumps move heat from a cold place to a warm one using a refrigerant cycle. " * 40


class TestChatServingIntegration(ChatModelIntegrationTests):
    """Standard integration tests against the real embedded engine (one per test session)."""

    _server: Any = None

    @pytest.fixture(autouse=True)
    def _engine(self, vllm_server: Any) -> None:
        type(self)._server = vllm_server

    @property
    def chat_model_class(self) -> type[ChatServing]:
        return ChatServing

    @property
    def chat_model_params(self) -> dict[str, Any]:
        server = self._server
        return {"backend": "openai", "base_url": server.base_url, "model": server.served_model_name,
                "auto_tool_choice": server.config.auto_tool_choice, "temperature": 0, "seed": 0,
                "max_tokens": 100}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        model = self.chat_model_class(**self.chat_model_params)
        prompt = _CACHED_PREFIX + "In one line: what moves the heat?"
        model.invoke(prompt)  # fills the prefix cache
        if not stream:
            return model.invoke(prompt)
        full = None
        for chunk in model.stream(prompt):
            full = chunk if full is None else full + chunk
        return full

    @pytest.mark.xfail(reason="JSON mode only asks for some JSON object: told to use the keys setup and punchline, the "
                              "135M model nests 'setup' objects instead (a limit of the model; json_schema decoding, "
                              "the default of with_structured_output, passes)", strict=False)
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(reason="at temperature 0 the 135M model repeats itself inside the 'setup' string until "
                              "max_tokens on two of this test's prompts; ChatServing refuses an answer cut at "
                              "max_tokens (OutputParserException) instead of repairing it into a made-up object",
                       strict=False)
    def test_structured_output_optional_param(self, model: BaseChatModel) -> None:
        super().test_structured_output_optional_param(model)

    # -- "auto" tool choice: needs the server's tool-call parser, which the session's engine does not run --------
    @_MODEL_ANSWERS_IN_PROSE
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)
