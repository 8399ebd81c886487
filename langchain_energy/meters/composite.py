"""Pick the best source for each component: measured counters where they exist, a labelled estimate otherwise."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Literal

from langchain_energy.errors import ConfigError, MeterError
from langchain_energy.meters.base import (
    Clock,
    Meter,
    MonotonicGuard,
    Reading,
    component_group,
    counter_ranges,
    default_clock,
    is_measured,
)
from langchain_energy.meters.estimated import CpuScope, EstimatedMeter, PowerModel
from langchain_energy.meters.zeus_meter import ZeusMeter
from langchain_energy.meters.zeusd import ZeusdMeter

Source = Literal["auto", "zeus", "estimated", "off"]
_SOURCES = ("auto", "zeus", "estimated", "off")


class CompositeMeter:
    """Several meters read as one; each component comes from exactly one of them.

    Reads are serialized, and each component's cumulative joules never go backwards (a member's backward
    step is dropped with one warning, a wrap of a counter whose member declares its range is corrected; see
    `MonotonicGuard`), so readings taken from several threads stay monotonic in time order.

    Args:
        meters: the meters; a component reported by more than one is taken from the first that has it.
        clock: the shared time source (all meters must use it).

    Example:
        >>> from langchain_energy.meters.replay import ReplayMeter
        >>> from langchain_energy.meters.base import ManualClock
        >>> clock = ManualClock()
        >>> m = CompositeMeter([ReplayMeter({"gpu:0": [(0.0, 50.0)]}, clock=clock, provenance="measured:nvml"),
        ...                     ReplayMeter({"cpu": [(0.0, 10.0)]}, clock=clock)], clock=clock)
        >>> m.components()
        {'gpu:0': 'measured:nvml', 'cpu': 'estimated:replay'}
    """

    def __init__(self, meters: list[Meter], clock: Clock = default_clock) -> None:
        self.clock = clock
        self.meters = list(meters)
        self._owner: dict[str, int] = {}
        self._prov: dict[str, str] = {}
        for idx, meter in enumerate(self.meters):
            for key, prov in meter.components().items():
                if key not in self._owner:
                    self._owner[key] = idx
                    self._prov[key] = prov
        ranges = {k: r for idx, meter in enumerate(self.meters)
                  for k, r in counter_ranges(meter).items() if self._owner.get(k) == idx}
        self._guard = MonotonicGuard(ranges, name="CompositeMeter")
        # Counters (NVML, RAPL, zeusd) can wrap, glitch or reset; estimates are integrated by this package's meters
        # and never step back, so a composite of estimates alone skips the guard (a call's end reads it).
        self._counters = any(is_measured(p) for p in self._prov.values())
        steps = [r for m in self.meters if (r := getattr(m, "resolution_s", None))]
        self.resolution_s: float | None = max(steps) if steps else None  # the coarsest counter's step
        # One read at a time: a read that took its time before another but finished after it would otherwise
        # carry the earlier time with the larger joules.
        self._lock = threading.Lock()

    def components(self) -> dict[str, str]:
        """Component key -> provenance, across all meters."""
        return dict(self._prov)

    def read(self) -> Reading:
        """Read every meter once and keep each component from its owner, never below its previous value (counters
        through the guard; estimates never step back)."""
        with self._lock:
            if len(self.meters) == 1:  # (the usual machine: one member owns every component)
                r = self.meters[0].read()
                return self._guard.apply(r) if self._counters else r
            t = self.clock()
            energy: dict[str, float] = {}
            util: dict[int, float] = {}
            power: dict[int, float] = {}
            for idx, meter in enumerate(self.meters):
                r = meter.read()
                for key, joules in r.energy_j.items():
                    if self._owner.get(key) == idx:
                        energy[key] = joules
                util.update(r.gpu_util)
                power.update(r.gpu_power_w)
            reading = Reading(t=t, energy_j=energy, gpu_util=util, gpu_power_w=power)
            return self._guard.apply(reading) if self._counters else reading

    def add_pids(self, *pids: int) -> None:
        """Register processes (and their descendants) with every member that estimates from a process tree.

        Members that do not (measured counters, a machine-wide estimate) are unaffected, so this is safe to
        call on any composite.

        Raises:
            ConfigError: a PID names no running process.
        """
        self._on_members("add_pids", *pids)

    def measure_utilization(self) -> None:
        """Let every member that estimates from utilization measure it now (a sampler's tick)."""
        self._on_members("measure_utilization")

    def _on_members(self, method: str, *args: object) -> None:
        """Call `method` on every member that has it (the others are unaffected)."""
        for meter in self.meters:
            fn = getattr(meter, method, None)
            if callable(fn):
                fn(*args)

    def idle_power_w(self) -> dict[str, float] | None:
        """Idle watts per component where every owning meter knows its own (estimates do)."""
        out: dict[str, float] = {}
        for key, idx in self._owner.items():
            fn = getattr(self.meters[idx], "idle_power_w", None)
            known = fn() if fn else {}
            if key not in known:
                return None
            out[key] = known[key]
        return out

    def describe(self) -> dict[str, object]:
        """Merged descriptions plus the chosen source per component."""
        out: dict[str, object] = {"provenance": self.components()}
        for meter in self.meters:
            out.update(meter.describe())
        return out

    def close(self) -> None:
        """Close every meter."""
        for meter in self.meters:
            meter.close()


def auto_meter(
    cpu: Source = "auto",
    dram: Source = "auto",
    gpu: Source = "auto",
    power_model: PowerModel | None = None,
    gpu_indices: Sequence[int] | None = None,
    clock: Clock = default_clock,
    zeus_meter: ZeusMeter | None = None,
    cpu_scope: CpuScope = "process-tree",
    process_tree_roots: Sequence[int] = (),
    zeusd: Sequence[str] | Mapping[str, str] | ZeusdMeter | None = None,
) -> CompositeMeter:
    """Build the best meter this machine allows, per component, or the sources the user forces.

    ``"auto"`` takes Zeus's counter when the machine has one (NVML for GPUs, RAPL for CPU/DRAM), else the
    ``estimated`` power model for CPU and DRAM, and leaves GPUs out (they are reported ``unavailable``).
    ``"zeus"`` insists on a measured counter and raises `MeterError` when there is none; ``"estimated"``
    forces the model; ``"off"`` leaves the component out.

    Args:
        cpu: source for CPU package energy.
        dram: source for DRAM energy.
        gpu: source for GPU energy (``"estimated"`` is not offered: no model of GPU power is good enough).
        power_model: parameters of the estimate.
        gpu_indices: GPUs to meter (Zeus's indices, i.e. within this process's ``CUDA_VISIBLE_DEVICES``);
            None meters every visible GPU, ``()`` none. Pass the engine's, e.g. `VLLMServer.gpu_indices`, so
            that idle GPUs beside it are not charged to its calls.
        clock: the shared time source.
        zeus_meter: an existing Zeus meter to draw measured components from (tests pass one over a double);
            `gpu_indices` then selects among the GPUs it reads.
        cpu_scope: whose CPU time drives an estimated CPU figure: ``"process-tree"`` (this process, its
            descendants and `process_tree_roots`) or ``"machine"``; see `EstimatedMeter`.
        process_tree_roots: more PIDs whose process trees count in a ``"process-tree"`` estimate.
        zeusd: the engine runs on other machines: their ``zeusd`` addresses (see `ZeusdMeter.from_urls`; a
            ``{name: url}`` mapping names the nodes) or a `ZeusdMeter`. GPUs then come from those nodes only
            (`gpu_indices` are the nodes' indices), and so do CPU and DRAM where the daemons stream them;
            this machine fills in only the groups they lack.

    Example:
        >>> meter = auto_meter(cpu="estimated", dram="off", gpu="off")
        >>> meter.components()
        {'cpu': 'estimated:linear-tdp/process-tree'}
    """
    for name, src in (("cpu", cpu), ("dram", dram), ("gpu", gpu)):
        if src not in _SOURCES:
            raise ConfigError(f"meter source for {name} must be one of {_SOURCES}, got {src!r}")
    if gpu == "estimated":
        raise ConfigError("GPU energy cannot be estimated here; use gpu='zeus', 'auto' or 'off'")
    if zeusd is not None:
        return _remote_meter(zeusd, cpu=cpu, dram=dram, gpu=gpu, power_model=power_model, gpu_indices=gpu_indices,
                             clock=clock, zeus_meter=zeus_meter, cpu_scope=cpu_scope,
                             process_tree_roots=process_tree_roots)
    wants_zeus = {"cpu": cpu in ("auto", "zeus"), "dram": dram in ("auto", "zeus"), "gpu": gpu in ("auto", "zeus")}
    zm: ZeusMeter | None = zeus_meter
    if zm is None and (wants_zeus["gpu"] or wants_zeus["cpu"] or wants_zeus["dram"]):
        zm = ZeusMeter(gpu_indices=gpu_indices, cpu=wants_zeus["cpu"] or wants_zeus["dram"],
                       gpu=wants_zeus["gpu"], clock=clock)
    measured = zm.components() if zm is not None else {}
    if zeus_meter is not None and gpu_indices is not None and gpu in ("auto", "zeus"):
        metered = sorted(int(k.split(":", 1)[1]) for k in measured if component_group(k) == "gpu")
        for i in gpu_indices:
            if i not in metered:
                raise MeterError(f"GPU index {i} is not metered by the given Zeus meter (it meters {metered})")
        measured = {k: p for k, p in measured.items()
                    if component_group(k) != "gpu" or int(k.split(":", 1)[1]) in set(gpu_indices)}
    have = {component_group(k) for k in measured}
    for name, src in (("cpu", cpu), ("dram", dram), ("gpu", gpu)):
        if src == "zeus" and name == "gpu" and gpu_indices is not None and not list(gpu_indices):
            raise MeterError("gpu energy was forced to come from Zeus, but gpu_indices=() selects no GPU; "
                             "use gpu='off' for an engine that serves on none")
        if src == "zeus" and name not in have:
            raise MeterError(
                f"{name} energy was forced to come from Zeus, but this machine has no "
                f"{'NVML GPU energy counter' if name == 'gpu' else 'readable RAPL counter'}; "
                f"use {name}='auto' or '{'off' if name == 'gpu' else 'estimated'}'"
            )
    keep = {
        k: p for k, p in measured.items()
        if {"cpu": cpu, "dram": dram, "gpu": gpu}[component_group(k)] in ("auto", "zeus")
    }
    meters: list[Meter] = []
    if zm is not None and keep:
        meters.append(_Subset(zm, keep))
    est = tuple(
        name for name, src in (("cpu", cpu), ("dram", dram))
        if src == "estimated" or (src == "auto" and name not in have)
    )
    if est:
        meters.append(EstimatedMeter(power_model, components=est, clock=clock, scope=cpu_scope,
                                     process_tree_roots=process_tree_roots))
    return CompositeMeter(meters, clock=clock)


def _remote_meter(
    zeusd: Sequence[str] | Mapping[str, str] | ZeusdMeter,
    *,
    cpu: Source,
    dram: Source,
    gpu: Source,
    power_model: PowerModel | None,
    gpu_indices: Sequence[int] | None,
    clock: Clock,
    zeus_meter: ZeusMeter | None,
    cpu_scope: CpuScope,
    process_tree_roots: Sequence[int],
) -> CompositeMeter:
    """`auto_meter` for an engine on zeusd nodes: their components first, this machine's for the rest."""
    sources = {"cpu": cpu, "dram": dram, "gpu": gpu}
    if isinstance(zeusd, ZeusdMeter):
        if gpu_indices is not None:
            raise ConfigError("gpu_indices cannot narrow an existing ZeusdMeter; pass them to ZeusdMeter.from_urls")
        remote = zeusd
    else:
        remote = ZeusdMeter.from_urls(zeusd, gpu_indices=gpu_indices, cpu=cpu in ("auto", "zeus") or
                                      dram in ("auto", "zeus"), clock=clock)
    keep = {k: p for k, p in remote.components().items() if sources[component_group(k)] in ("auto", "zeus")}
    have = {component_group(k) for k in keep}
    if gpu == "zeus" and "gpu" not in have:
        remote.close()
        raise MeterError("gpu energy was forced to come from zeusd, but its nodes stream no GPU; "
                         "use gpu='auto' or 'off'")
    try:
        local = auto_meter(
            cpu="off" if "cpu" in have else cpu, dram="off" if "dram" in have else dram, gpu="off",
            power_model=power_model, clock=clock, zeus_meter=zeus_meter, cpu_scope=cpu_scope,
            process_tree_roots=process_tree_roots,
        )
    except Exception:
        remote.close()  # its streaming threads must not outlive a failed construction
        raise
    members: list[Meter] = [_Subset(remote, keep)] if keep else []
    return CompositeMeter(members + local.meters, clock=clock)


class _Subset:
    """A view of a meter restricted to some of its components (and their GPUs' power and utilization)."""

    def __init__(self, meter: Meter, keep: Mapping[str, str]) -> None:
        self.meter, self.keep, self.clock = meter, dict(keep), meter.clock
        self.resolution_s: float | None = getattr(meter, "resolution_s", None)
        # Node-qualified GPU keys (``gpu:<node>_<i>``) have no per-index power or utilization to filter.
        self.gpus = sorted(int(k.split(":", 1)[1]) for k in self.keep
                           if component_group(k) == "gpu" and k.split(":", 1)[1].isdigit())

    def components(self) -> dict[str, str]:
        return dict(self.keep)

    def counter_ranges_j(self) -> dict[str, float]:
        return {k: r for k, r in counter_ranges(self.meter).items() if k in self.keep}

    def read(self) -> Reading:
        r = self.meter.read()
        return Reading(t=r.t, energy_j={k: v for k, v in r.energy_j.items() if k in self.keep},
                       gpu_util={i: u for i, u in r.gpu_util.items() if i in self.gpus},
                       gpu_power_w={i: w for i, w in r.gpu_power_w.items() if i in self.gpus})

    def describe(self) -> dict[str, object]:
        out = dict(self.meter.describe())
        zeus = out.get("zeus")
        if isinstance(zeus, dict) and "gpu_indices" in zeus:
            # Name the GPUs this view reads, not every GPU the underlying meter reads.
            read = [i for i in zeus["gpu_indices"] if i in self.gpus]
            visible = int(zeus.get("gpus_visible", 0))
            out["zeus"] = {**zeus,
                           "gpus": {i: n for i, n in dict(zeus.get("gpus", {})).items() if i in self.gpus},
                           "gpu_indices": read,
                           "gpu_selection": zeus["gpu_selection"] if read == zeus["gpu_indices"] else "requested",
                           "gpus_not_read": [i for i in range(visible) if i not in read]}
        return out

    def close(self) -> None:
        self.meter.close()
