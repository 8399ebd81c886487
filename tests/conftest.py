"""Shared fixtures. The real embedded vLLM engine starts at most once per test session, on first use."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """The embedded vLLM engine (SmolLM2-135M on vLLM's CPU build here), batch size 8, prefix caching on.

    Priority scheduling, so that the workflow scheduler's tests need no engine of their own: requests without
    a priority all have vLLM's default 0 and are served first come, first served, as under ``fcfs``.
    """
    from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer

    server = VLLMServer(EngineConfig(max_num_seqs=8, max_model_len=4096, tool_call_parser="hermes",
                                     scheduling_policy="priority"), log_dir=tmp_path_factory.mktemp("vllm"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def serving_llm(vllm_server):
    """A `ServingLLM` pointed at the session's engine, with short outputs."""
    from langchain_energy.llms import ServingLLM

    return ServingLLM.from_server(vllm_server, max_tokens=32, seed=0)
