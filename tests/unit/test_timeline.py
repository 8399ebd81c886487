"""The shared sampler: interpolation, bounded memory that keeps every joule, sharing and clean stop."""

from __future__ import annotations

import math
import threading
import time

import pytest

from langchain_energy.errors import ConfigError
from langchain_energy.meters import ManualClock, ReplayMeter
from langchain_energy import timeline as timeline_mod
from langchain_energy.timeline import Samples, Timeline, interpolate, shared_timeline


def test_energy_between_interpolates_between_samples():
    clock = ManualClock()
    meter = ReplayMeter({"cpu": [(0.0, 10.0)], "gpu:0": [(0.0, 100.0), (5.0, 0.0)]}, clock=clock)
    tl = Timeline(meter)
    for t in (0.0, 5.0, 10.0):
        clock.set(t)
        tl.sample_now()
    e = tl.energy_between(1.0, 7.5)
    assert e["cpu"] == pytest.approx(65.0)
    assert e["gpu:0"] == pytest.approx(400.0)
    # outside the samples nothing more is known: clamped
    assert tl.energy_between(10.0, 20.0) == {"cpu": 0.0, "gpu:0": 0.0}
    with pytest.raises(ConfigError):
        tl.energy_between(2.0, 1.0)


def test_thinning_bounds_memory_and_keeps_every_joule():
    clock = ManualClock()
    meter = ReplayMeter({"cpu": [(0.0, 3.0), (50.0, 7.0), (120.0, 1.0)]}, clock=clock)
    tl = Timeline(meter, max_samples=16)
    for k in range(1, 1001):
        tl.sample_now()
        clock.set(k * 0.2)
    tl.sample_now()
    assert len(tl) <= 16
    snap = tl.snapshot()
    assert snap.t[0] == 0.0 and snap.t[-1] == pytest.approx(200.0)
    # the whole run's energy is intact; only where inside it was spent got coarser
    assert tl.energy_between(0.0, 200.0)["cpu"] == pytest.approx(meter.energy_between(0.0, 200.0)["cpu"])


def test_same_instant_sample_replaces_and_time_never_goes_back():
    clock = ManualClock()
    tl = Timeline(ReplayMeter({"cpu": [(0.0, 1.0)]}, clock=clock))
    tl.sample_now()
    tl.sample_now()
    assert len(tl) == 1


def test_acquire_release_share_one_sampler_and_stop_cleanly():
    meter = ReplayMeter({"cpu": [(0.0, 5.0)]}, clock=time.monotonic)
    tl = shared_timeline(meter, interval_s=0.01)
    assert shared_timeline(meter, interval_s=0.5) is tl  # one sampler per meter, first interval wins
    tl.acquire()
    tl.acquire()
    assert tl.running and tl.users == 2
    time.sleep(0.15)
    tl.release()
    assert tl.running  # still held by the other user
    n = len(tl)
    assert n >= 5  # about 10 samples in 0.15 s at 100 Hz; the machine may be busy
    tl.release()
    assert not tl.running and tl.users == 0
    stopped = len(tl)
    time.sleep(0.05)
    assert len(tl) == stopped  # no sampling after the last release
    tl.release()  # extra releases are harmless
    assert [t.name for t in threading.enumerate()].count("energy-timeline") == 0


def test_a_failing_meter_is_counted_not_raised():
    class BrokenMeter(ReplayMeter):
        def read(self):
            raise OSError("counter gone")

    tl = Timeline(BrokenMeter({"cpu": [(0.0, 1.0)]}))
    tl.sample_now()
    assert tl.errors == 1 and "counter gone" in (tl.last_error or "")
    assert tl.energy_between(0.0, 1.0) == {"cpu": 0.0}


def test_bad_configuration_is_refused():
    meter = ReplayMeter({"cpu": [(0.0, 1.0)]})
    with pytest.raises(ConfigError):
        Timeline(meter, interval_s=0.0)
    with pytest.raises(ConfigError):
        Timeline(meter, max_samples=2)


def test_interpolate_edges():
    assert interpolate([], [], 1.0) == 0.0
    assert interpolate([1.0, 3.0], [10.0, 30.0], 0.0) == 10.0
    assert interpolate([1.0, 3.0], [10.0, 30.0], 2.0) == 20.0
    assert interpolate([1.0, 3.0], [10.0, 30.0], 9.0) == 30.0


def test_concurrent_reads_while_sampling():
    meter = ReplayMeter({"cpu": [(0.0, 2.0)]}, clock=time.monotonic)
    tl = Timeline(meter, interval_s=0.002, max_samples=64)
    tl.acquire()
    errors = []

    def reader():
        try:
            for _ in range(300):
                t1 = time.monotonic()
                e = tl.energy_between(t1 - 0.05, t1)["cpu"]
                assert 0.0 <= e <= 2.0 * 0.05 + 1e-9
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tl.release()
    assert not errors and len(tl) <= 64


def test_cpu_util_is_recorded_per_sample_and_stays_exact_through_thinning(monkeypatch):
    # A scripted machine: one more CPU second per sample, busy for a varying share of it.
    share = [0.1, 0.9, 0.5, 0.0, 1.0, 0.3, 0.7]
    busy = [0.0]
    for k in range(1, 200):
        busy.append(busy[-1] + share[k % len(share)])
    calls = iter(range(200))

    def fake_cpu():
        k = next(calls)
        return busy[k], float(k)

    monkeypatch.setattr(timeline_mod, "_cpu_busy_total", fake_cpu)
    clock = ManualClock()
    tl = Timeline(ReplayMeter({"cpu": [(0.0, 1.0)]}, clock=clock), max_samples=16)
    for k in range(200):
        clock.set(float(k))
        tl.sample_now()
    snap = tl.snapshot()
    assert len(tl) <= 16 and len(snap.cpu_util) == len(snap.t)
    assert math.isnan(snap.cpu_util[0])  # nothing precedes the first sample
    # Between two kept samples the value is the utilization over all the dropped ones in between.
    ks = [int(t) for t in snap.t]
    for i in range(1, len(ks)):
        expected = 100.0 * (busy[ks[i]] - busy[ks[i - 1]]) / (ks[i] - ks[i - 1])
        assert snap.cpu_util[i] == pytest.approx(expected)


def test_cpu_util_of_the_real_machine_is_a_percentage_per_sample():
    meter = ReplayMeter({"cpu": [(0.0, 5.0)]}, clock=time.monotonic)
    tl = Timeline(meter, interval_s=0.02, max_samples=8)  # small bound: thinning happens too
    tl.acquire()
    deadline = time.monotonic() + 0.4
    while time.monotonic() < deadline:  # keep one core busy so there is something to measure
        sum(range(1000))
    tl.release()
    snap = tl.snapshot()
    assert len(snap.cpu_util) == len(snap.t) >= 4
    measured = [u for u in snap.cpu_util if not math.isnan(u)]
    assert measured and all(0.0 <= u <= 100.0 for u in measured)
    assert max(measured) > 0.0


def test_samples_built_without_cpu_util_still_work():
    snap = Samples(t=[0.0, 1.0], energy_j={"cpu": [0.0, 2.0]}, gpu_util={})
    assert snap.cpu_util == [] and snap.cumulative_at(0.5) == {"cpu": 1.0}
