"""An estimate of CPU and DRAM energy from CPU utilization, for machines without counters.

The power model (named ``linear-tdp``)::

    cpu_W  = tdp_W * (idle_fraction + (1 - idle_fraction) * utilization)
    dram_W = dram_w_per_gib * installed_GiB

where ``tdp_W`` is ``cpu_tdp_w`` when given, else ``watts_per_core * logical_cores``, and ``utilization`` is
the busy fraction of all logical CPUs between two readings, counted over one of two scopes:

- ``process-tree`` (the default): the CPU time of the processes that serve and call, i.e. this process and
  its descendants (a managed vLLM server is a child, so its engine counts) plus any process registered with
  `EstimatedMeter.add_pids` (a server started elsewhere on this host) and its descendants. An unrelated job
  loading the machine does not raise it.
- ``machine``: every process on the machine (``psutil.cpu_times()``).

The label says which: ``estimated:linear-tdp/process-tree`` or ``estimated:linear-tdp/machine``. DRAM under
this model is a constant of the machine, so its label is always ``.../machine``. Energy is power integrated
over the time between readings; utilization is measured over windows of at least ``utilization_window_s`` (CPU
times step once per 10 ms clock tick), and a reading within a window carries the last measured utilization on.
The linear model was chosen over CodeCarbon's cubic ``tdp * (0.1 + 0.9 * load**3)`` because it does not flatten the middle loads that a one-core inference engine
produces; both are guesses, hence the label.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import psutil

from langchain_energy.errors import ConfigError
from langchain_energy.meters.base import Clock, Reading, default_clock

logger = logging.getLogger(__name__)

_GIB = 1024**3

#: With a sampler measuring utilization, how old a measurement must be before a read measures for itself: reading
#: CPU times (and, once a second, searching the process tree) at a call's edge slows the caller's own thread.
_SAMPLER_BEHIND_S = 0.5

CpuScope = Literal["process-tree", "machine"]
CPU_SCOPES: tuple[str, ...] = ("process-tree", "machine")


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
        if not self.name or ":" in self.name or "/" in self.name:
            # ':' and '/' delimit the label "estimated:<name>/<scope>".
            raise ConfigError(f"power model name must be a non-empty word without ':' or '/', got {self.name!r}")
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
        """The model's label, ``estimated:<name>``; meters add the scope: ``estimated:<name>/<scope>``."""
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


