"""Issue 11, items 6 and 12: cumulative readings never go backwards (counter wraps, glitches, racing reads)."""

from __future__ import annotations

import logging
import math
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_energy.meters import CompositeMeter, ManualClock, MonotonicGuard, MonotonicMeter, Reading, ZeusMeter
from langchain_energy.meters.base import default_clock

RAPL_RANGE_UJ = 262_143_328_850.0  # max_energy_range_uj of a typical RAPL package zone
RAPL_RANGE_J = RAPL_RANGE_UJ / 1e6


class _RaplZone:
    """Double of one Zeus ``RAPLFile``: exposes the range that sysfs gives as ``max_energy_range_uj``."""

    def __init__(self) -> None:
        self.max_energy_range_uj = RAPL_RANGE_UJ


class _RaplCPU:
    def __init__(self) -> None:
        self.rapl_file, self.dram = _RaplZone(), _RaplZone()


class _Measurement:
    def __init__(self, cpu_mj: float, dram_mj: float | None) -> None:
        self.cpu_mj, self.dram_mj = cpu_mj, dram_mj


class SimulatedWrappingRAPL:
    """Double of Zeus's RAPL ``CPUs`` whose wraparound tracker lags behind the counter.

    Zeus adds ``max_energy_range_uj`` per wrap that its polling process has seen; a read between the wrap and
    the next poll comes back one whole range low. `lagging` switches that state on and off.
    """

    def __init__(self, watts: float, clock: ManualClock, start_j: float) -> None:
        self.watts, self.clock, self.start_j = watts, clock, start_j
        self.cpus = [_RaplCPU()]
        self.lagging = False

    def __len__(self) -> int:
        return 1

    def supports_get_dram_energy_consumption(self, i: int) -> bool:
        return True

    def get_total_energy_consumption(self, i: int) -> _Measurement:
        lag_j = RAPL_RANGE_J if self.lagging else 0.0
        cpu_j = self.start_j + self.watts * self.clock()
        dram_j = self.start_j + 0.1 * self.watts * self.clock()  # DRAM zone: a tenth of the package's watts
        return _Measurement((cpu_j - lag_j) * 1000.0, (dram_j - lag_j) * 1000.0)


class ScriptedCounterMeter:
    """A test double meter whose cumulative joules are a script of values, one per read (no known range)."""

    def __init__(self, values: list[float], clock: ManualClock, key: str = "gpu:0") -> None:
        self.values, self.clock, self.key, self.i = list(values), clock, key, 0

    def components(self) -> dict[str, str]:
        return {self.key: "measured:nvml"}

    def read(self) -> Reading:
        v = self.values[min(self.i, len(self.values) - 1)]
        self.i += 1
        return Reading(t=self.clock(), energy_j={self.key: v})

    def describe(self) -> dict[str, object]:
        return {}

    def close(self) -> None:
        pass


def _increments(values: list[float]) -> list[float]:
    return [b - a for a, b in zip(values, values[1:])]


# -- item 6: counters that go backwards ------------------------------------------------------------------

def test_zeus_rapl_read_just_after_a_wrap_is_corrected_with_the_counters_range():
    clock = ManualClock(0.0)
    rapl = SimulatedWrappingRAPL(watts=100.0, clock=clock, start_j=RAPL_RANGE_J - 50.0)
    meter = ZeusMeter(clock=clock, gpu=False, cpus=rapl)
    assert meter.counter_ranges_j() == {"cpu": pytest.approx(RAPL_RANGE_J), "dram": pytest.approx(RAPL_RANGE_J)}
    seen, dram = [], []
    for step in range(6):
        clock.advance(1.0)
        rapl.lagging = step in (0, 2, 3)  # wrapped, and Zeus's tracker has not seen it yet (first read too)
        r = meter.read()
        seen.append(r.energy_j["cpu"])
        dram.append(r.energy_j["dram"])
    # 100 W for one second per read, whatever the tracker's lag: no -131 kJ / +131 kJ pair
    assert _increments(seen) == pytest.approx([100.0] * 5)
    assert seen[-1] == pytest.approx(600.0)
    assert _increments(dram) == pytest.approx([10.0] * 5)


def test_a_counter_of_unknown_range_that_steps_back_is_held_and_warned_once(caplog):
    clock = ManualClock()
    counter = ScriptedCounterMeter([0.0, 10.0, 4.0, 5.0, 20.0, 30.0], clock)
    meter = MonotonicMeter(counter, reset_after_s=60.0)
    with caplog.at_level(logging.WARNING, logger="langchain_energy.meters.base"):
        seen = []
        for _ in range(6):
            clock.advance(1.0)
            seen.append(meter.read().energy_j["gpu:0"])
    # the two backward reads are dropped (previous value held); the counter then resumes where it was
    assert seen == [0.0, 10.0, 10.0, 10.0, 20.0, 30.0]
    warnings = [r for r in caplog.records if "went backwards" in r.getMessage()]
    assert len(warnings) == 1 and "gpu:0" in warnings[0].getMessage()
    assert meter.components() == counter.components()


