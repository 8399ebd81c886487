"""ChatServing against the real embedded vLLM engine (the session's one engine)."""

from __future__ import annotations

import asyncio
import json

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import Annotated, TypedDict

from langchain_energy import ChatServing, EnergyCallbackHandler
from langchain_energy.errors import ConfigError
from langchain_energy.models import load_tokenizer

pytestmark = pytest.mark.engine

LONG_PREFIX = "Wind turbines turn the kinetic energy of moving air into electricity through a generator. " * 50


class Reading(BaseModel):
    """A meter reading."""

    meter: str = Field(description="the meter's name")
    kwh: int = Field(description="energy in kilowatt-hours", ge=0, le=100000)
    estimated: bool = Field(description="whether the reading is estimated")


class ReadingDict(TypedDict):
    meter: Annotated[str, ..., "the meter's name"]
    kwh: Annotated[int, ..., "energy in kilowatt-hours"]


@tool
def set_thermostat(room: str, celsius: int, eco: bool) -> str:
    """Set a room's thermostat to a temperature, optionally in eco mode."""
    return f"{room} set to {celsius}"


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


@pytest.fixture(scope="module")
def chat(vllm_server):
    return ChatServing.from_server(vllm_server, max_tokens=64, temperature=0, seed=0)


def test_invoke_carries_usage_timings_and_server_token_counts(chat, vllm_server):
    msg = chat.invoke([HumanMessage("Name one renewable energy source.")])
    assert isinstance(msg, AIMessage) and msg.content.strip()
    usage = msg.usage_metadata
    tokenizer = load_tokenizer(vllm_server.spec.path)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": "Name one renewable energy source."}],
                                              add_generation_prompt=True, tokenize=False)
    assert usage["input_tokens"] == len(tokenizer.encode(templated, add_special_tokens=False))
    assert usage["input_tokens"] == chat.get_num_tokens_from_messages([HumanMessage(
        "Name one renewable energy source.")])
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > usage["input_tokens"]
    assert "cache_read" in usage["input_token_details"]
    meta = msg.response_metadata
    assert meta["model_name"] == vllm_server.served_model_name and meta["finish_reason"] in ("stop", "length")
    assert 0 < meta["ttft_s"] <= meta["latency_s"]


def test_cached_prompt_tokens_are_reported_as_cache_reads(chat, vllm_server):
    vllm_server.reset_prefix_cache()
    chat.invoke(LONG_PREFIX + "Summarize in one line.")
    before = vllm_server.metrics()
    msg = chat.invoke(LONG_PREFIX + "What turns the generator?")
    delta = vllm_server.metrics() - before
    cached = msg.usage_metadata["input_token_details"]["cache_read"]
    assert cached > 500 and cached == delta.prefix_cache_hits


def test_streaming_puts_usage_once_on_the_last_chunk(chat):
    chunks = list(chat.stream("Count from one to five.", max_tokens=16))
    assert [c.chunk_position for c in chunks].count("last") == 1 and chunks[-1].chunk_position == "last"
    assert sum(1 for c in chunks if c.usage_metadata) == 1
    full = sum(chunks[1:], chunks[0])
    assert full.content and full.usage_metadata["output_tokens"] <= 16
    assert full.response_metadata["ttft_s"] <= full.response_metadata["latency_s"]
    quiet = list(chat.model_copy(update={"stream_usage": False}).stream("Hi", max_tokens=4))
    assert not any(c.usage_metadata for c in quiet)


def test_async_calls_reach_the_engine_together(chat, vllm_server):
    before = vllm_server.metrics()

    async def eight():
        return await chat.abatch([f"Write a sentence about the number {i}." for i in range(8)],
                                 max_tokens=32, ignore_eos=True)

    answers = asyncio.run(eight())
    delta = vllm_server.metrics() - before
    assert all(a.usage_metadata["output_tokens"] == 32 for a in answers)
    assert 0 < delta.engine_steps < delta.generation_tokens / 2


def test_a_forced_tool_call_always_matches_the_tools_schema(chat):
    # Sampled at the study's temperature, not greedy: whatever the 135M model draws, the engine decodes it
    # against the schema (seeded, so the test is repeatable).
    forced = chat.bind_tools([set_thermostat], tool_choice="set_thermostat")
    rooms = ("kitchen", "attic", "bathroom", "garage")
    messages = [forced.invoke(f"Make the {room} warmer, please.", temperature=0.7, seed=i, max_tokens=200)
                for i, room in enumerate(rooms)]
    for msg in messages:
        assert msg.response_metadata["finish_reason"] != "length"
        assert msg.invalid_tool_calls == [] and len(msg.tool_calls) == 1
        call = msg.tool_calls[0]
        assert call["name"] == "set_thermostat" and call["id"]
        set_thermostat.args_schema.model_validate(call["args"])  # raises if the arguments do not match
        assert set(call["args"]) == {"room", "celsius", "eco"}
        assert msg.response_metadata["finish_reason"] == "tool_calls"