class ProcessTreeCPU:
    """Cumulative CPU seconds (user + system) of a set of process trees, never decreasing.

    The trees are this process's (when `include_self`) and those of the registered roots: each root and all
    its descendants. Processes come and go: a process's CPU time is counted as it grows, and what was counted
    stays counted after it exits (its last known time is kept). A descendant first seen in a rescan was born
    since the previous one, so all its CPU time is counted; processes that exist when the meter starts or when
    their root is registered count from then on. CPU time a process spends after the last read before it
    exits, and short-lived processes born and gone between two rescans, are missed: finer `rescan_s` misses
    less and costs more (a rescan reads every process's parent).

    Args:
        roots: PIDs of more process trees to count.
        include_self: count this process's tree.
        rescan_s: seconds between searches for new descendants (0: on every read).

    Example:
        >>> tree = ProcessTreeCPU()
        >>> tree.cpu_seconds() >= 0.0
        True
    """

    def __init__(self, roots: Iterable[int] = (), include_self: bool = True, rescan_s: float = 1.0) -> None:
        if not rescan_s >= 0:
            raise ConfigError(f"rescan_s must be >= 0 seconds, got {rescan_s!r}")
        self.rescan_s = float(rescan_s)
        self._roots: dict[int, psutil.Process] = {}
        # (pid, create time) -> [process, CPU seconds counted so far]; the create time tells a reused PID apart.
        self._tracked: dict[tuple[int, float], list] = {}
        self._total = 0.0
        self._last_scan = -float("inf")
        if include_self:
            self._roots[os.getpid()] = psutil.Process()
        self.add_roots(*roots)
        self._scan(fresh=set(self._roots))

    @property
    def roots(self) -> tuple[int, ...]:
        """The root PIDs whose trees are counted (roots that exited are dropped)."""
        return tuple(self._roots)

    @property
    def processes(self) -> int:
        """How many processes are being followed now."""
        return len(self._tracked)

    def add_roots(self, *pids: int) -> None:
        """Count the trees of `pids` too, from now on.

        Raises:
            ConfigError: a PID names no running process.
        """
        new: dict[int, psutil.Process] = {}
        for pid in pids:
            if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
                raise ConfigError(f"a PID is a positive integer, got {pid!r}")
            if pid in self._roots:
                continue
            try:
                new[pid] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                raise ConfigError(f"there is no process with PID {pid} to estimate CPU energy for") from None
        if new:
            self._roots.update(new)
            self._scan(fresh=set(new))  # the new trees count from now, not from their start

    def cpu_seconds(self) -> float:
        """CPU seconds used by the trees since this object started (cumulative, never decreasing)."""
        if time.monotonic() - self._last_scan >= self.rescan_s:
            self._scan(fresh=set())
        for key, entry in list(self._tracked.items()):
            if entry[1] is None:
                continue  # not ours to read (another user's process in the tree)
            try:
                used = self._cpu_of(entry[0])
            except psutil.NoSuchProcess:
                del self._tracked[key]  # exited: what it used until the last read stays counted
                continue
            except psutil.AccessDenied:
                continue
            if used > entry[1]:
                self._total += used - entry[1]
                entry[1] = used
        return self._total

    @staticmethod
    def _cpu_of(proc: psutil.Process) -> float:
        t = proc.cpu_times()
        # Own time only: children's time (children_user) appears when they are reaped, and they were
        # counted while they ran.
        return t.user + t.system

    def _scan(self, fresh: set[int]) -> None:
        """Find the trees' processes now; follow new ones, stop following those that left.

        Args:
            fresh: roots counted from now on (just registered); under the others, a process not followed yet
                was born since the last scan.
        """
        found: dict[tuple[int, float], tuple[psutil.Process, bool]] = {}
        for pid, root in list(self._roots.items()):
            try:
                members = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                if pid != os.getpid():
                    del self._roots[pid]  # its PID may be reused by an unrelated process later
                continue
            for proc in members:
                try:
                    key = (proc.pid, proc.create_time())
                except psutil.NoSuchProcess:
                    continue
                found[key] = (proc, pid not in fresh or found.get(key, (proc, False))[1])
        for key in set(self._tracked) - set(found):
            del self._tracked[key]  # exited or left the tree: counted until now, not beyond
        for key, (proc, born_since_last_scan) in found.items():
            if key not in self._tracked:
                try:
                    used: float | None = self._cpu_of(proc)
                except psutil.NoSuchProcess:
                    continue
                except psutil.AccessDenied:
                    used = None  # followed but never read, so that it is not taken for new next time
                # A descendant first seen now was born since the last scan: all its CPU time is new. At a
                # start or a registration, processes already running count from now on.
                self._tracked[key] = [proc, None if used is None else 0.0 if born_since_last_scan else used]
        self._last_scan = time.monotonic()


