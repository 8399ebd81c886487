"""The sweep against the real engine: an engine that cannot start for lack of memory is recorded as
infeasible and the sweep goes on; the borrowed engine is restored afterwards."""

from __future__ import annotations

import pytest

from chains.sweep import EngineTrialRunner, run_sweep
from langchain_energy.results import ResultStore, SweepSpec

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
