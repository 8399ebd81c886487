"""One real embedded-engine trial through a Ray worker: the worker starts its own engine (a second one), runs
the trial, and the driver writes the record with the worker's node and GPUs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from chains.harness.engine_runner import EngineTrialRunner  # noqa: E402
from chains.harness.ray_executor import RayExecutor, connect  # noqa: E402
from chains.harness.store import ResultStore, SweepSpec  # noqa: E402
from chains.harness.sweep import run_sweep  # noqa: E402
from chains.harness.sweep_cli import engine_runner_maker  # noqa: E402

pytestmark = pytest.mark.engine


def test_an_engine_trial_runs_in_a_ray_worker(tmp_path):
    os.chdir(Path(__file__).resolve().parents[2])
    engine = {"max_num_seqs": 2, "max_model_len": 4096, "cpu_kvcache_gib": 1}
    spec = SweepSpec(workloads=["search"], knobs={"batch-size": [2]}, repeats=1,
                     fixed={"settings": {"users": 1, "n_queries": 1, "max_follow_ups": 0, "output_len": 4,
                                         "ignore_eos": True}, "engine": engine})
    connect(None, num_cpus=2)
    try:
        executor = RayExecutor(engine_runner_maker(engine, None, None, None), progress=False)
        outcome = run_sweep(spec, ResultStore(tmp_path), EngineTrialRunner(engine), EngineTrialRunner.defaults(),
                            progress=False, executor=executor)
    finally:
        ray.shutdown()
    assert outcome.ran == 1, outcome
    (record,) = ResultStore(tmp_path).records()
    assert record.status == "ok" and record.meta["node"] and record.meta["gpus"] == []
    calls = [r for r in record.runs if r["kind"] in ("llm", "chat_model")]
    assert len(calls) == record.meta["expected_llm_calls"] >= 1 and calls[-1]["completion_tokens"] == 4
    assert record.meta["engine_metrics"]["generation_tokens"] == sum(r["completion_tokens"] for r in calls)
    assert all(s["energy_j"] > 0 for s in record.summary)
