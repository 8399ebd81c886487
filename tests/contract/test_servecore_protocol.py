"""The ServeCore client against the ServeCore test double: exact JSON bodies, and every failure path.

No engine runs here: the double is given no engine, or an engine URL nobody listens on.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from langchain_energy.backends.base import SamplingParams
from langchain_energy.backends.parrot import (
    ParrotBackend,
    ParrotClient,
    SemanticVar,
    check_template,
    sampling_config,
)
from langchain_energy.backends.parrot_program import SemanticProgram
from langchain_energy.errors import BackendUnreachableError, ConfigError, ParrotError
from tests.doubles.servecore import ServeCoreDouble

PARAMS = SamplingParams(max_tokens=16, temperature=0.5, top_p=0.9)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Counter:
    """Whitespace token counter: these tests never reach an engine, so no tokenizer is loaded."""

    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return text.split()


@pytest.fixture
def core():
    with ServeCoreDouble(engine_url=None, engine_model="m") as double:
        yield double


async def test_session_variable_call_get_and_close_send_the_documented_bodies(core):
    async with ParrotClient(core.base_url) as client:
        session = await client.open_session()
        sid, auth = session.session_id, session.session_auth
        doc = await session.variable("doc", "the text")
        out = await session.submit("Summarize {{doc}} in {{n}} words: {{summary}}", inputs={"doc": doc, "n": "ten"},
                                   output="summary", params=PARAMS, func_name="sum", models=["m"])
        assert isinstance(out, SemanticVar) and out.name == "summary"
        assert await session.get(doc, "latency") == "the text"
        await session.close()
        assert session.closed

    auth_fields = {"session_id": sid, "session_auth": auth}
    bodies = core.requests
    assert bodies[0] == ("POST", "/v1/session", {"api_key": ""})
    assert bodies[1] == ("POST", "/v1/semantic_var", {**auth_fields, "var_name": "doc"})
    assert bodies[2] == ("POST", f"/v1/semantic_var/{doc.var_id}", {**auth_fields, "content": "the text"})
    assert bodies[3] == ("POST", "/v1/semantic_call", {
        **auth_fields,
        "func_name": "sum",
        "template": "Summarize {{doc}} in {{n}} words: {{summary}}",
        "parameters": [
            {"name": "doc", "is_output": False, "var_id": doc.var_id},
            {"name": "n", "is_output": False, "value": "ten"},
            {"name": "summary", "is_output": True, "sampling_config": {
                "temperature": 0.5, "top_p": 0.9, "max_gen_length": 16, "ignore_tokenizer_eos": False, "stop_str": None}},
        ],
        "models": ["m"],
        "model_type": "text",
        "remove_pure_fill": True,
        "cache_prefix": True,
        "output_criteria": None,
        "fuse_fill": False,
    })
    gets = [b for m, p, b in bodies if m == "GET" and p == f"/v1/semantic_var/{doc.var_id}"]
    assert gets == [{**auth_fields, "criteria": "latency"}]
    assert bodies[-1] == ("DELETE", f"/v1/session/{sid}", auth_fields)
    assert sid not in core.sessions


async def test_a_call_output_feeds_the_next_call_as_a_variable_id(core):
    async with ParrotClient(core.base_url) as client, await client.open_session() as session:
        first = await session.submit("A {{out}}", inputs={}, output="out", params=PARAMS)
        await session.submit("B {{prev}} {{out}}", inputs={"prev": first}, output="out", params=PARAMS)
    second_params = core.bodies("/v1/semantic_call")[1]["parameters"]
    assert second_params[0] == {"name": "prev", "is_output": False, "var_id": first.var_id}


async def test_unreachable_servecore_is_a_clear_error():
    backend = ParrotBackend(f"http://127.0.0.1:{_closed_port()}", "m", tokenizer=_Counter(), connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(BackendUnreachableError, match="no Parrot ServeCore answers"):
        await backend.acomplete("hello", PARAMS)
    assert time.monotonic() - started < 5
    await backend.aclose()


async def test_an_expired_session_is_a_clear_error_and_the_session_is_closed():
    with ServeCoreDouble(engine_url=None, engine_model="m", session_life_span=0.3) as core:
        async with ParrotClient(core.base_url) as client:
            session = await client.open_session()
            await asyncio.sleep(0.6)
            with pytest.raises(ParrotError, match="expired"):
                await session.submit("A {{out}}", inputs={}, output="out", params=PARAMS)
            assert session.closed
            assert core.requests[-1][0] == "DELETE"


async def test_placeholders_and_parameters_that_disagree_are_refused_before_sending(core):
    async with ParrotClient(core.base_url) as client:
        session = await client.open_session()
        with pytest.raises(ConfigError, match=r"placeholders without a parameter: \['topic'\]"):
            await session.submit("Write about {{topic}}: {{out}}", inputs={"subject": "x"}, output="out", params=PARAMS)
        assert session.closed
    assert core.bodies("/v1/semantic_call") == []
    assert core.requests[-1][0] == "DELETE"


def test_template_checks_name_each_disagreement():
    with pytest.raises(ConfigError, match=r"parameters not in the template: \['extra'\]"):
        check_template("A {{x}} {{out}}", {"x": "1", "extra": "2"}, "out")
    with pytest.raises(ConfigError, match="must end the template"):
        check_template("A {{out}} trailing", {}, "out")
    with pytest.raises(ConfigError, match="more than once"):
        check_template("{{out}} {{x}} {{out}}", {"x": "1"}, "out")
    check_template("{{x}} and again {{x}}: {{out}}", {"x": "1"}, "out")  # an input may repeat
    with pytest.raises(ConfigError, match="single stop string"):
        sampling_config(SamplingParams(stop=("a", "b")))
    with pytest.raises(ConfigError, match="criteria"):
        ParrotBackend("http://127.0.0.1:9", "m", tokenizer=_Counter(), criteria="TTFT")


async def test_servecore_errors_map_to_parrot_error_with_its_message(core):
    async with ParrotClient(core.base_url) as client:
        session = await client.open_session()
        with pytest.raises(ParrotError, match="Unknown Semantic Variable ID: nope"):
            await session.set(SemanticVar("x", "nope"), "content")
        assert session.closed
        # A request ServeCore cannot parse (placeholder without parameter, sent raw) gets its plain-text 500.
        raw = await client.open_session()
        body = {"session_id": raw.session_id, "session_auth": raw.session_auth, "template": "{{a}}{{out}}",
                "parameters": [{"name": "out", "is_output": True}]}
        with pytest.raises(ParrotError, match="HTTP 500"):
            await client.request("POST", "/semantic_call", body, op="submit")


async def test_a_variable_that_never_becomes_ready_times_out_and_closes_the_session(core):
    backend = ParrotBackend(core.base_url, "m", tokenizer=_Counter(), request_timeout_s=1.0)
    with pytest.raises(ParrotError, match="not ready after 1 s"):
        await backend.acomplete("hello", PARAMS)
    assert core.sessions == {}
    await backend.aclose()


async def test_an_engine_dying_behind_servecore_is_detected_and_the_session_closed():
    dead_engine = f"http://127.0.0.1:{_closed_port()}/v1"
    with ServeCoreDouble(engine_url=dead_engine, engine_model="m") as core:
        async with ParrotClient(core.base_url) as client:
            session = await client.open_session()
            session.probe_interval = 0.2
            out = await session.submit("Hi {{out}}", inputs={}, output="out", params=PARAMS)
            started = time.monotonic()
            with pytest.raises(ParrotError, match="dropped session .* its engine failed"):
                await session.get(out, timeout=30)
            assert time.monotonic() - started < 5  # detected by the liveness check, not the 30 s timeout
            assert session.closed
        assert len(core.engine_requests) == 1


class _Recorder(BaseCallbackHandler):
    def __init__(self):
        self.events = []

    def on_chain_start(self, serialized, inputs, **kw):
        self.events.append(("chain_start", kw.get("name")))

    def on_chain_error(self, error, **kw):
        self.events.append(("chain_error", type(error).__name__))

    def on_llm_start(self, serialized, prompts, **kw):
        self.events.append(("llm_start", kw.get("name")))

    def on_llm_error(self, error, **kw):
        self.events.append(("llm_error", type(error).__name__))


async def test_a_failing_program_reports_errors_to_callbacks_and_closes_its_session(core):
    program = SemanticProgram("wf")
    first = program.call("first", "Say {text}", {"text": "hi"}, PARAMS)
    program.call("second", "Again {prev}", {"prev": first}, PARAMS)
    recorder = _Recorder()
    with pytest.raises(ParrotError, match="not ready"):
        await program.arun(core.base_url, "m", _Counter(), timeout_s=0.5, callbacks=[recorder])
    assert ("chain_start", "wf") in recorder.events
    assert ("llm_start", "first") in recorder.events and ("llm_error", "ParrotError") in recorder.events
    assert ("llm_start", "second") not in recorder.events  # its input never became ready
    assert recorder.events[-1] == ("chain_error", "ParrotError")
    assert core.sessions == {}
    # Both calls were submitted before anything was awaited: ServeCore saw the whole DAG.
    assert [b["func_name"] for b in core.bodies("/v1/semantic_call")] == ["first", "second"]
