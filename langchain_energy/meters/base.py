"""The meter interface: cumulative joules per component, each with its provenance.

A meter answers one question, "how many joules has each component used so far?", as a `Reading`.
Components are named ``"cpu"``, ``"dram"`` and ``"gpu:<index>"``. Readings are cumulative so that any two of
them give the energy between their instants by subtraction, and so that dropping readings (for bounded memory)
loses time resolution but never energy.

Provenance strings say where each number comes from: ``measured:nvml``, ``measured:rapl``,
``estimated:<model>`` or ``unavailable``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from langchain_energy.errors import ConfigError

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

#: The components reported in records, in display order. GPUs are summed over indices for ``"gpu"``.
COMPONENTS: tuple[str, ...] = ("cpu", "gpu", "dram")

UNAVAILABLE = "unavailable"


def is_measured(label: str) -> bool:
    """Whether a provenance label is a measurement (not an estimate, not unavailable).

    Example:
        >>> is_measured("measured:nvml"), is_measured("estimated:linear-tdp/machine")
        (True, False)
    """
    return label.startswith("measured:")


def component_group(key: str) -> str:
    """Map a meter component key to its record column group: ``"gpu:3"`` -> ``"gpu"``.

    Example:
        >>> component_group("gpu:1"), component_group("cpu")
        ('gpu', 'cpu')
    """
    return key.split(":", 1)[0]


@dataclass(frozen=True)
class Reading:
    """One reading of a meter.

    Attributes:
        t: the meter's clock (seconds, monotonic) at the reading.
        energy_j: cumulative joules per component key since the meter started.
        gpu_util: GPU utilization in percent per GPU index, where the device reports it.
        gpu_power_w: instantaneous GPU power in watts per GPU index, where the device reports it.
    """

    t: float
    energy_j: Mapping[str, float]
    gpu_util: Mapping[int, float] = field(default_factory=dict)
    gpu_power_w: Mapping[int, float] = field(default_factory=dict)


@runtime_checkable
class Meter(Protocol):
    """What the timeline needs from a source of energy readings."""

    clock: Clock

    def components(self) -> dict[str, str]:
        """Component key -> provenance string, for every component this meter reports."""
        ...

    def read(self) -> Reading:
        """Read cumulative joules now. Called from one sampler thread, but must be safe from any."""
        ...

    def describe(self) -> dict[str, object]:
        """Parameters worth recording next to results (power model, devices)."""
        ...

    def close(self) -> None:
        """Release device handles."""
        ...


class ManualClock:
    """A clock that only moves when told to: the replay meter's and the tests' notion of time.

    Example:
        >>> clock = ManualClock()
        >>> clock.advance(1.5)
        1.5
        >>> clock()
        1.5
    """

    def __init__(self, start: float = 0.0) -> None:
        self._t = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._t

    def advance(self, dt: float) -> float:
        """Move the clock forward by `dt` seconds (never backwards) and return the new time."""
        if dt < 0:
            raise ValueError(f"a clock cannot go backwards (dt={dt})")
        with self._lock:
            self._t += dt
            return self._t

    def set(self, t: float) -> float:
        """Move the clock to `t`, which must not be earlier than now."""
        with self._lock:
            if t < self._t:
                raise ValueError(f"a clock cannot go backwards ({t} < {self._t})")
            self._t = float(t)
            return self._t


#: The package's one clock for timelines and handler timestamps (the C function itself: it is read at every edge).
default_clock: Clock = time.monotonic


class MonotonicGuard:
    """Keeps cumulative counters from going backwards: corrects wraps, holds glitches, rebases resets.

    A cumulative counter that reads lower than before is one of three things, and each has one right answer:

    - a **wrap** of a counter whose range is known (RAPL's ``max_energy_range_uj``; Zeus adds it per wrap
      that its polling tracker has seen, so a read taken between the wrap and the next poll comes back one
      range low): add the smallest number of ranges that brings it back up, for this read only;
    - a **glitch** (a racing read, a read that steps back a little): drop it and hold the previous value;
    - a **reset** (the device's counter restarted): after it has stayed low for `reset_after_s`, count on
      from the lowest value it was seen at, so energy after the reset is neither lost nor invented.

    Each component is warned about once, on its first backwards read that is not a wrap. Output never
    decreases, whatever the input.

    Args:
        ranges_j: the wrap range in joules per component key, where the counter's range is known.
        reset_after_s: how long (on the readings' clock) a counter must stay below its previous value before
            it is taken as reset rather than glitching.
        name: what the warnings call the meter.

    Example:
        >>> guard = MonotonicGuard(ranges_j={"cpu": 1000.0})
        >>> [guard.apply(Reading(t=float(i), energy_j={"cpu": v})).energy_j["cpu"]
        ...  for i, v in enumerate([900.0, 990.0, 20.0, 15.0, 40.0])]
        [900.0, 990.0, 1020.0, 1020.0, 1040.0]
    """

    def __init__(
        self,
        ranges_j: Mapping[str, float] | None = None,
        reset_after_s: float = 5.0,
        name: str = "meter",
    ) -> None:
        ranges = dict(ranges_j or {})
        bad = {k: r for k, r in ranges.items() if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0)}
        if bad:
            raise ConfigError(f"counter ranges must be positive finite joules, got {bad}")
        if not reset_after_s >= 0:
            raise ConfigError(f"reset_after_s must be >= 0 seconds, got {reset_after_s!r}")
        self.ranges_j = ranges
        self.reset_after_s = float(reset_after_s)
        self.name = name
        self._lock = threading.Lock()
        self._last_in: dict[str, float] = {}  # last accepted input, wraps undone
        self._offset: dict[str, float] = {}  # added to the input after a reset
        self._last_out: dict[str, float] = {}
        self._low_since: dict[str, float] = {}  # time of the first read of an unresolved backwards run
        self._low_min: dict[str, float] = {}  # lowest input seen in that run
        self._warned: set[str] = set()
        self.wraps_corrected = 0
        self.reads_dropped = 0

    def apply(self, reading: Reading) -> Reading:
        """The reading with every component made non-decreasing with respect to the previous ones."""
        with self._lock:
            energy = self._forward(reading.energy_j)
            if energy is None:
                energy = {k: self._one(k, float(v), reading.t) for k, v in reading.energy_j.items()}
        return Reading(t=reading.t, energy_j=energy, gpu_util=reading.gpu_util, gpu_power_w=reading.gpu_power_w)

    def _forward(self, raw: Mapping[str, float]) -> dict[str, float] | None:
        """The common case in one pass (it runs at every call's end): every counter known, finite and not below
        its last value, none in a backwards run. None when any of that fails (`_one` then judges each)."""
        if self._low_since or len(raw) != len(self._last_out):
            return None
        last_in, offset, last_out = self._last_in, self._offset, self._last_out
        out: dict[str, float] = {}
        for k, v in raw.items():
            previous = last_in.get(k)
            if previous is None or not previous <= v < math.inf:
                return None
            out[k] = max(v + offset[k], last_out[k])
        for k, v in raw.items():
            last_in[k] = float(v)
        last_out.update(out)
        return out

    def _one(self, key: str, raw: float, t: float) -> float:
        if key not in self._last_out:
            if not math.isfinite(raw):
                return raw  # nothing to hold yet; the first finite read starts the series
            self._last_in[key], self._offset[key], self._last_out[key] = raw, 0.0, raw
            return raw
        if not math.isfinite(raw):
            self._drop(key, raw)
            return self._last_out[key]
        last_in = self._last_in[key]
        span = self.ranges_j.get(key)
        if raw < last_in and span is not None:
            # A counter moves forward by far less than half its range between two reads, so read the drop
            # modulo the range: a short way forward is a wrap (or a read between a wrap and Zeus's tracker
            # seeing it); a short way back is a glitch like any other.
            forward = (raw - last_in) % span
            if forward < span / 2:
                raw = last_in + forward
                self.wraps_corrected += 1
        if raw >= last_in:
            self._low_since.pop(key, None)
            self._low_min.pop(key, None)
            self._last_in[key] = raw
            out = raw + self._offset[key]
        else:
            self._drop(key, raw)
            since = self._low_since.setdefault(key, t)
            low = self._low_min[key] = min(self._low_min.get(key, raw), raw)
            if t - since >= self.reset_after_s:
                # Low for too long to be a glitch: the counter restarted. Count on from its lowest value.
                logger.warning("%s: counter %s stayed below its previous value for %.3g s; taken as a reset",
                               self.name, key, t - since)
                self._offset[key] = self._last_out[key] - low
                self._last_in[key] = raw
                self._low_since.pop(key, None)
                self._low_min.pop(key, None)
                out = raw + self._offset[key]
            else:
                out = self._last_out[key]
        out = max(out, self._last_out[key])  # float rounding of offsets must not step back either
        self._last_out[key] = out
        return out

    def _drop(self, key: str, raw: float) -> None:
        self.reads_dropped += 1
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "%s: cumulative counter %s went backwards or was unreadable (%.6g J -> %.6g J); the read is "
                "dropped and the previous value held (further drops of %s are not logged)",
                self.name, key, self._last_in[key], raw, key,
            )


class MonotonicMeter:
    """Any meter behind a `MonotonicGuard`: its cumulative readings never go backwards.

    Args:
        meter: the meter to guard.
        ranges_j: wrap ranges per component in joules; by default the meter's own ``counter_ranges_j()`` when
            it has one.
        reset_after_s: see `MonotonicGuard`.

    Example:
        >>> from langchain_energy.meters.replay import ReplayMeter
        >>> guarded = MonotonicMeter(ReplayMeter({"cpu": [(0.0, 5.0)]}))
        >>> guarded.components()
        {'cpu': 'estimated:replay'}
    """

    def __init__(self, meter: Meter, ranges_j: Mapping[str, float] | None = None, reset_after_s: float = 5.0) -> None:
        self.meter = meter
        self.clock = meter.clock
        if ranges_j is None:
            ranges_j = counter_ranges(meter)
        self.guard = MonotonicGuard(ranges_j, reset_after_s=reset_after_s, name=type(meter).__name__)

    def components(self) -> dict[str, str]:
        """The guarded meter's components and provenance, unchanged."""
        return self.meter.components()

    def read(self) -> Reading:
        """The guarded meter's reading, made non-decreasing per component."""
        return self.guard.apply(self.meter.read())

    def describe(self) -> dict[str, object]:
        """The guarded meter's description."""
        return self.meter.describe()

    def close(self) -> None:
        """Close the guarded meter."""
        self.meter.close()

    def __getattr__(self, name: str) -> object:
        # Extras of the guarded meter (idle_power_w, add_pids, ...) stay reachable through the guard.
        meter = self.__dict__.get("meter")
        if meter is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(meter, name)


def counter_ranges(meter: object) -> dict[str, float]:
    """The wrap ranges in joules a meter declares through ``counter_ranges_j()``, or none."""
    fn = getattr(meter, "counter_ranges_j", None)
    return dict(fn()) if callable(fn) else {}
