"""The tensor-parallel knob: one entry, an engine knob that reaches vLLM's flag and the engine's GPU count, and a
power cap set on every GPU of a multi-GPU engine (simulated devices)."""

from __future__ import annotations

from chains.harness.engine_runner import EngineTrialRunner
from chains.harness.knobs import KNOBS, parse_knob
from chains.harness.ray_executor import ConfigWorker, RayExecutor
from chains.harness.store import SweepSpec
from chains.harness.sweep import plan
from langchain_energy.backends.vllm_server import EngineConfig
from langchain_energy.models import resolve_model


def _config(**knobs):
    (first, value), *rest = knobs.items()  # the first swept, the others crossed: one configuration
    spec = SweepSpec(workloads=["search"], knobs={first: [value]}, across={k: [v] for k, v in rest}, repeats=1)
    (config,) = plan(spec, EngineTrialRunner.defaults())
    return config


def test_tensor_parallel_is_an_engine_knob_that_reaches_vllm():
    assert parse_knob("tensor-parallel=1,2") == ("tensor-parallel", [1, 2])
    assert KNOBS["tensor-parallel"].is_engine_knob
    config = _config(**{"tensor-parallel": 2})
    engine = EngineTrialRunner().engine_config(config)
    assert engine.tensor_parallel_size == 2 and engine.gpu_count == 2
    args = engine.server_args(resolve_model(engine.model), on_gpu=True)
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert "--tensor-parallel-size" not in EngineConfig().server_args(resolve_model("smollm2-135m"), on_gpu=True)
    assert RayExecutor.gpus_needed(config) == 2 and RayExecutor.gpus_needed(_config(**{"batch-size": 4})) == 1


class _NoEngine:
    def prepare(self, config):
        pass

    def close(self):
        pass


def test_a_power_cap_goes_on_every_gpu_of_the_engine():
    worker = ConfigWorker.__new__(ConfigWorker)  # as Ray builds it on a node, given GPUs 3 and 5
    worker.where, worker.runner, worker.power_cap_mode, worker.caps = {"node": "n", "gpus": [3, 5]}, _NoEngine(), \
        "simulate", []
    where, infeasible = worker.prepare(_config(**{"power-cap": 250, "tensor-parallel": 2}))
    assert infeasible is None
    # One cap per GPU of the engine (a simulated device each), every one at the configuration's watts.
    assert [(c.current_w, c.mode) for c in worker.caps] == [(250, "simulated"), (250, "simulated")]
    assert len({id(c.device) for c in worker.caps}) == 2
    caps = list(worker.caps)
    worker.close()
    assert all(c.current_w is None for c in caps)  # restored
