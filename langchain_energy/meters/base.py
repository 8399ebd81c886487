"""The meter interface: cumulative joules per component, each with its provenance.

A meter answers one question, "how many joules has each component used so far?", as a `Reading`.
Components are named ``"cpu"``, ``"dram"`` and ``"gpu:<index>"``. Readings are cumulative so that any two of
them give the energy between their instants by subtraction, and so that dropping readings (for bounded memory)
loses time resolution but never energy.

Provenance strings say where each number comes from: ``measured:nvml``, ``measured:rapl``,
``estimated:<model>`` or ``unavailable``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Clock = Callable[[], float]

#: The components reported in records, in display order. GPUs are summed over indices for ``"gpu"``.
COMPONENTS: tuple[str, ...] = ("cpu", "gpu", "dram")

UNAVAILABLE = "unavailable"


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


def default_clock() -> float:
    """The package's one clock for timelines and handler timestamps."""
    return time.monotonic()
