"""ChatServing without an engine: construction, options, tool choice, forced-call schemas, secrets."""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_energy import ChatServing, EngineConfig
from langchain_energy._tools import ForcedCall, normalize_tool_choice, tool_specs
from langchain_energy.errors import ConfigError, UnsupportedError

URL = "http://127.0.0.1:9/v1"  # nothing listens: a call would fail, construction must not touch it


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


class Add(BaseModel):
    """Add two integers."""

    a: int = Field(description="first")
    b: int = Field(description="second")


def test_construction_starts_nothing_and_validates():
    chat = ChatServing(max_tokens=8)
    assert chat.server is None and chat._backend is None
    with pytest.raises(ConfigError, match="base_url"):
        ChatServing(backend="openai")
    with pytest.raises(ConfigError, match="'parrot' needs base_url"):
        ChatServing(backend="parrot")
    with pytest.raises(ConfigError, match="max_tokens"):
        ChatServing(max_tokens=0)
    with pytest.raises(ConfigError, match="engine knobs"):
        ChatServing(backend="openai", base_url=URL, engine=EngineConfig())


def test_parrot_takes_one_prompt_and_refuses_what_needs_schema_decoding():
    chat = ChatServing(backend="parrot", base_url=URL, model="m")
    assert chat._get_ls_params()["ls_provider"] == "parrot"
    call, forced = chat._request([HumanMessage("Name a colour.")], None, {"max_tokens": 4})
    assert call["prompt"] == "Name a colour." and call["params"].max_tokens == 4 and forced is None
    blocks = HumanMessage(content=[{"type": "text", "text": "Name "}, {"type": "text", "text": "a colour."}])
    assert chat._request([blocks], None, {})[0]["prompt"] == "Name a colour."
    with pytest.raises(ConfigError, match=r"one user message, not a conversation \(system, human\)"):
        chat._request([SystemMessage("Be brief."), HumanMessage("Hi")], None, {})
    with pytest.raises(ConfigError, match="text only"):
        chat._request([HumanMessage(content=[{"type": "image", "url": "http://x/a.png"}])], None, {})
    with pytest.raises(UnsupportedError, match="Parrot decodes no JSON schema"):
        chat.bind_tools([get_weather], tool_choice="any")   # also a NotImplementedError, as LangChain expects
    with pytest.raises(ConfigError, match="Parrot decodes no JSON schema"):
        chat.with_structured_output(Add)
    with pytest.raises(ConfigError, match="Parrot decodes no JSON schema"):
        chat._request([HumanMessage("Hi")], None, {"response_format": {"type": "json_object"}})
    assert chat.bind_tools([get_weather], tool_choice="none") is not None   # nothing to decode


def test_openai_style_names_are_accepted():
    chat = ChatServing(backend="openai", base_url=URL, model_name="m", timeout=60, max_retries=1, streaming=True)
    assert chat.model == "m" and chat.request_timeout_s == 60 and chat.max_retries == 1
    params = chat._get_ls_params(stop=["x"])
    assert params["ls_provider"] == "vllm" and params["ls_model_name"] == "m" and params["ls_stop"] == ["x"]
    assert chat._get_ls_params(model="other")["ls_model_name"] == "other"


