"""Meters: the replay double, the labelled estimate, Zeus's device layer (through a simulated double), auto choice."""

from __future__ import annotations

import os
import time

import pytest

from langchain_energy.accounting import group_provenance
from langchain_energy.errors import ConfigError, MeterError
from langchain_energy.meters import (
    CompositeMeter,
    EstimatedMeter,
    ManualClock,
    PowerModel,
    PowerTrace,
    ReplayMeter,
    ZeusMeter,
    auto_meter,
)
from langchain_energy.timeline import Timeline


class SimulatedZeusGPUs:
    """Double of Zeus's ``GPUs`` object (zeus.device.get_gpus()): NVML-style mJ counters that we drive."""

    def __init__(self, watts: list[float], clock: ManualClock, counter: list[bool] | None = None) -> None:
        self.watts, self.clock = watts, clock
        self.counter = counter or [True] * len(watts)
        self.offset_mj = [123_456_789.0 + i for i in range(len(watts))]  # counters start at driver load

    def __len__(self) -> int:
        return len(self.watts)

    def supports_get_total_energy_consumption(self, i: int) -> bool:
        return self.counter[i]

    def get_total_energy_consumption(self, i: int) -> int:
        return int(self.offset_mj[i] + self.watts[i] * self.clock() * 1000)

    def get_instant_power_usage(self, i: int) -> int:
        return int(self.watts[i] * 1000)

    def get_name(self, i: int) -> str:
        return "Simulated H100"

    def get_utilization(self, i: int) -> float:
        return 50.0


class _Measurement:
    def __init__(self, cpu_mj: float, dram_mj: float | None) -> None:
        self.cpu_mj, self.dram_mj = cpu_mj, dram_mj


class SimulatedRAPLCPUs:
    """Double of Zeus's ``CPUs`` object (RAPL packages with DRAM zones)."""

    def __init__(self, packages: int, cpu_w: float, dram_w: float, clock: ManualClock) -> None:
        self.n, self.cpu_w, self.dram_w, self.clock = packages, cpu_w, dram_w, clock

    def __len__(self) -> int:
        return self.n

    def supports_get_dram_energy_consumption(self, i: int) -> bool:
        return True

    def get_total_energy_consumption(self, i: int) -> _Measurement:
        t = self.clock()
        return _Measurement(1e6 + self.cpu_w * t * 1000, 5e5 + self.dram_w * t * 1000)


# -- replay ---------------------------------------------------------------------------------------------

def test_replay_meter_integrates_piecewise_power_exactly():
    clock = ManualClock()
    meter = ReplayMeter({"cpu": [(0.0, 10.0), (2.0, 50.0)], "gpu:0": [(1.0, 100.0)]}, clock=clock)
    assert meter.read().energy_j == {"cpu": 0.0, "gpu:0": 0.0}
    clock.set(3.0)
    r = meter.read()
    assert r.energy_j == {"cpu": 10.0 * 2 + 50.0 * 1, "gpu:0": 200.0}
    assert r.gpu_power_w == {0: 100.0}
    assert meter.energy_between(1.0, 3.0) == {"cpu": 60.0, "gpu:0": 200.0}
    assert meter.components() == {"cpu": "estimated:replay", "gpu:0": "estimated:replay"}


def test_replay_trace_rejects_bad_segments():
    with pytest.raises(ConfigError):
        PowerTrace([])
    with pytest.raises(ConfigError):
        PowerTrace([(1.0, 5.0), (1.0, 6.0)])
    with pytest.raises(ConfigError):
        PowerTrace([(0.0, -1.0)])
    with pytest.raises(ConfigError):
        ReplayMeter({"cpu": [(0.0, 1.0)]}, provenance={"gpu:0": "measured:nvml"})


def test_manual_clock_never_goes_back():
    clock = ManualClock(5.0)
    with pytest.raises(ValueError):
        clock.advance(-1.0)
    with pytest.raises(ValueError):
        clock.set(4.0)


# -- estimate -------------------------------------------------------------------------------------------

def test_power_model_parameters_are_visible_and_validated():
    m = PowerModel(cpu_tdp_w=120.0, idle_fraction=0.25, dram_w_per_gib=0.5, dram_gib=32.0, name="lab-box")
    assert m.provenance == "estimated:lab-box"
    assert m.cpu_power_w(0.0) == pytest.approx(30.0)
    assert m.cpu_power_w(1.0) == pytest.approx(120.0)
    assert m.cpu_power_w(7.0) == pytest.approx(120.0)  # utilization is clamped
    assert m.dram_power_w() == pytest.approx(16.0)
    assert m.to_dict()["resolved_tdp_w"] == 120.0
    derived = PowerModel(watts_per_core=7.0)
    assert derived.tdp_w() == pytest.approx(7.0 * os.cpu_count())
    for bad in (dict(idle_fraction=1.5), dict(cpu_tdp_w=0.0), dict(watts_per_core=-1.0),
                dict(dram_w_per_gib=-0.1), dict(name="a:b"), dict(dram_gib=-1.0)):
        with pytest.raises(ConfigError):
            PowerModel(**bad)


