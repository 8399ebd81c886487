"""The four workloads end to end on the real embedded engine, small sizes, on the chat model the harness gives
them; the same prompt's tokens through the chat model and the completion LLM; and the CLI's outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from langchain_core.messages import HumanMessage

from chains.harness.inputs import prepare_inputs
from chains.harness.settings import RunSettings
from chains.harness.trial import run_trial
from chains.workloads import search
from chains.workloads.llm_utils import acall
from langchain_energy import ChatServing, EnergyCallbackHandler
from langchain_energy._loop import run_sync
from langchain_energy.ledger import CALL_KINDS

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chat_model(vllm_server):
    """The chat model on the session's engine, as the harness builds it for a trial (short outputs)."""
    return ChatServing.from_server(vllm_server, max_tokens=32, seed=0)


def test_a_workload_call_has_the_same_prompt_tokens_on_the_chat_model_as_on_the_completion_llm(
        serving_llm, chat_model, vllm_server):
    # ServingLLM sends its prompt to the chat API as one user message; the chat model sends the workload's string
    # as one user message too: the server applies the same template to the same text.
    prompt = search.REFORMULATE_PROMPT.format(system=search.system_prompt(), query="How do I read a CSV file?")
    counts = {}
    for name, model in (("completion", serving_llm), ("chat", chat_model)):
        vllm_server.reset_prefix_cache()
        with EnergyCallbackHandler() as handler:
            run_sync(acall(model, prompt, max_tokens=4, role="reformulate", config={"callbacks": [handler]}))
        runs = handler.to_dataframe()
        calls = list(runs[runs["kind"].isin(CALL_KINDS)].itertuples())
        assert len(calls) == 1, runs[["kind", "name", "status"]].to_string()
        call = calls[0]
        counts[name] = (call.prompt_tokens, call.completion_tokens > 0, call.cached_tokens, call.ttft_s > 0,
                        call.latency_s > 0, call.energy_j > 0)
    assert counts["chat"] == counts["completion"], counts
    assert counts["chat"][0] == chat_model.get_num_tokens_from_messages([HumanMessage(prompt)]) > 2800


def _count(llm):
    return llm.get_num_tokens


def _check_records(result, settings, inputs):
    llm_rows = result.runs[result.runs["kind"].isin(CALL_KINDS)]
    # Every LLM call appears in the handler's records, with the server's token counts.
    assert len(llm_rows) == inputs.expected_calls(settings) == result.summary["llm_calls"].sum()
    assert (llm_rows["status"] == "ok").all()
    assert (llm_rows["completion_tokens"] > 0).all() and (llm_rows["prompt_tokens"] > 0).all()
    assert result.summary["energy_j"].notna().all()
    return llm_rows


def test_summarize_refine_calls_per_document(chat_model):
    settings = RunSettings(workload="summarize", n_docs=2, input_len=128, max_input_tokens=384, output_len=24, users=2)
    inputs = prepare_inputs(settings, _count(chat_model), 4096)
    result = run_trial(settings, chat_model, inputs=inputs)
    rows = _check_records(result, settings, inputs)
    per_doc = [len(c) for c in inputs.documents]
    assert all(2 <= n <= 40 for n in per_doc)
    assert sorted(rows["langgraph_node"].value_counts().items()) == [
        ("refine", sum(per_doc) - 2), ("summarize_first", 2)]
    # The refine prompt carries chunk + previous summary: never above chunk + budget + template.
    assert rows["prompt_tokens"].max() <= 128 + 24 + 128
    assert all(s.strip() for s in result.outputs["summarize"])


def test_search_sessions_share_the_cached_prefix(chat_model):
    settings = RunSettings(workload="search", n_queries=3, max_follow_ups=1, output_len=16, users=3)
    inputs = prepare_inputs(settings, _count(chat_model), 4096)
    result = run_trial(settings, chat_model, inputs=inputs)
    rows = _check_records(result, settings, inputs)
    assert all(2 <= 2 + len(q["follow_ups"]) <= 8 for q in inputs.queries)
    assert rows["prompt_tokens"].min() > 2800  # every call carries the ~3,000-token system prompt
    # After the first calls, the shared system prompt comes from the prefix cache.
    assert result.summary["cache_hit_rate"].iloc[0] > 0.5