class EstimatedMeter:
    """CPU and DRAM energy estimated from CPU utilization with a visible power model.

    Args:
        model: the power model's parameters; defaults to `PowerModel()`.
        components: which of ``"cpu"`` and ``"dram"`` to report.
        clock: the time source; must be the one the timeline and handler use.
        scope: whose CPU time drives the CPU estimate: ``"process-tree"`` (this process, its descendants and
            the registered PIDs' trees) or ``"machine"`` (every process).
        process_tree_roots: more PIDs whose trees count under ``"process-tree"`` (e.g. a vLLM server started
            outside this process on the same host); `add_pids` registers more later.
        rescan_s: under ``"process-tree"``, seconds between searches for new descendants.
        utilization_window_s: the shortest interval utilization is measured over (also the meter's
            ``resolution_s``); a reading sooner than that after the last measurement carries it on.

    Example:
        >>> meter = EstimatedMeter(PowerModel(cpu_tdp_w=65.0))
        >>> meter.components()
        {'cpu': 'estimated:linear-tdp/process-tree', 'dram': 'estimated:linear-tdp/machine'}
        >>> r = meter.read(); r.energy_j["cpu"] >= 0.0
        True
    """

    def __init__(
        self,
        model: PowerModel | None = None,
        components: tuple[str, ...] = ("cpu", "dram"),
        clock: Clock = default_clock,
        scope: CpuScope = "process-tree",
        process_tree_roots: Iterable[int] = (),
        rescan_s: float = 1.0,
        utilization_window_s: float = 0.05,
    ) -> None:
        bad = set(components) - {"cpu", "dram"}
        if bad or not components:
            raise ConfigError(f"EstimatedMeter reports 'cpu' and/or 'dram', got {components!r}")
        if scope not in CPU_SCOPES:
            raise ConfigError(f"CPU estimate scope must be one of {CPU_SCOPES}, got {scope!r}")
        self.model = model or PowerModel()
        self.clock = clock
        self.scope: CpuScope = scope
        self._components = tuple(components)
        self._lock = threading.Lock()
        # Resolve machine constants once: reading them every sample is wasted work.
        self._tdp_w = self.model.tdp_w()
        self._dram_w = self.model.dram_power_w()
        self._tree = (ProcessTreeCPU(process_tree_roots, rescan_s=rescan_s)
                      if scope == "process-tree" and "cpu" in self._components else None)
        # CPU times step once per clock tick (10 ms on Linux), so utilization needs a window of several ticks;
        # a reading sooner carries the last measured one on and reads no CPU times. A timeline's sampler measures
        # at its ticks (`measure_utilization`), so a call's edges read no files.
        tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
        if not utilization_window_s >= tick_s:
            raise ConfigError(f"utilization_window_s must be at least one clock tick ({tick_s} s), "
                              f"got {utilization_window_s!r}")
        self.resolution_s = float(utilization_window_s)
        self._last_t = clock()
        self._last_cpu_t = self._last_t
        self._last_cpu = self._busy_and_total()
        self._energy = {c: 0.0 for c in self._components}
        self._last_util = 0.0
        self._sampled = False  # whether a sampler measures utilization (`measure_utilization`)

    def _busy_and_total(self) -> tuple[float, float]:
        """Cumulative busy CPU seconds of the scope and total CPU seconds of the machine (all CPUs)."""
        busy, total = cpu_busy_and_total()
        return (self._tree.cpu_seconds(), total) if self._tree is not None else (busy, total)

    def components(self) -> dict[str, str]:
        """Each reported component with its label, ``estimated:<model>/<scope>`` (DRAM's scope is the machine)."""
        return {c: self.provenance(c) for c in self._components}

    def provenance(self, component: str) -> str:
        """The label of one component's numbers."""
        scope = self.scope if component == "cpu" else "machine"
        return f"{self.model.provenance}/{scope}"

    def add_pids(self, *pids: int) -> None:
        """Count the CPU time of these processes and their descendants from now on (``process-tree`` scope).

        Under the ``machine`` scope every process already counts, so this does nothing.

        Raises:
            ConfigError: a PID names no running process.
        """
        if self._tree is None:
            return
        with self._lock:
            self._tree.add_roots(*pids)

    @property
    def process_tree_roots(self) -> tuple[int, ...]:
        """The PIDs whose trees drive the CPU estimate (empty under the ``machine`` scope)."""
        return self._tree.roots if self._tree is not None else ()

    @property
    def process_tree_cpu_s(self) -> float:
        """CPU seconds of the process tree counted up to the last reading (0 under the ``machine`` scope)."""
        with self._lock:
            return self._last_cpu[0] if self._tree is not None else 0.0

    def read(self) -> Reading:
        """Integrate the model's power since the previous reading and return the cumulative joules.

        Utilization is measured anew once a window has passed; with a sampler calling `measure_utilization`,
        only when it has fallen behind by `_SAMPLER_BEHIND_S` (a call's edge then reads no CPU times)."""
        with self._lock:
            t = self.clock()
            self._advance(t, max(self.resolution_s, _SAMPLER_BEHIND_S) if self._sampled else self.resolution_s)
            return Reading(t, dict(self._energy), {}, {})  # (every field given: no default factories to call)

    def measure_utilization(self) -> None:
        """Measure utilization now if a window has passed (a timeline's sampler calls this at each tick)."""
        with self._lock:
            self._sampled = True
            self._advance(self.clock(), self.resolution_s)

    def _advance(self, t: float, measure_after_s: float) -> None:
        """Measure utilization if the last measurement is `measure_after_s` old, then integrate up to `t` (the
        new measurement covers the interval since the previous one, this read's interval included)."""
        if t - self._last_cpu_t >= measure_after_s:
            cpu = self._busy_and_total()
            util = busy_fraction(self._last_cpu, cpu)
            if util is not None:
                self._last_util = util
            self._last_cpu, self._last_cpu_t = cpu, t
        dt = max(t - self._last_t, 0.0)
        if "cpu" in self._energy:
            idle = self.model.idle_fraction
            self._energy["cpu"] += dt * self._tdp_w * (idle + (1.0 - idle) * self._last_util)
        if "dram" in self._energy:
            self._energy["dram"] += dt * self._dram_w
        self._last_t = t

    @property
    def last_utilization(self) -> float:
        """CPU utilization (0..1) of the scope over the last interval read."""
        return self._last_util

    def idle_power_w(self) -> dict[str, float]:
        """The model's idle watts for the reported components."""
        return {c: w for c, w in self.model.idle_power_w().items() if c in self._components}

    def describe(self) -> dict[str, object]:
        """The power model's parameters as resolved on this machine, and the scope of the CPU estimate."""
        return {"estimated": {
            **self.model.to_dict(),
            "cpu_scope": self.scope,
            "process_tree_roots": list(self.process_tree_roots),
            "provenance": self.components(),
        }}

    def close(self) -> None:
        """Nothing to release."""