def test_a_counter_that_stays_low_is_taken_as_reset_and_counted_from_there():
    clock = ManualClock()
    # the device's counter restarts at 0 after 100 J and keeps counting 10 J per second
    counter = ScriptedCounterMeter([50.0, 100.0, 0.0, 10.0, 20.0, 30.0, 40.0], clock)
    meter = MonotonicMeter(counter, reset_after_s=2.0)
    seen = []
    for _ in range(7):
        clock.advance(1.0)
        seen.append(meter.read().energy_j["gpu:0"])
    assert all(b >= a for a, b in zip(seen, seen[1:]))
    # held while it could be a glitch, then counted from the reset onwards: no energy lost, none invented
    assert seen == [50.0, 100.0, 100.0, 100.0, 120.0, 130.0, 140.0]


def test_guard_corrects_only_drops_that_look_like_a_wrap():
    guard = MonotonicGuard(ranges_j={"cpu": 1000.0})
    out = [guard.apply(Reading(t=float(i), energy_j={"cpu": v})).energy_j["cpu"]
           for i, v in enumerate([900.0, 990.0, 20.0, 60.0, 55.0, 70.0])]
    # 990 -> 20 is a wrap (+1000); 60 -> 55 is a 5 J glitch, far less than half the range: held, not +1000
    assert out == [900.0, 990.0, 1020.0, 1060.0, 1060.0, 1070.0]


_counter_value = st.one_of(st.floats(0.0, 2000.0), st.just(float("nan")), st.just(float("inf")))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 3.0), st.dictionaries(st.sampled_from(["cpu", "dram", "gpu:0"]),
                                                               _counter_value, min_size=1)),
                min_size=1, max_size=30))
def test_the_guards_one_pass_for_readings_that_move_forward_agrees_with_judging_each_counter(readings):
    """`apply` takes a shortcut when every counter moved forward; wraps, glitches, resets, unreadable and missing
    counters must come out exactly as when each counter is judged on its own."""
    fast = MonotonicGuard(ranges_j={"cpu": 1000.0}, reset_after_s=2.0)
    judged = MonotonicGuard(ranges_j={"cpu": 1000.0}, reset_after_s=2.0)
    judged._forward = lambda raw: None  # type: ignore[method-assign]
    t = 0.0
    for dt, energy in readings:
        t += dt
        got = fast.apply(Reading(t=t, energy_j=energy)).energy_j
        want = judged.apply(Reading(t=t, energy_j=energy)).energy_j
        assert got.keys() == want.keys()
        assert all(got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])) for k in got), (got, want)


def test_composite_guards_every_member_meter():
    clock = ManualClock()
    m = CompositeMeter([ScriptedCounterMeter([0.0, 5.0, 3.0, 6.0], clock)], clock=clock)
    assert [m.read().energy_j["gpu:0"] for _ in range(4)] == [0.0, 5.0, 5.0, 6.0]


# -- item 12: concurrent reads of a composite -----------------------------------------------------------

class SlowRealTimeMeter:
    """A test double of a meter whose read takes a moment (like an NVML or /proc read) on the real clock."""

    def __init__(self) -> None:
        self.clock = default_clock
        self._lock = threading.Lock()

    def components(self) -> dict[str, str]:
        return {"cpu": "estimated:replay"}

    def read(self) -> Reading:
        time.sleep(0.0005)  # a device round trip: lets another thread's read overtake this one
        with self._lock:
            t = self.clock()
            return Reading(t=t, energy_j={"cpu": 1000.0 * t})  # 1 kW from an arbitrary origin

    def describe(self) -> dict[str, object]:
        return {}

    def close(self) -> None:
        pass


def test_concurrent_composite_reads_are_monotonic_in_time_order():
    meter = CompositeMeter([SlowRealTimeMeter()])
    readings: list[Reading] = []
    lock = threading.Lock()

    def reader() -> None:
        for _ in range(150):
            r = meter.read()
            with lock:
                readings.append(r)

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ordered = sorted(readings, key=lambda r: r.t)
    values = [r.energy_j["cpu"] for r in ordered]
    drops = [(a, b) for a, b in zip(values, values[1:]) if b < a]
    assert not drops, f"{len(drops)} readings lower than the one before them, e.g. {drops[:3]}"