def test_estimated_meter_stays_within_its_models_bounds():
    model = PowerModel(cpu_tdp_w=100.0, idle_fraction=0.2, dram_w_per_gib=1.0, dram_gib=8.0)
    meter = EstimatedMeter(model)
    assert meter.components() == {"cpu": "estimated:linear-tdp/process-tree", "dram": "estimated:linear-tdp/machine"}
    r0 = meter.read()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # keep one core busy so utilization is well above zero
        sum(range(1000))
    r1 = meter.read()
    dt = r1.t - r0.t
    cpu = r1.energy_j["cpu"] - r0.energy_j["cpu"]
    assert 20.0 * dt - 1e-9 <= cpu <= 100.0 * dt + 1e-9
    assert r1.energy_j["dram"] - r0.energy_j["dram"] == pytest.approx(8.0 * dt)
    # a busy core in this process (inside the metered process tree) gives a strictly positive utilization
    assert meter.last_utilization > 0.0
    assert meter.idle_power_w() == {"cpu": pytest.approx(20.0), "dram": pytest.approx(8.0)}
    assert meter.describe()["estimated"]["cpu_tdp_w"] == 100.0


class ScriptedCpuTimes:
    """Test double of the machine's cumulative CPU times (`cpu_busy_and_total`): set `busy` and `total`; counts
    the reads."""

    def __init__(self) -> None:
        self.reads, self.busy, self.total = 0, 0.0, 0.0

    def __call__(self) -> tuple[float, float]:
        self.reads += 1
        return self.busy, self.total


def _estimate_on_scripted_cpu(monkeypatch) -> tuple[EstimatedMeter, ManualClock, ScriptedCpuTimes]:
    """A 100 W CPU estimate (no idle draw, no DRAM) with a 50 ms utilization window, on a manual clock and
    scripted CPU times."""
    import langchain_energy.meters.estimated as estimated

    times = ScriptedCpuTimes()
    monkeypatch.setattr(estimated, "cpu_busy_and_total", times)
    clock = ManualClock(0.0)
    meter = EstimatedMeter(PowerModel(cpu_tdp_w=100.0, idle_fraction=0.0, dram_gib=0.0), scope="machine", clock=clock,
                           utilization_window_s=0.05)
    return meter, clock, times


def test_estimated_meter_reads_cpu_times_at_most_once_per_utilization_window(monkeypatch):
    meter, clock, busy = _estimate_on_scripted_cpu(monkeypatch)  # a machine whose one CPU runs half busy
    assert meter.resolution_s == 0.05
    clock.advance(1.0)
    busy.busy, busy.total = 0.5, 1.0
    reads = busy.reads
    assert meter.read().energy_j["cpu"] == pytest.approx(50.0)
    clock.advance(meter.resolution_s / 4)  # within the window: the last utilization carries on
    assert meter.read().energy_j["cpu"] == pytest.approx(50.0 + 50.0 * meter.resolution_s / 4)
    assert busy.reads == reads + 1
    clock.advance(meter.resolution_s)
    meter.read()
    assert busy.reads == reads + 2
    with pytest.raises(ConfigError, match="at least one clock tick"):
        EstimatedMeter(utilization_window_s=0.0)


def test_estimated_meter_component_choice():
    assert EstimatedMeter(components=("dram",)).components() == {"dram": "estimated:linear-tdp/machine"}
    with pytest.raises(ConfigError):
        EstimatedMeter(components=("gpu:0",))


# -- zeus ------------------------------------------------------------------------------------------------

def test_zeus_meter_reads_counters_since_it_started():
    clock = ManualClock(100.0)
    gpus = SimulatedZeusGPUs([300.0, 150.0], clock)
    cpus = SimulatedRAPLCPUs(2, cpu_w=60.0, dram_w=10.0, clock=clock)
    meter = ZeusMeter(clock=clock, gpus=gpus, cpus=cpus)
    assert meter.components() == {"gpu:0": "measured:nvml", "gpu:1": "measured:nvml",
                                  "cpu": "measured:rapl", "dram": "measured:rapl"}
    clock.advance(2.0)
    r = meter.read()
    assert r.energy_j["gpu:0"] == pytest.approx(600.0)
    assert r.energy_j["gpu:1"] == pytest.approx(300.0)
    assert r.energy_j["cpu"] == pytest.approx(2 * 60.0 * 2)  # two packages
    assert r.energy_j["dram"] == pytest.approx(2 * 10.0 * 2)
    assert r.gpu_power_w == {0: 300.0, 1: 150.0} and r.gpu_util == {0: 50.0, 1: 50.0}
    assert meter.describe()["zeus"]["gpus"] == {0: "Simulated H100", 1: "Simulated H100"}


def test_zeus_meter_skips_gpus_without_counter_and_checks_indices():
    clock = ManualClock()
    gpus = SimulatedZeusGPUs([300.0, 150.0], clock, counter=[False, True])
    assert ZeusMeter(clock=clock, gpus=gpus, cpu=False).components() == {"gpu:1": "measured:nvml"}
    with pytest.raises(MeterError):
        ZeusMeter(clock=clock, gpus=gpus, gpu_indices=[5], cpu=False)


