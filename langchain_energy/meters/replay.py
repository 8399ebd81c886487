"""A test double: plays back a known power trace on a clock the test controls.

Because the trace is piecewise-constant watts, the exact joules between any two instants are known, so tests
can check attribution and the handler against ground truth instead of against another estimate.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

from langchain_energy.errors import ConfigError
from langchain_energy.meters.base import Clock, ManualClock, Reading

Segments = Sequence[tuple[float, float]]


class PowerTrace:
    """Piecewise-constant power of one component: ``[(t0, w0), (t1, w1), ...]`` means `w0` watts from `t0`.

    Before the first breakpoint the power is 0 W; after the last it stays at the last value.

    Example:
        >>> trace = PowerTrace([(0.0, 10.0), (2.0, 30.0)])
        >>> trace.energy_between(1.0, 3.0)
        40.0
    """

    def __init__(self, segments: Segments) -> None:
        if not segments:
            raise ConfigError("a power trace needs at least one (time, watts) segment")
        times = [float(t) for t, _ in segments]
        if any(b <= a for a, b in zip(times, times[1:])):
            raise ConfigError(f"power trace times must be strictly increasing, got {times}")
        watts = [float(w) for _, w in segments]
        if any(w < 0 for w in watts):
            raise ConfigError(f"power trace watts must be >= 0, got {watts}")
        self.times = times
        self.watts = watts
        # Cumulative joules at each breakpoint, so energy_at is one bisect and one multiply.
        self._cum = [0.0]
        for i in range(1, len(times)):
            self._cum.append(self._cum[-1] + watts[i - 1] * (times[i] - times[i - 1]))

    def power_at(self, t: float) -> float:
        """Watts at instant `t`."""
        i = bisect.bisect_right(self.times, t) - 1
        return 0.0 if i < 0 else self.watts[i]

    def energy_at(self, t: float) -> float:
        """Cumulative joules from the first breakpoint to `t`."""
        i = bisect.bisect_right(self.times, t) - 1
        if i < 0:
            return 0.0
        return self._cum[i] + self.watts[i] * (t - self.times[i])

    def energy_between(self, t0: float, t1: float) -> float:
        """Exact joules between two instants."""
        return self.energy_at(t1) - self.energy_at(t0)


class ReplayMeter:
    """A meter that replays power traces: the test double for exact energy checks.

    Args:
        traces: component key (``"cpu"``, ``"dram"``, ``"gpu:0"``, ...) -> power trace or its segments.
        clock: the time source; a `ManualClock` by default so tests move time explicitly.
        provenance: label per component (a string applies to all); ``estimated:replay`` by default.
        gpu_util: optional constant utilization (percent) per GPU index to report.

    Example:
        >>> clock = ManualClock()
        >>> meter = ReplayMeter({"cpu": [(0.0, 20.0)], "gpu:0": [(0.0, 100.0)]}, clock=clock)
        >>> _ = clock.advance(2.0)
        >>> dict(meter.read().energy_j)
        {'cpu': 40.0, 'gpu:0': 200.0}
    """

    def __init__(
        self,
        traces: Mapping[str, PowerTrace | Segments],
        clock: Clock | None = None,
        provenance: str | Mapping[str, str] = "estimated:replay",
        gpu_util: Mapping[int, float] | None = None,
    ) -> None:
        if not traces:
            raise ConfigError("ReplayMeter needs at least one component trace")
        self.traces = {k: v if isinstance(v, PowerTrace) else PowerTrace(v) for k, v in traces.items()}
        self.clock: Clock = clock if clock is not None else ManualClock()
        if isinstance(provenance, str):
            self._prov = {k: provenance for k in self.traces}
        else:
            missing = set(self.traces) - set(provenance)
            if missing:
                raise ConfigError(f"ReplayMeter provenance missing for {sorted(missing)}")
            self._prov = {k: provenance[k] for k in self.traces}
        self._gpu_util = dict(gpu_util or {})
        self.reads = 0

    def components(self) -> dict[str, str]:
        """Each replayed component with its label."""
        return dict(self._prov)

    def read(self) -> Reading:
        """Cumulative joules of every trace at the clock's current time."""
        t = self.clock()
        self.reads += 1
        power = {int(k.split(":", 1)[1]): tr.power_at(t) for k, tr in self.traces.items() if k.startswith("gpu:")}
        return Reading(
            t=t,
            energy_j={k: tr.energy_at(t) for k, tr in self.traces.items()},
            gpu_util=dict(self._gpu_util),
            gpu_power_w=power,
        )

    def energy_between(self, t0: float, t1: float) -> dict[str, float]:
        """Ground truth: exact joules per component between two instants."""
        return {k: tr.energy_between(t0, t1) for k, tr in self.traces.items()}

    def describe(self) -> dict[str, object]:
        """The traces, for the record."""
        return {"replay": {k: list(zip(tr.times, tr.watts)) for k, tr in self.traces.items()}}

    def close(self) -> None:
        """Nothing to release."""
