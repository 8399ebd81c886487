"""run_trial: presets, inputs, and that every LLM call lands in the energy handler's records."""

from __future__ import annotations

import dataclasses

import pytest
from langchain_core.language_models.fake import FakeListLLM

from chains.harness.inputs import prepare_inputs
from chains.harness.settings import WORKLOADS, resolve, RunSettings, validate
from chains.harness.trial import run_trial, TrialResult
from langchain_energy.errors import ConfigError, ContextLengthError, DataError
from tests.unit._workload_helpers import words


def test_presets_fill_only_unset_knobs():
    s = resolve(RunSettings(workload="search", output_len=99))
    assert s.output_len == 99 and s.n_queries == 8 and s.users == 4
    study = resolve(RunSettings(workload="summarize", preset="study"))
    assert (study.n_docs, study.input_len, study.max_input_tokens) == (10, 1000, 36000)
    assert resolve(RunSettings(workload="search", preset="study")).output_len == 800


@pytest.mark.parametrize("change, match", [
    ({"workload": "translate"}, "unknown workload"),
    ({"users": 0}, "users must be a positive"),
    ({"preset": "huge"}, "unknown preset"),
    ({"batch_size": 0}, "batch-size"),
    ({"power_cap_w": -5.0}, "power-cap"),
    ({"backend": "ollama"}, "backend must be vllm, openai or parrot"),
    ({"users": "4"}, "users must be"),
    ({"temperature": -1.0}, "temperature must be"),
    ({"docs": "a", "dataset": "b"}, "either --docs or --dataset"),
])
def test_bad_settings_are_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        validate(dataclasses.replace(RunSettings(), **change))


def test_inputs_check_the_context_and_the_documents(tmp_path):
    with pytest.raises(ContextLengthError):
        prepare_inputs(RunSettings(workload="summarize", input_len=5000), words, 4096)
    with pytest.raises(DataError, match="does not exist"):
        prepare_inputs(RunSettings(workload="summarize", docs=str(tmp_path / "nope")), words, 4096)
    (tmp_path / "d.txt").write_text("one two three four five six seven eight")
    inputs = prepare_inputs(RunSettings(workload="summarize", docs=str(tmp_path / "d.txt"), input_len=3), words, 4096)
    assert inputs.documents == [["one two three", "four five six", "seven eight"]]


@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_llm_call_appears_in_the_handlers_records(workload, tmp_path):
    (tmp_path / "d.txt").write_text(" ".join(f"w{i}" for i in range(60)))
    settings = RunSettings(workload=workload, docs=str(tmp_path / "d.txt"), input_len=20, n_queries=3, rounds=1)
    inputs = prepare_inputs(settings, words, 4096)
    result = run_trial(settings, FakeListLLM(responses=["out"]), inputs=inputs)
    assert isinstance(result, TrialResult)
    llm_rows = result.runs[result.runs["kind"] == "llm"]
    assert len(llm_rows) == inputs.expected_calls(settings) == result.meta["recorded_llm_calls"] > 0
    expected_workflows = ["summarize", "search"] if workload == "composite" else [workload]
    assert sorted(result.summary["workflow"]) == sorted(expected_workflows)
    # Each workflow is its own root; every call hangs under one of them.
    assert set(llm_rows["root_run_id"]) == set(result.summary["root_run_id"])
    assert result.summary["llm_calls"].sum() == len(llm_rows)
    assert result.meta["provenance"] and result.meta["wall_s"] > 0
    assert all(p for p in result.runs["provenance_cpu"])


def test_composite_workflows_overlap_in_time(tmp_path):
    from tests.unit._workload_helpers import SlowFakeLLM

    (tmp_path / "d.txt").write_text(" ".join(f"w{i}" for i in range(40)))
    settings = RunSettings(workload="composite", docs=str(tmp_path / "d.txt"), input_len=20, n_queries=2)
    result = run_trial(settings, SlowFakeLLM(responses=["x"], sleep=0.05), inputs=prepare_inputs(settings, words, 4096))
    rows = result.summary.set_index("workflow")
    assert rows.loc["summarize", "t_start"] < rows.loc["search", "t_end"]
    assert rows.loc["search", "t_start"] < rows.loc["summarize", "t_end"]


def test_progress_bar_counts_calls_without_hiding_them_from_the_energy_handler(tmp_path):
    from chains.harness.progress import CallProgress

    settings = RunSettings(workload="search", n_queries=2, max_follow_ups=0)
    inputs = prepare_inputs(settings, words, 4096)
    progress = CallProgress(total=4, disable=True)
    result = run_trial(settings, FakeListLLM(responses=["x"]), inputs=inputs, callbacks=[progress])
    assert progress.done == 4
    assert result.meta["recorded_llm_calls"] == 4
