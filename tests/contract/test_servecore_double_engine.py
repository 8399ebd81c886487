"""ParrotBackend and semantic programs through the ServeCore test double, generating on the real embedded engine."""

from __future__ import annotations

import httpx
import pytest

from chains.workloads.summarize_parrot import arun_summarize_parrot
from langchain_energy.backends.base import SamplingParams
from langchain_energy.llms import ServingLLM
from tests.doubles.servecore import ServeCoreDouble

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def core(vllm_server):
    with ServeCoreDouble(engine_url=vllm_server.base_url, engine_model=vllm_server.served_model_name) as double:
        yield double


def test_serving_llm_on_parrot_counts_tokens_as_the_server_does(core, vllm_server):
    llm = ServingLLM(backend="parrot", base_url=core.base_url, model=vllm_server.served_model_name,
                     tokenizer=vllm_server.spec.path, max_tokens=16, temperature=0.0)
    result = llm.generate(["Name one planet."])
    info = result.generations[0][0].generation_info
    assert result.generations[0][0].text.strip()
    assert info["token_source"] == "tokenizer"
    assert 1 <= info["completion_tokens"] <= 17
    # The engine saw the prompt as one chat message; vLLM's own count of that request must equal ours.
    sent = core.engine_requests[-1]
    assert sent["messages"] == [{"role": "user", "content": "Name one planet."}]
    usage = httpx.post(vllm_server.base_url + "/chat/completions",
                       json={**sent, "max_tokens": 1}, timeout=60).json()["usage"]
    assert info["prompt_tokens"] == usage["prompt_tokens"]


def test_chat_serving_on_parrot_is_a_chat_model_with_usage_and_energy(core, vllm_server):
    from langchain_core.messages import AIMessageChunk

    from langchain_energy import ChatServing, EnergyCallbackHandler

    chat = ChatServing(backend="parrot", base_url=core.base_url, model=vllm_server.served_model_name,
                       tokenizer=vllm_server.spec.path, max_tokens=12, temperature=0.0)
    with EnergyCallbackHandler() as energy:
        msg = chat.invoke("Name one planet.", config={"callbacks": [energy]})
    sent = core.engine_requests[-1]
    assert sent["messages"] == [{"role": "user", "content": "Name one planet."}]
    usage = httpx.post(vllm_server.base_url + "/chat/completions",
                       json={**sent, "max_tokens": 1}, timeout=60).json()["usage"]
    assert msg.text.strip() and msg.usage_metadata["input_tokens"] == usage["prompt_tokens"]
    assert 1 <= msg.usage_metadata["output_tokens"] <= 13
    assert "input_token_details" not in msg.usage_metadata      # Parrot does not say what its cache served
    meta = msg.response_metadata
    assert meta["model_provider"] == "parrot" and meta["ttft_s"] is None and meta["latency_s"] > 0
    assert meta["energy"]["energy_j"] > 0 and meta["energy"]["final"]
    chunks = list(chat.stream("Name one colour."))
    whole = sum(chunks[1:], chunks[0])
    assert isinstance(whole, AIMessageChunk) and whole.text.strip() and whole.usage_metadata["output_tokens"] >= 1


async def test_refine_chain_resolves_each_summary_inside_the_server(core, vllm_server):
    before = len(core.engine_requests)
    chunks = ["Solar panels turn sunlight into electricity.", "Wind turbines turn moving air into electricity.",
              "Batteries store the energy for the night."]
    (result,) = await arun_summarize_parrot([chunks], base_url=core.base_url, model=vllm_server.served_model_name,
                                            tokenizer=vllm_server.spec.path, summary_tokens=24, temperature=0.0)
    sent = core.engine_requests[before:]
    assert len(sent) == len(result.completions) == 3
    # Each refine prompt carries the previous call's output, substituted by the server, not the client.
    for prev, request in zip(result.completions, sent[1:]):
        assert prev.text in request["messages"][0]["content"]
    assert result.final.strip()
    assert [c.token_source for c in result.completions] == ["tokenizer"] * 3
    # Only the first call's chunk went over the wire as a value; later summaries were variable ids.
    calls = core.bodies("/v1/semantic_call")[-3:]
    assert [p for p in calls[2]["parameters"] if p["name"] == "existing_summary"][0].keys() == {"name", "is_output", "var_id"}


async def test_backend_reuses_one_session_for_concurrent_calls(core, vllm_server):
    import asyncio

    from langchain_energy.backends.parrot import ParrotBackend

    backend = ParrotBackend(core.base_url, vllm_server.served_model_name, tokenizer=vllm_server.spec.path)
    before = len(core.bodies("/v1/session"))
    results = await asyncio.gather(*(backend.acomplete(f"Count to {n}.", SamplingParams(max_tokens=8)) for n in (2, 3, 4)))
    assert len({r.extra["parrot_session_id"] for r in results}) == 1
    assert len(core.bodies("/v1/session")) == before + 1
    await backend.aclose()
    assert results[0].extra["parrot_session_id"] not in core.sessions


async def test_agentic_branches_run_as_one_dag_then_the_integrator(core, vllm_server):
    from chains.workloads.agentic import calls_per_task
    from chains.workloads.agentic_parrot import arun_agentic_parrot

    before = len(core.engine_requests)
    (result,) = await arun_agentic_parrot(["snake"], base_url=core.base_url, model=vllm_server.served_model_name,
                                          tokenizer=vllm_server.spec.path, rounds=1, code_tokens=24, review_tokens=16,
                                          temperature=0.0)
    assert result["calls"] == calls_per_task(3, 1) == len(core.engine_requests) - before
    assert result["product"].strip() and all(r["code"].strip() for r in result["results"])
