"""An estimate of CPU and DRAM energy from machine-wide CPU utilization, for machines without counters.

The power model (named ``linear-tdp``; every number it yields is labelled ``estimated:linear-tdp``)::

    cpu_W  = tdp_W * (idle_fraction + (1 - idle_fraction) * utilization)
    dram_W = dram_w_per_gib * installed_GiB

where ``utilization`` is the machine-wide busy fraction of all logical CPUs between two readings (from
``psutil.cpu_times()``, so a serving engine in another process counts) and ``tdp_W`` is ``cpu_tdp_w`` when
given, else ``watts_per_core * logical_cores``. Energy is power integrated over the time between readings.
The linear model was chosen over CodeCarbon's cubic ``tdp * (0.1 + 0.9 * load**3)`` because it does not
flatten the middle loads that a one-core inference engine produces; both are guesses, hence the label.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import psutil

from langchain_energy.errors import ConfigError
from langchain_energy.meters.base import Clock, Reading, default_clock

_GIB = 1024**3


@dataclass(frozen=True)
class PowerModel:
    """Parameters of the ``linear-tdp`` CPU/DRAM power model; every field may be overridden.

    Attributes:
        name: the model's name, used in provenance strings (``estimated:<name>``).
        cpu_tdp_w: package power at full load in watts; None derives it from `watts_per_core`.
        watts_per_core: full-load watts per logical core, used when `cpu_tdp_w` is None.
        idle_fraction: share of TDP drawn at zero utilization.
        dram_w_per_gib: DRAM watts per installed GiB (CodeCarbon's 3 W per 8 GB is 0.375).
        dram_gib: installed memory in GiB; None reads it from the machine.

    Example:
        >>> m = PowerModel(cpu_tdp_w=100.0, idle_fraction=0.25, dram_gib=16.0)
        >>> m.cpu_power_w(0.5), m.dram_power_w()
        (62.5, 6.0)
    """

    name: str = "linear-tdp"
    cpu_tdp_w: float | None = None
    watts_per_core: float = 10.0
    idle_fraction: float = 0.1
    dram_w_per_gib: float = 0.375
    dram_gib: float | None = None

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name:
            raise ConfigError(f"power model name must be a non-empty word without ':', got {self.name!r}")
        if self.cpu_tdp_w is not None and self.cpu_tdp_w <= 0:
            raise ConfigError(f"cpu_tdp_w must be positive, got {self.cpu_tdp_w}")
        if self.watts_per_core <= 0:
            raise ConfigError(f"watts_per_core must be positive, got {self.watts_per_core}")
        if not 0.0 <= self.idle_fraction <= 1.0:
            raise ConfigError(f"idle_fraction must be in [0, 1], got {self.idle_fraction}")
        if self.dram_w_per_gib < 0:
            raise ConfigError(f"dram_w_per_gib must be >= 0, got {self.dram_w_per_gib}")
        if self.dram_gib is not None and self.dram_gib < 0:
            raise ConfigError(f"dram_gib must be >= 0, got {self.dram_gib}")

    @property
    def provenance(self) -> str:
        """The label carried by every number this model produces."""
        return f"estimated:{self.name}"

    def tdp_w(self) -> float:
        """Full-load CPU watts of this machine under the model."""
        if self.cpu_tdp_w is not None:
            return float(self.cpu_tdp_w)
        return self.watts_per_core * (psutil.cpu_count(logical=True) or 1)

    def installed_gib(self) -> float:
        """Installed memory in GiB under the model."""
        return float(self.dram_gib) if self.dram_gib is not None else psutil.virtual_memory().total / _GIB

    def cpu_power_w(self, utilization: float) -> float:
        """CPU watts at a machine-wide utilization in [0, 1]."""
        u = min(max(utilization, 0.0), 1.0)
        tdp = self.tdp_w()
        return tdp * (self.idle_fraction + (1.0 - self.idle_fraction) * u)

    def dram_power_w(self) -> float:
        """DRAM watts (constant under this model)."""
        return self.dram_w_per_gib * self.installed_gib()

    def idle_power_w(self) -> dict[str, float]:
        """Watts per component at zero utilization: the model's own idle baseline."""
        return {"cpu": self.cpu_power_w(0.0), "dram": self.dram_power_w()}

    def to_dict(self) -> dict[str, object]:
        """The parameters as resolved on this machine, for records and reports."""
        d: dict[str, object] = asdict(self)
        d["resolved_tdp_w"] = self.tdp_w()
        d["resolved_dram_gib"] = self.installed_gib()
        return d


def cpu_busy_and_total() -> tuple[float, float]:
    """The whole machine's cumulative busy and total CPU seconds (subtract two readings for an interval)."""
    times = psutil.cpu_times()
    total = sum(times)
    # iowait is time the CPU sat idle waiting on I/O: idle for power purposes.
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


def busy_fraction(earlier: tuple[float, float], later: tuple[float, float]) -> float | None:
    """The busy fraction, in [0, 1], between two `cpu_busy_and_total` readings; None when no CPU time passed.

    Example:
        >>> busy_fraction((10.0, 40.0), (13.0, 44.0))
        0.75
    """
    d_total = later[1] - earlier[1]
    if not d_total > 0:
        return None
    # A counter such as iowait may step back a little: clamp.
    return min(max((later[0] - earlier[0]) / d_total, 0.0), 1.0)


class EstimatedMeter:
    """CPU and DRAM energy estimated from machine-wide utilization with a visible power model.

    Args:
        model: the power model's parameters; defaults to `PowerModel()`.
        components: which of ``"cpu"`` and ``"dram"`` to report.
        clock: the time source; must be the one the timeline and handler use.

    Example:
        >>> meter = EstimatedMeter(PowerModel(cpu_tdp_w=65.0))
        >>> meter.components()
        {'cpu': 'estimated:linear-tdp', 'dram': 'estimated:linear-tdp'}
        >>> r = meter.read(); r.energy_j["cpu"] >= 0.0
        True
    """

    def __init__(
        self,
        model: PowerModel | None = None,
        components: tuple[str, ...] = ("cpu", "dram"),
        clock: Clock = default_clock,
    ) -> None:
        bad = set(components) - {"cpu", "dram"}
        if bad or not components:
            raise ConfigError(f"EstimatedMeter reports 'cpu' and/or 'dram', got {components!r}")
        self.model = model or PowerModel()
        self.clock = clock
        self._components = tuple(components)
        self._lock = threading.Lock()
        # Resolve machine constants once: reading them every sample is wasted work.
        self._tdp_w = self.model.tdp_w()
        self._dram_w = self.model.dram_power_w()
        self._last_t = clock()
        self._last_cpu = cpu_busy_and_total()
        self._energy = {c: 0.0 for c in self._components}
        self._last_util = 0.0

    def components(self) -> dict[str, str]:
        """Each reported component with the label ``estimated:<model name>``."""
        return {c: self.model.provenance for c in self._components}

    def read(self) -> Reading:
        """Integrate the model's power since the previous reading and return the cumulative joules."""
        with self._lock:
            t = self.clock()
            cpu = cpu_busy_and_total()
            util = busy_fraction(self._last_cpu, cpu)
            if util is not None:
                self._last_util = util
            dt = max(t - self._last_t, 0.0)
            if "cpu" in self._energy:
                idle = self.model.idle_fraction
                self._energy["cpu"] += dt * self._tdp_w * (idle + (1.0 - idle) * self._last_util)
            if "dram" in self._energy:
                self._energy["dram"] += dt * self._dram_w
            self._last_t, self._last_cpu = t, cpu
            return Reading(t=t, energy_j=dict(self._energy))

    @property
    def last_utilization(self) -> float:
        """Machine-wide CPU utilization (0..1) over the last interval read."""
        return self._last_util

    def idle_power_w(self) -> dict[str, float]:
        """The model's idle watts for the reported components."""
        return {c: w for c, w in self.model.idle_power_w().items() if c in self._components}

    def describe(self) -> dict[str, object]:
        """The power model's parameters as resolved on this machine."""
        return {"estimated": self.model.to_dict()}

    def close(self) -> None:
        """Nothing to release."""