def test_api_key_comes_from_the_environment_and_is_never_shown(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    chat = ChatServing(backend="openai", base_url=URL)
    assert chat.api_key.get_secret_value() == "sk-secret-123"
    assert "sk-secret-123" not in repr(chat) and "sk-secret-123" not in str(chat.model_dump())
    explicit = ChatServing(backend="openai", base_url=URL, api_key="other")
    assert explicit.api_key.get_secret_value() == "other"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert ChatServing(backend="openai", base_url=URL).api_key is None


def test_tool_choice_spellings():
    names = ["a", "b"]
    assert normalize_tool_choice(None, names) == ("auto", ("a", "b"))
    assert normalize_tool_choice("none", names) == ("none", ())
    for forced in ("any", "required", True, {"type": "any"}):
        assert normalize_tool_choice(forced, names) == ("forced", ("a", "b"))
    assert normalize_tool_choice("b", names) == ("forced", ("b",))
    assert normalize_tool_choice({"type": "tool", "name": "a"}, names) == ("forced", ("a",))
    with pytest.raises(ConfigError, match="not bound"):
        normalize_tool_choice("c", names)
    with pytest.raises(ConfigError, match="at least one tool"):
        normalize_tool_choice("any", [])


def test_auto_without_a_parser_is_a_clear_error_at_bind_time():
    with pytest.raises(ConfigError, match="tool-call parser"):
        ChatServing().bind_tools([get_weather])
    with pytest.raises(ConfigError, match="tool-call parser"):
        ChatServing(backend="openai", base_url=URL, auto_tool_choice=False).bind_tools([get_weather],
                                                                                      tool_choice="auto")
    # A forced choice needs no parser; a parser configured on the engine allows "auto".
    assert ChatServing().bind_tools([get_weather], tool_choice="any") is not None
    assert ChatServing(engine=EngineConfig(tool_call_parser="hermes")).bind_tools([get_weather]) is not None
    assert "--tool-call-parser" in EngineConfig(tool_call_parser="hermes").server_args(
        __import__("langchain_energy.models", fromlist=["resolve_model"]).resolve_model("smollm2-135m"), False)


def test_a_bad_tool_is_a_clear_error():
    with pytest.raises(ConfigError):
        tool_specs([object()])
    assert len(tool_specs([Add, Add.model_json_schema()])) == 1  # one tool, given twice


def test_forced_call_schema_one_tool_is_the_tools_own_closed_schema():
    call = ForcedCall(tuple(tool_specs([Add])))
    schema = call.schema()
    assert schema["properties"].keys() == {"a", "b"} and schema["additionalProperties"] is False
    fmt = call.response_format()
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Add"
    calls, invalid = call.parse('{"a": 1, "b": 2}')
    assert not invalid and calls[0]["name"] == "Add" and calls[0]["args"] == {"a": 1, "b": 2}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "tool_call"
    assert "Add" in call.instruction()


def test_forced_call_schema_several_tools_names_the_tool():
    call = ForcedCall(tuple(tool_specs([Add, get_weather])))
    branches = call.schema()["anyOf"]
    assert [b["properties"]["name"]["enum"] for b in branches] == [["Add"], ["get_weather"]]
    calls, _ = call.parse(json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}}))
    assert calls[0]["name"] == "get_weather" and calls[0]["args"] == {"city": "Oslo"}


def test_truncated_arguments_are_an_invalid_call_not_a_guess():
    calls, invalid = ForcedCall(tuple(tool_specs([Add]))).parse('{"a": 1, "b"')
    assert not calls and invalid[0]["name"] == "Add" and "max_tokens" in invalid[0]["error"]


def test_a_forced_request_decodes_against_the_schema_and_tells_the_model():
    chat = ChatServing(backend="openai", base_url=URL)
    call, forced = chat._request([SystemMessage("Be brief."), HumanMessage("1+2?")], None,
                                 {"tools": tool_specs([Add]), "tool_choice": "any", "max_tokens": 20})
    assert forced is not None and forced.names == ("Add",)
    extra = call["request"]["extra"]
    assert extra["response_format"]["json_schema"]["schema"]["properties"].keys() == {"a", "b"}
    assert "tools" not in extra  # the server's parser is not involved
    system = call["request"]["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("Be brief.") and "Add" in system["content"]
    assert call["params"].max_tokens == 20


def test_unknown_call_options_are_refused():
    chat = ChatServing(backend="openai", base_url=URL)
    with pytest.raises(ConfigError, match="frobnicate"):
        chat._request([HumanMessage("hi")], None, {"frobnicate": 1})
    # OpenAI-style options that change nothing here are accepted.
    chat._request([HumanMessage("hi")], None, {"stream_usage": True, "parallel_tool_calls": False})


def test_structured_output_methods_bind_the_right_request():
    chat = ChatServing(backend="openai", base_url=URL)
    for method in ("json_schema", "function_calling", "json_mode"):
        assert chat.with_structured_output(Add, method=method) is not None
        assert chat.with_structured_output(Add, method=method, include_raw=True) is not None
    with pytest.raises(ConfigError, match="method"):
        chat.with_structured_output(Add, method="xml")


def test_tokens_are_counted_with_the_served_models_tokenizer():
    chat = ChatServing()
    assert chat.get_num_tokens("Hello world") == 2
    assert chat.get_num_tokens_from_messages([HumanMessage("Hello world")]) > 2


def test_every_sampling_knob_reaches_the_chat_model():
    from chains.harness.knobs import KNOBS
    from langchain_energy.chat_models import ChatServing

    sampling = [k for k in KNOBS.values() if k.target == "sampling"]
    assert sampling and all(k.to in ChatServing.model_fields for k in sampling)
