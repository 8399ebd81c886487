"""ServingLLM and the managed server against the real embedded vLLM engine."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer
from langchain_energy.errors import ContextLengthError, ServerDiedError, ServerStartError
from langchain_energy.llms import ServingLLM
from langchain_energy.models import load_tokenizer

pytestmark = pytest.mark.engine

LONG_PREFIX = "Solar panels convert sunlight into electricity using photovoltaic cells. " * 60


def test_text_comes_back_with_token_counts_that_match_the_tokenizer(serving_llm, vllm_server):
    prompt = "Name one renewable energy source."
    result = serving_llm.generate([prompt])
    generation = result.generations[0][0]
    info = generation.generation_info
    assert generation.text.strip()
    tokenizer = load_tokenizer(vllm_server.spec.path)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=False)
    assert info["prompt_tokens"] == len(tokenizer.encode(templated, add_special_tokens=False))
    # The server counts the end-of-sequence token it stopped on; the text does not contain it.
    counted = len(tokenizer.encode(generation.text, add_special_tokens=False))
    assert counted <= info["completion_tokens"] <= counted + 1
    assert 0 < info["ttft_s"] <= info["latency_s"]
    usage = result.llm_output["token_usage"]
    assert usage["total_tokens"] == info["prompt_tokens"] + info["completion_tokens"]


def test_fixed_output_length_with_ignore_eos(serving_llm):
    info = serving_llm.generate(["Hi"], max_tokens=12, ignore_eos=True).generations[0][0].generation_info
    assert info["completion_tokens"] == 12 and info["finish_reason"] == "length"


def test_a_shared_prefix_is_served_from_the_cache_and_metrics_agree(serving_llm, vllm_server):
    vllm_server.reset_prefix_cache()
    serving_llm.invoke(LONG_PREFIX + "Summarize this in one line.")
    before = vllm_server.metrics()
    info = serving_llm.generate([LONG_PREFIX + "What converts sunlight?"]).generations[0][0].generation_info
    delta = vllm_server.metrics() - before
    assert info["cached_tokens"] > 500
    assert delta.prefix_cache_hits == info["cached_tokens"]
    assert delta.prompt_tokens == info["prompt_tokens"]


def test_eight_concurrent_calls_share_the_engine_steps(serving_llm, vllm_server):
    # The engine's own step counter, not a sampled gauge: one call at a time would take about one step per
    # generated token, eight together about one step per eight.
    before = vllm_server.metrics()

    async def eight():
        return await asyncio.gather(*(serving_llm.ainvoke(f"Write a sentence about the number {i}.",
                                                          max_tokens=48, ignore_eos=True) for i in range(8)))

    answers = asyncio.run(eight())
    delta = vllm_server.metrics() - before
    assert len(answers) == 8 and all(answers)
    assert delta.generation_tokens == 8 * 48
    assert 0 < delta.engine_steps < delta.generation_tokens / 2


def test_streaming_yields_tokens_then_the_accounting(serving_llm):
    chunks = list(serving_llm.stream("Count from one to ten.", max_tokens=16, ignore_eos=True))
    texts = [c for c in chunks if c]
    assert len(texts) >= 5


def test_a_prompt_longer_than_the_context_is_a_clear_error(serving_llm):
    with pytest.raises(ContextLengthError):
        serving_llm.invoke("energy " * 6000)


def test_a_server_that_cannot_start_quotes_its_log(tmp_path):
    server = VLLMServer(EngineConfig(extra_args=("--no-such-flag",)), log_dir=tmp_path, startup_timeout_s=120)
    with pytest.raises(ServerStartError, match="no-such-flag"):
        server.start()
    assert not server.running


def test_a_server_dying_mid_run_is_reported_and_nothing_is_left_running(tmp_path):
    with VLLMServer(EngineConfig(max_num_seqs=2, max_model_len=2048), log_dir=tmp_path) as server:
        llm = ServingLLM.from_server(server, max_tokens=8)
        llm._make_backend = lambda: __import__("langchain_energy.backends.openai_compat", fromlist=["x"]) \
            .OpenAICompatBackend(server.base_url, server.served_model_name, health_check=server.check_alive)
        assert llm.invoke("Hello")
        pgid = server._process.pid
        os.kill(pgid, signal.SIGKILL)  # the API process only: its engine workers are orphaned
        server._process.wait(10)
        with pytest.raises(ServerDiedError, match="log"):
            llm.invoke("Hello again")
    assert not server.running
    deadline = time.monotonic() + 10   # killed processes may take a moment to go on a busy machine
    while (survivors := [p for p in psutil.process_iter(["status"])
                         if _pgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert survivors == []  # the whole process group, engine workers included, is gone


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
