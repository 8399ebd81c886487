"""The scheduling knob (one registry entry, the engine it needs, where it is refused) and the experiment's report."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pandas as pd
import pytest
from langchain_core.language_models.fake import FakeListLLM

from chains.harness.cli import main as run_main
from chains.harness.knobs import engine_fields, parse_knob
from chains.harness.scheduling_study import arm_table, best_policy, completion_times, trial_row
from chains.harness.settings import RunSettings, validate
from chains.harness.trial import workflow_scheduler
from langchain_energy.errors import ConfigError
from langchain_energy.llms import ServingLLM


def test_the_knob_takes_the_policies_and_refuses_others():
    assert parse_knob("scheduling=fcfs,workflow-fcfs,least-attained,critical-path")[1] == [
        "fcfs", "workflow-fcfs", "least-attained", "critical-path"]
    with pytest.raises(ConfigError, match="must be fcfs, workflow-fcfs"):
        parse_knob("scheduling=lifo")


@pytest.mark.parametrize("policy", ["fcfs", "workflow-fcfs", "critical-path"])
def test_any_policy_runs_on_one_priority_engine(policy):
    # Every value needs the same engine, so a sweep over policies never restarts it.
    fields = engine_fields(dataclasses.asdict(RunSettings(scheduling=policy, batch_size=8)))
    assert fields["scheduling_policy"] == "priority" and fields["max_num_seqs"] == 8


def test_without_the_knob_the_engine_keeps_its_own_policy():
    assert "scheduling_policy" not in engine_fields(dataclasses.asdict(RunSettings(batch_size=8)))


def test_parrot_cannot_take_a_policy():
    with pytest.raises(ConfigError, match="Parrot schedules its own"):
        validate(RunSettings(backend="parrot", scheduling="least-attained", base_url="http://127.0.0.1:9000"))
    validate(RunSettings(backend="parrot", scheduling="fcfs", base_url="http://127.0.0.1:9000"))


def test_a_url_server_cannot_take_a_policy(capsys):
    status = run_main(["composite", "--scheduling", "workflow-fcfs", "--base-url", "http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "needs the managed engine" in err[0]


def test_the_trial_scheduler_gates_at_the_batch_size_with_a_workflow_per_document():
    llm = ServingLLM(backend="openai", base_url="http://127.0.0.1:9/v1")
    assert workflow_scheduler(RunSettings(scheduling="fcfs"), llm) is None
    assert workflow_scheduler(RunSettings(), llm) is None
    s = workflow_scheduler(RunSettings(scheduling="least-attained", batch_size=16), llm)
    assert (s.policy, s.max_in_flight, s.workflow_depth, s.handoff_s) == ("least-attained", 16, 1, 0.25)
    with pytest.raises(ConfigError, match="needs this package's models"):
        workflow_scheduler(RunSettings(scheduling="workflow-fcfs"), FakeListLLM(responses=["x"]))


# -- the report, on recorded trials -----------------------------------------------------------------------

def _record(arm: str, repeat: int, ends: list[float], energy: float) -> SimpleNamespace:
    """A recorded trial: a root fanning out one workflow per end time, each with one LLM call."""
    runs = [{"run_id": "root", "parent_run_id": None, "kind": "chain", "name": "summarize", "t_start": 10.0,
             "t_end": 10.0 + max(ends)}]
    for i, end in enumerate(ends):
        runs.append({"run_id": f"d{i}", "parent_run_id": "root", "kind": "chain", "name": "summarize_document",
                     "t_start": 10.0, "t_end": 10.0 + end})
        runs.append({"run_id": f"c{i}", "parent_run_id": f"d{i}", "kind": "llm", "name": "llm",
                     "t_start": 10.0, "t_end": 10.0 + end})
    return SimpleNamespace(
        workload="composite", repeat=repeat, runs=runs, timeline=[],
        knobs={"batch-size": 8, "scheduling": None if arm == "fcfs" else arm, "backend": "vllm"},
        summary=[{"energy_j": energy, "energy_gpu_j": energy, "completion_tokens": 100, "provenance": "p"}],
        meta={"engine_metrics": {"engine_steps": 50, "generation_tokens": 100, "prefix_cache_hit_rate": 0.5}})


def test_completion_times_are_the_fan_out_children_from_the_load_start():
    ct = completion_times(_record("fcfs", 0, [1.0, 3.0], 10.0))
    assert sorted(ct["completion_s"]) == [1.0, 3.0] and set(ct["workflow"]) == {"summarize_document"}


def test_the_arm_table_gives_speedup_energy_ratio_and_whether_the_cis_separate():
    recs = [_record("fcfs", r, [4.0, 4.0 + r * 0.1, 5.0], 100.0) for r in range(3)]
    recs += [_record("workflow-fcfs", r, [1.0, 2.0 + r * 0.1, 5.0], 95.0) for r in range(3)]
    table = arm_table(pd.DataFrame([trial_row(r) for r in recs])).set_index("arm")
    fcfs, wf = table.loc["fcfs"], table.loc["workflow-fcfs"]
    assert wf["speedup_mean"] == pytest.approx(fcfs["mean_s"] / wf["mean_s"]) and wf["speedup_mean"] > 1.5
    assert wf["energy_ratio"] == pytest.approx(0.95) and bool(wf["ci_separate"])
    assert wf["tokens_per_step"] == pytest.approx(2.0) and wf["j_per_token"] == pytest.approx(0.95)
    assert math.isnan(wf["gpu_util_pct"])   # no GPU samples recorded: not a number, never 0
    assert best_policy(table.reset_index())["arm"] == "workflow-fcfs"


def test_the_documents_are_cut_from_the_embedded_corpus_beyond_its_eleven(tmp_path):
    from chains.harness.scheduling_study import document_pieces
    from chains.workloads.corpus import load_user_documents

    docs = load_user_documents(str(document_pieces(tmp_path / "docs", 32)))
    assert len(docs) == 32 and len({d.page_content for d in docs}) == 32
    assert min(len(d.page_content) for d in docs) > 24_000      # over 6,000 tokens each: the GPU size reads 6,000
    assert len(load_user_documents(str(document_pieces(tmp_path / "docs", 4)))) == 4


def test_a_policy_that_is_slower_than_fcfs_is_never_the_best():
    recs = [_record("fcfs", r, [4.0, 4.0 + r * 0.1, 5.0], 100.0) for r in range(2)]
    recs += [_record("critical-path", r, [4.5, 4.6 + r * 0.1, 5.0], 99.0) for r in range(2)]
    assert best_policy(arm_table(pd.DataFrame([trial_row(r) for r in recs]))) is None
