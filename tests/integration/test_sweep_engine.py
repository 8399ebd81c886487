"""The sweep against the real engine: an engine that cannot start for lack of memory is recorded as
infeasible and the sweep goes on; the borrowed engine is restored afterwards."""

from __future__ import annotations

import pytest

from chains.harness.engine_runner import EngineTrialRunner
from chains.harness.store import ResultStore, SweepSpec
from chains.harness.sweep import run_sweep
from langchain_energy.ledger import CALL_KINDS

pytestmark = pytest.mark.engine


def test_infeasible_engine_recorded_and_sweep_goes_on(vllm_server, tmp_path):
    # 2% of the memory node leaves nothing for the KV cache once the weights are loaded: vLLM refuses to start.
    spec = SweepSpec(workloads=["search"], knobs={"batch-size": [2], "prefix-caching": [False]}, repeats=2,
                     fixed={"settings": {"users": 1, "n_queries": 1, "max_follow_ups": 0, "output_len": 4},
                            "engine": {"memory_fraction": 0.02}})
    runner = EngineTrialRunner(server=vllm_server, engine_args=spec.fixed["engine"])
    outcome = run_sweep(spec, ResultStore(tmp_path), runner, EngineTrialRunner.defaults(), progress=False)
    assert outcome.ran == 0 and len(outcome.infeasible) == 2  # both configurations tried, neither fatal
    agg = ResultStore(tmp_path).aggregate()
    assert set(agg["status"]) == {"infeasible"} and (agg["n"] == 0).all()
    assert all("memory" in r for r in agg["reason"])
    assert len(ResultStore(tmp_path).done_keys()) == 4
    assert vllm_server.running and vllm_server.config.memory_fraction is None


def test_each_trial_records_the_engines_own_counters(vllm_server, tmp_path):
    # output-len is not an engine knob: the borrowed engine serves the trial as it is, without a restart.
    spec = SweepSpec(workloads=["search"], knobs={"output-len": [4]}, repeats=1,
                     fixed={"settings": {"users": 1, "n_queries": 1, "max_follow_ups": 1, "ignore_eos": True}})
    runner = EngineTrialRunner(server=vllm_server)
    outcome = run_sweep(spec, ResultStore(tmp_path), runner, EngineTrialRunner.defaults(), progress=False)
    assert outcome.ran == 1
    (record,) = ResultStore(tmp_path).records()
    counters = record.meta["engine_metrics"]
    calls = [r for r in record.runs if r["kind"] in CALL_KINDS]  # the sweep's trials run on the chat model
    assert len(calls) == 3 and {r["kind"] for r in calls} == {"chat_model"}
    prompt_tokens = sum(r["prompt_tokens"] for r in calls)
    assert counters["prompt_tokens"] == prompt_tokens  # the delta covers exactly this trial's calls
    assert counters["generation_tokens"] == sum(r["completion_tokens"] for r in calls)
    # The follow-up shares the ~3,000-token system prompt with the first query, cached after a reset.
    assert 0.3 < ResultStore(tmp_path).load_trials()["engine_cache_hit_rate"].iloc[0] < 1