def test_any_picks_one_of_several_tools_and_streams_the_same_call(chat):
    bound = chat.bind_tools([set_thermostat, get_weather], tool_choice="any")
    msg = bound.invoke("What is the weather in Oslo?")
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] in ("set_thermostat", "get_weather")
    full = None
    for chunk in bound.stream("What is the weather in Oslo?"):
        full = chunk if full is None else full + chunk
    assert full.tool_calls[0]["name"] == msg.tool_calls[0]["name"]
    assert full.tool_calls[0]["args"] == msg.tool_calls[0]["args"]


def test_a_tool_round_trip_goes_back_to_the_model(chat):
    bound = chat.bind_tools([get_weather], tool_choice="get_weather")
    first = bound.invoke("What is the weather in Oslo?")
    result = get_weather.invoke(first.tool_calls[0])
    answer = chat.invoke([HumanMessage("What is the weather in Oslo?"), first, result])
    assert isinstance(answer, AIMessage) and answer.content


def test_auto_goes_through_the_servers_parser_and_is_a_clear_error_without_one(chat, vllm_server):
    # The session's engine runs the hermes parser: "auto" is served (the 135M model may answer in prose).
    assert vllm_server.config.auto_tool_choice
    answer = chat.bind_tools([get_weather]).invoke("Weather in Oslo?")
    assert isinstance(answer, AIMessage)
    # A model that knows its server has no parser refuses at bind time, before any request.
    without = ChatServing(backend="openai", base_url=vllm_server.base_url, model=vllm_server.served_model_name,
                          auto_tool_choice=False)
    with pytest.raises(ConfigError, match="tool-call parser"):
        without.bind_tools([get_weather])


@pytest.mark.parametrize("schema", [Reading, ReadingDict, Reading.model_json_schema()],
                         ids=["pydantic", "typeddict", "json_schema"])
def test_structured_output_always_parses(chat, schema):
    structured = chat.with_structured_output(schema)
    out = structured.invoke("The garage meter read 1234 kWh, measured on site.", temperature=0.7, seed=1,
                            max_tokens=200)
    if schema is Reading:
        assert isinstance(out, Reading)
    else:
        assert isinstance(out, dict) and {"meter", "kwh"} <= set(out)
        assert isinstance(out["kwh"], int)
    raw = chat.with_structured_output(schema, include_raw=True).invoke("The attic meter read 7 kWh.")
    assert raw["parsing_error"] is None and raw["parsed"] is not None and isinstance(raw["raw"], AIMessage)
    by_tool = chat.with_structured_output(schema, method="function_calling").invoke("The attic meter read 7 kWh.")
    assert by_tool is not None


def test_an_answer_cut_at_max_tokens_is_a_parsing_error_not_a_repaired_object(chat):
    with pytest.raises(OutputParserException, match="max_tokens"):
        chat.with_structured_output(Reading.model_json_schema()).invoke("The garage meter read 1234 kWh.",
                                                                         max_tokens=3)
    msg = chat.bind_tools([set_thermostat], tool_choice="any").invoke("Warm the hall.", max_tokens=3)
    assert not msg.tool_calls and "max_tokens" in msg.invalid_tool_calls[0]["error"]


def test_a_schema_the_engine_cannot_decode_is_a_clear_error(chat):
    bad = {"title": "Bad", "type": "object", "properties": {"x": {"type": "no-such-type"}}}
    with pytest.raises(ConfigError, match="cannot decode the JSON schema of schema 'Bad'"):
        chat.with_structured_output(bad).invoke("hi")
    with pytest.raises(ConfigError, match="cannot decode the JSON schema of tool 'Bad'"):
        chat.bind_tools([{**bad, "description": "a tool"}], tool_choice="any").invoke("hi")


def test_the_energy_handler_puts_joules_on_the_message(chat):
    with EnergyCallbackHandler() as energy:
        msg = chat.invoke("Name a renewable energy source.", config={"callbacks": [energy]})
        forced = chat.bind_tools([get_weather], tool_choice="any").invoke("Weather in Oslo?",
                                                                         config={"callbacks": [energy]})
    for m in (msg, forced):
        joules = m.response_metadata["energy"]
        assert joules["energy_j"] > 0 and joules["final"] and set(joules["provenance"]) >= {"cpu", "gpu", "dram"}
    runs = energy.to_dataframe()
    calls = runs[runs["kind"] == "chat_model"]
    assert len(calls) == 2 and (calls["prompt_tokens"] > 0).all() and calls["ttft_s"].notna().all()


def test_json_text_of_a_forced_call_is_what_the_engine_decoded(chat):
    msg = chat.bind_tools([set_thermostat], tool_choice="any").invoke("Set the hall to 21 degrees in eco mode.")
    assert json.loads(json.dumps(msg.tool_calls[0]["args"])) == msg.tool_calls[0]["args"]