def test_zeus_meter_on_this_machine_reports_only_what_exists():
    meter = ZeusMeter()
    comps = meter.components()
    if not os.path.exists("/sys/class/powercap/intel-rapl"):
        assert "cpu" not in comps and "dram" not in comps
    assert set(meter.read().energy_j) == set(comps)


def test_auto_meter_prefers_counters_and_falls_back_to_the_estimate():
    clock = ManualClock()
    zm = ZeusMeter(clock=clock, gpus=SimulatedZeusGPUs([200.0], clock), cpu=False)
    meter = auto_meter(clock=clock, zeus_meter=zm, power_model=PowerModel(cpu_tdp_w=50.0, dram_gib=4.0))
    assert meter.components() == {"gpu:0": "measured:nvml", "cpu": "estimated:linear-tdp/process-tree",
                                  "dram": "estimated:linear-tdp/machine"}
    clock.advance(1.0)
    r = meter.read()
    assert r.energy_j["gpu:0"] == pytest.approx(200.0)
    assert r.energy_j["dram"] == pytest.approx(4.0 * 0.375)
    assert group_provenance(meter.components()) == {
        "cpu": "estimated:linear-tdp/process-tree", "gpu": "measured:nvml@gpu0", "dram": "estimated:linear-tdp/machine"}
    # measured RAPL wins over the estimate when present
    zm2 = ZeusMeter(clock=clock, gpus=SimulatedZeusGPUs([200.0], clock),
                    cpus=SimulatedRAPLCPUs(1, 50.0, 5.0, clock))
    assert auto_meter(clock=clock, zeus_meter=zm2).components()["cpu"] == "measured:rapl"
    # forcing the estimate and switching components off
    forced = auto_meter(cpu="estimated", dram="off", gpu="off", clock=clock, zeus_meter=zm2)
    assert forced.components() == {"cpu": "estimated:linear-tdp/process-tree"}


def test_auto_meter_refuses_impossible_choices():
    clock = ManualClock()
    no_devices = ZeusMeter(clock=clock, gpu=False, cpu=False)
    with pytest.raises(MeterError, match="no NVML GPU energy counter"):
        auto_meter(gpu="zeus", clock=clock, zeus_meter=no_devices)
    with pytest.raises(MeterError, match="RAPL"):
        auto_meter(cpu="zeus", clock=clock, zeus_meter=no_devices)
    with pytest.raises(ConfigError):
        auto_meter(gpu="estimated")
    with pytest.raises(ConfigError):
        auto_meter(cpu="rapl")  # type: ignore[arg-type]


def test_auto_meter_on_this_machine_labels_its_estimate():
    meter = auto_meter()
    groups = group_provenance(meter.components())
    if not os.path.exists("/sys/class/powercap/intel-rapl"):
        assert groups["cpu"].startswith("estimated:") and groups["dram"].startswith("estimated:")
    assert all(p == "unavailable" or p.startswith(("measured:", "estimated:")) for p in groups.values())


def test_composite_takes_each_component_from_its_first_owner():
    clock = ManualClock()
    a = ReplayMeter({"cpu": [(0.0, 1.0)]}, clock=clock, provenance="measured:rapl")
    b = ReplayMeter({"cpu": [(0.0, 99.0)], "dram": [(0.0, 2.0)]}, clock=clock)
    m = CompositeMeter([a, b], clock=clock)
    clock.advance(1.0)
    assert dict(m.read().energy_j) == {"cpu": 1.0, "dram": 2.0}
    assert m.components() == {"cpu": "measured:rapl", "dram": "estimated:replay"}
    assert m.idle_power_w() is None  # replay meters have no idle model


def test_with_a_sampler_measuring_utilization_a_calls_edge_reads_no_cpu_times(monkeypatch):
    """A timeline's sampler measures utilization at each tick (`measure_utilization`); reads in between (a call's
    edges) carry it on and read no CPU times, unless the sampler has fallen far behind."""
    meter, clock, busy = _estimate_on_scripted_cpu(monkeypatch)
    clock.advance(0.1)
    busy.busy, busy.total = 0.05, 0.1
    meter.measure_utilization()  # the sampler's tick: half busy
    reads = busy.reads
    clock.advance(0.2)  # four windows later, the sampler has not ticked again
    busy.busy, busy.total = 0.25, 0.3
    assert meter.read().energy_j["cpu"] == pytest.approx(50.0 * 0.3)  # the measured half-busy carries on
    assert busy.reads == reads
    clock.advance(1.0)  # the sampler is far behind: the edge measures for itself
    busy.busy, busy.total = 1.25, 1.3
    meter.read()
    assert busy.reads == reads + 1
    assert meter.last_utilization == pytest.approx(1.0)


def test_the_timelines_sampler_measures_utilization_at_its_ticks():
    measured = []

    class Meter(ReplayMeter):
        def measure_utilization(self) -> None:
            measured.append(self.clock())

    tl = Timeline(CompositeMeter([Meter({"cpu": [(0.0, 10.0)]})]), interval_s=0.05)
    tl.acquire()
    try:
        time.sleep(0.4)
    finally:
        tl.release()
    assert len(measured) >= 3
