"""Issue 11, item 4: only the GPUs the engine serves on are metered; idle neighbours are not charged."""

from __future__ import annotations

import pytest

from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer
from langchain_energy.errors import ConfigError, MeterError
from langchain_energy.meters import ManualClock, ZeusMeter, auto_meter
from tests.unit.test_meters import SimulatedZeusGPUs


def _gpu_joules(energy: dict[str, float]) -> float:
    return sum(v for k, v in energy.items() if k.startswith("gpu:"))


def test_meter_restricted_to_the_serving_gpu_does_not_charge_the_idle_one():
    clock = ManualClock()
    gpus = SimulatedZeusGPUs([300.0, 70.0], clock)  # GPU 0 serves at 300 W, GPU 1 idles at 70 W
    everything = ZeusMeter(clock=clock, gpus=gpus, cpu=False)
    serving = ZeusMeter(clock=clock, gpus=gpus, cpu=False, gpu_indices=(0,))
    clock.advance(10.0)
    assert _gpu_joules(everything.read().energy_j) == pytest.approx(3700.0)
    r = serving.read()
    assert dict(r.energy_j) == {"gpu:0": pytest.approx(3000.0)}  # per-GPU keys are kept
    assert serving.components() == {"gpu:0": "measured:nvml"}
    assert r.gpu_power_w == {0: 300.0}


def test_describe_names_the_gpus_read_and_the_ones_left_out():
    clock = ManualClock()
    gpus = SimulatedZeusGPUs([300.0, 70.0, 70.0], clock)
    zeus = ZeusMeter(clock=clock, gpus=gpus, cpu=False, gpu_indices=[2, 0]).describe()["zeus"]
    assert zeus["gpu_indices"] == [0, 2]
    assert zeus["gpus_visible"] == 3
    assert zeus["gpus_not_read"] == [1]
    assert zeus["gpu_selection"] == "requested"
    assert zeus["gpus"] == {0: "Simulated H100", 2: "Simulated H100"}
    everything = ZeusMeter(clock=clock, gpus=gpus, cpu=False).describe()["zeus"]
    assert everything["gpu_selection"] == "all visible" and everything["gpus_not_read"] == []


def test_gpu_indices_are_checked():
    clock = ManualClock()
    gpus = SimulatedZeusGPUs([300.0, 70.0], clock)
    with pytest.raises(MeterError, match="GPU index 2"):
        ZeusMeter(clock=clock, gpus=gpus, cpu=False, gpu_indices=[2])
    with pytest.raises(ConfigError, match="more than once"):
        ZeusMeter(clock=clock, gpus=gpus, cpu=False, gpu_indices=[0, 0])


def test_auto_meter_takes_gpu_indices_also_over_a_given_zeus_meter():
    clock = ManualClock()
    zm = ZeusMeter(clock=clock, gpus=SimulatedZeusGPUs([300.0, 70.0], clock), cpu=False)
    meter = auto_meter(cpu="off", dram="off", clock=clock, zeus_meter=zm, gpu_indices=[0])
    assert meter.components() == {"gpu:0": "measured:nvml"}
    clock.advance(10.0)
    assert _gpu_joules(meter.read().energy_j) == pytest.approx(3000.0)
    assert meter.describe()["zeus"]["gpu_indices"] == [0]
    with pytest.raises(MeterError, match="GPU index 3"):
        auto_meter(cpu="off", dram="off", clock=clock, zeus_meter=zm, gpu_indices=[3])
    # an engine on no GPU: no GPU is metered, and forcing Zeus for GPUs then says why it cannot
    assert auto_meter(cpu="off", dram="off", clock=clock, zeus_meter=zm, gpu_indices=()).components() == {}


# -- which GPUs the managed server serves on --------------------------------------------------------------

def _server(monkeypatch, ours: str | None, env: dict[str, str] | None = None, **config) -> VLLMServer:
    if ours is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ours)
    server = VLLMServer(EngineConfig(**config), env=env)
    server.on_gpu = True  # what gpu_available() finds on a GPU host; nothing is started here
    return server


def test_server_on_the_cpu_serves_on_no_gpu():
    server = VLLMServer(EngineConfig())
    server.on_gpu = False
    assert server.gpu_indices == ()


def test_server_uses_the_first_devices_it_sees(monkeypatch):
    # vLLM puts worker rank i on its visible device i: one GPU unless the engine is parallel.
    assert _server(monkeypatch, None).gpu_indices == (0,)
    assert _server(monkeypatch, "0,1,2,3").gpu_indices == (0,)
    tp2 = _server(monkeypatch, None, extra_args=("--tensor-parallel-size", "2"))
    assert tp2.gpu_indices == (0, 1)
    assert _server(monkeypatch, None, extra_args=("-tp=2", "--pipeline-parallel-size=2")).gpu_indices == (0, 1, 2, 3)


def test_server_gpus_are_mapped_into_this_processs_indices(monkeypatch):
    # The engine's CUDA_VISIBLE_DEVICES names physical GPUs; Zeus here indexes the GPUs *this* process sees.
    assert _server(monkeypatch, None, env={"CUDA_VISIBLE_DEVICES": "1"}).gpu_indices == (1,)
    assert _server(monkeypatch, "2,3", env={"CUDA_VISIBLE_DEVICES": "3"}).gpu_indices == (1,)
    assert _server(monkeypatch, None, env={"CUDA_VISIBLE_DEVICES": "3,1"},
                   extra_args=("--tensor-parallel-size", "2")).gpu_indices == (3, 1)
    assert _server(monkeypatch, None, env={"CUDA_VISIBLE_DEVICES": ""}).gpu_indices == ()
    with pytest.raises(ConfigError, match="not visible to this process"):
        _server(monkeypatch, "0,1", env={"CUDA_VISIBLE_DEVICES": "2"}).gpu_indices  # noqa: B018
    with pytest.raises(ConfigError, match="gpu_indices"):
        _server(monkeypatch, None, env={"CUDA_VISIBLE_DEVICES": "GPU-8a1c"}).gpu_indices  # noqa: B018


def test_meter_built_from_the_server_charges_only_its_gpu(monkeypatch):
    server = _server(monkeypatch, None, env={"CUDA_VISIBLE_DEVICES": "0"})
    clock = ManualClock()
    meter = ZeusMeter(clock=clock, gpus=SimulatedZeusGPUs([300.0, 70.0], clock), cpu=False,
                      gpu_indices=server.gpu_indices)
    clock.advance(10.0)
    assert _gpu_joules(meter.read().energy_j) == pytest.approx(3000.0)
