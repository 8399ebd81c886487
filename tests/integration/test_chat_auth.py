"""API keys and "auto" tool choice, on an embedded engine of its own: key required, tool-call parser on.

This module starts its own engine (the session's shared one runs neither a key nor a parser): run it in a
pytest session of its own to keep to one engine per session.
"""

from __future__ import annotations

import time

import pytest
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from langchain_energy import ChatServing, EnergyCallbackHandler, ServingLLM
from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer
from langchain_energy.errors import AuthenticationError

pytestmark = pytest.mark.engine

KEY = "sk-test-5f1d2c9e-never-in-a-log"


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    # The key goes through the environment (VLLM_API_KEY), not the command line, so the server's log and the
    # process list never show it.
    # A small memory reservation (a 2,048-token context at 4 sequences needs little): it starts beside another engine.
    server = VLLMServer(EngineConfig(max_num_seqs=4, max_model_len=2048, tool_call_parser="hermes",
                                     memory_fraction=0.1, cpu_kvcache_gib=1),
                        log_dir=tmp_path_factory.mktemp("vllm-keyed"), env={"VLLM_API_KEY": KEY})
    server.start()
    yield server
    server.stop()


def _url_kwargs(server):
    return {"backend": "openai", "base_url": server.base_url, "model": server.served_model_name, "max_tokens": 16,
            "temperature": 0, "seed": 0}


def test_both_model_classes_authenticate_with_a_key_from_the_argument_or_the_environment(keyed_server, monkeypatch):
    assert ChatServing(**_url_kwargs(keyed_server), api_key=KEY).invoke("Hi").content
    assert ServingLLM(**_url_kwargs(keyed_server), api_key=KEY).invoke("Hi")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert ChatServing(**_url_kwargs(keyed_server)).invoke("Hi").content
    assert ServingLLM(**_url_kwargs(keyed_server)).invoke("Hi")


@pytest.mark.parametrize("cls", [ChatServing, ServingLLM])
@pytest.mark.parametrize("key", ["sk-wrong", None])
def test_a_wrong_or_missing_key_is_one_line_that_says_so_without_retrying(keyed_server, monkeypatch, cls, key):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model = cls(**_url_kwargs(keyed_server), api_key=key)
    started = time.monotonic()
    with pytest.raises(AuthenticationError) as info:
        model.invoke("Hi")
    message = str(info.value)
    assert time.monotonic() - started < 2.0  # refused at once, no retry loop
    assert "\n" not in message and "401" in message
    assert ("wrong" if key else "OPENAI_API_KEY") in message
    assert KEY not in message and (key is None or key not in message)


def test_the_key_appears_in_no_log_report_or_repr(keyed_server):
    chat = ChatServing(**_url_kwargs(keyed_server), api_key=KEY)
    with EnergyCallbackHandler() as energy:
        chat.invoke("Hi", config={"callbacks": [energy]})
    outputs = [repr(chat), str(chat.model_dump()), energy.report(), energy.to_dataframe().to_csv(),
               keyed_server.log_path.read_text(errors="replace")]
    assert not [text for text in outputs if KEY in text]


def test_auto_tool_choice_goes_through_the_servers_parser(keyed_server):
    chat = ChatServing.from_server(keyed_server, api_key=KEY, max_tokens=48, temperature=0, seed=0)
    assert chat.auto_tool_choice is True
    msg = chat.bind_tools([get_weather]).invoke("What is the weather in Oslo?")
    # The 135M model answers "auto" in prose; the parser found no call in it, and the message says so cleanly.
    assert isinstance(msg, AIMessage) and (msg.content or msg.tool_calls) and not msg.invalid_tool_calls
    forced = chat.bind_tools([get_weather], tool_choice="any").invoke("What is the weather in Oslo?")
    assert forced.tool_calls[0]["name"] == "get_weather" and isinstance(forced.tool_calls[0]["args"]["city"], str)


def _run_cli(server, out, env, *extra):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    # A short summarization: this engine's context (2048 tokens) has no room for search's 3,000-token prompt.
    cmd = [sys.executable, "-m", "chains.run", "summarize", "--backend", "openai", "--base-url", server.base_url,
           "--model", server.served_model_name, "--max-model-len", "2048", "--n-docs", "1", "--input-len", "128",
           "--max-input-tokens", "256", "--output-len", "8", "--out", str(out), "--no-progress", *extra]
    base = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**base, "PYTHONPATH": str(repo), **env})


@pytest.mark.parametrize("how", ["--api-key-env", "OPENAI_API_KEY"])
def test_a_workload_through_chains_run_base_url_authenticates_and_writes_the_key_nowhere(keyed_server, tmp_path, how):
    out = tmp_path / "out"
    if how == "--api-key-env":
        proc = _run_cli(keyed_server, out, {"MY_VLLM_KEY": KEY}, "--api-key-env", "MY_VLLM_KEY")
    else:
        proc = _run_cli(keyed_server, out, {"OPENAI_API_KEY": KEY})
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in written} >= {"runs.csv", "summary.csv", "metadata.json"}
    assert "chat_model" in (out / "runs.csv").read_text()  # the workload ran on the chat model, authenticated
    leaks = [p.name for p in written if KEY in p.read_text(errors="replace")]
    assert not leaks and KEY not in proc.stdout + proc.stderr
    assert KEY not in keyed_server.log_path.read_text(errors="replace")


@pytest.mark.parametrize("env", [{"MY_VLLM_KEY": "sk-wrong"}, {}])
def test_a_wrong_or_missing_key_through_chains_run_is_one_line_and_a_non_zero_exit(keyed_server, tmp_path, env):
    extra = ("--api-key-env", "MY_VLLM_KEY") if env else ()
    proc = _run_cli(keyed_server, tmp_path / "out", env, *extra)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "401" in errors[0] and "Traceback" not in proc.stderr
    assert ("wrong" if env else "OPENAI_API_KEY") in errors[0] and KEY not in proc.stderr