def test_agentic_task_makes_15_to_20_calls_with_parallel_modules(chat_model):
    settings = RunSettings(workload="agentic", n_tasks=1, rounds=2, output_len=16, review_len=12)
    inputs = prepare_inputs(settings, _count(chat_model), 4096)
    result = run_trial(settings, chat_model, inputs=inputs)
    rows = _check_records(result, settings, inputs)
    assert 15 <= len(rows) <= 20
    roles = rows["tags"].map(lambda t: next((x.split(":", 1)[1] for x in t if x.startswith("role:")), None))
    assert roles.value_counts().to_dict() == {"reviewer": 6, "reviser": 6, "engineer": 3, "architect": 1,
                                              "integrator": 1}
    eng = rows[roles == "engineer"]
    # The three engineer branches overlap in time (sent together, batched by the engine).
    assert eng["t_start"].max() < eng["t_end"].min()
    # Each engineer called its syntax-check tool (a forced call, schema-decoded by the engine): three round
    # trips, each a tool run of its own between model calls, never counted as an LLM call.
    (outputs,) = result.outputs["agentic"]
    assert outputs["tool_calls"] == 3 and all(r["syntax"] for r in outputs["results"])
    tools = result.runs[result.runs["kind"] == "tool"]
    assert list(tools["name"]) == ["check_syntax"] * 3 and (tools["status"] == "ok").all()
    assert not set(tools["run_id"]) & set(rows["run_id"]) and result.meta["recorded_llm_calls"] == len(rows)
    for tool in tools.itertuples():  # after its engineer's call ended, before its module's reviewer started
        assert tool.t_start >= eng["t_end"].min() and tool.t_end <= rows[roles == "reviewer"]["t_start"].max()


def test_agentic_with_fixed_output_lengths_still_round_trips_through_the_tool(chat_model):
    # ignore_eos with a schema-decoded tool call: the call still ends (cut at its cap or closed), the tool answers.
    settings = RunSettings(workload="agentic", n_tasks=1, rounds=0, output_len=24, review_len=8, ignore_eos=True)
    inputs = prepare_inputs(settings, _count(chat_model), 4096)
    result = run_trial(settings, chat_model, inputs=inputs)
    rows = _check_records(result, settings, inputs)
    roles = rows["tags"].map(lambda t: next((x.split(":", 1)[1] for x in t if x.startswith("role:")), None))
    assert (rows[roles != "engineer"]["completion_tokens"] == rows[roles != "engineer"]["tags"].map(
        lambda t: 8 if "role:architect" in t else 24)).all()
    assert result.outputs["agentic"][0]["tool_calls"] == 3


def test_composite_attributes_each_workflow_separately(chat_model):
    settings = RunSettings(workload="composite", n_docs=1, input_len=128, max_input_tokens=256, n_queries=2,
                           max_follow_ups=0, output_len=16)
    inputs = prepare_inputs(settings, _count(chat_model), 4096)
    result = run_trial(settings, chat_model, inputs=inputs)
    _check_records(result, settings, inputs)
    s = result.summary.set_index("workflow")
    assert sorted(s.index) == ["search", "summarize"]
    assert s.loc["summarize", "t_start"] < s.loc["search", "t_end"] and s.loc["search", "t_start"] < s.loc["summarize", "t_end"]
    assert (s["energy_j"] > 0).all()


def test_cli_writes_records_and_metadata_that_parse(vllm_server, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "chains.run", "search", "--backend", "openai", "--base-url", vllm_server.base_url,
           "--model", vllm_server.served_model_name, "--n-queries", "2", "--max-follow-ups", "0", "--output-len", "12",
           "--repeats", "2", "--power-cap", "250", "--power-cap-mode", "simulate", "--out", str(out),
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "search" in proc.stdout and "provenance:" in proc.stdout and "cache_hit" in proc.stdout
    runs = pd.read_csv(out / "runs.csv")
    summary = pd.read_csv(out / "summary.csv")
    meta = json.loads((out / "metadata.json").read_text())
    assert sorted(summary["repeat"]) == [0, 1]
    assert (runs[runs["kind"] == "chat_model"].groupby("repeat").size() == 4).all()  # the chat model's calls
    assert {"energy_cpu_j", "provenance_cpu", "latency_s", "cached_tokens"} <= set(runs.columns)
    # no GPU here: the cap is rehearsed on the simulated one, and said not to be a real one everywhere
    assert meta["power_cap"]["mode"] == "simulated" and meta["power_cap"]["requested_w"] == 250
    assert meta["power_cap"]["applied"] is False and "NOT on a real one" in proc.stdout
    assert meta["versions"]["langchain-core"] and meta["hardware"]["logical_cpus"] >= 1
    assert meta["settings"]["n_queries"] == 2 and len(meta["trials"]) == 2
    assert [(t["recorded_llm_calls"], t["expected_llm_calls"]) for t in meta["trials"]] == [(4, 4), (4, 4)]
