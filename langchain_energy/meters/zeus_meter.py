"""Measured energy through Zeus's device layer: NVML GPU energy counters and RAPL CPU/DRAM counters.

The meter reads the devices' cumulative counters directly (``zeus.device.get_gpus()`` /
``get_cpus()``) rather than opening per-request Zeus windows: windows that overlap each see the whole device
and double count, while one cumulative counter sampled by one timeline never does. Whatever the machine lacks
(no GPU, no RAPL, no permission) is simply not reported; `components()` tells which parts are measured.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from langchain_energy.errors import ConfigError, MeterError
from langchain_energy.meters.base import Clock, MonotonicGuard, Reading, default_clock

logger = logging.getLogger(__name__)


def _load_zeus_gpus() -> Any | None:
    try:
        from zeus.device import get_gpus

        return get_gpus()
    except Exception as exc:  # no NVML/AMDSMI, no driver, no device: all mean "no GPU counter here"
        logger.info("no GPU energy counter available through Zeus: %s", exc)
        return None


def _load_zeus_cpus() -> Any | None:
    try:
        from zeus.device import get_cpus

        return get_cpus()
    except Exception as exc:  # no RAPL directory or no permission
        logger.info("no RAPL counter available through Zeus: %s", exc)
        return None


def _gpu_provenance(gpus: Any) -> str:
    return "measured:amdsmi" if "AMD" in type(gpus).__name__ else "measured:nvml"


#: Seconds between updates of NVML's energy counter (seen on H100 and H200) and of RAPL's.
NVML_COUNTER_STEP_S = 0.1
RAPL_COUNTER_STEP_S = 0.001


class ZeusMeter:
    """Cumulative joules from the hardware counters Zeus can reach on this machine.

    Only the GPUs in `gpu_indices` are read, so that GPUs beside the engine (idle or serving someone else) are
    not charged to its calls; each stays its own component ``gpu:<index>``. Readings never go backwards: a
    RAPL read taken between a wrap and Zeus's wrap tracker noticing it is corrected by the zone's range, and
    any other backward step is dropped with one warning (see `MonotonicGuard`).

    Args:
        gpu_indices: GPUs to read (indices as Zeus sees them, i.e. after this process's
            ``CUDA_VISIBLE_DEVICES``); None reads every visible GPU, ``()`` none. A managed engine's are
            `VLLMServer.gpu_indices`.
        cpu: read RAPL CPU package (and DRAM where the package has it) counters when available.
        gpu: read GPU counters when available.
        clock: the time source shared with the timeline and handler.
        gpus: a Zeus ``GPUs`` object to use instead of ``zeus.device.get_gpus()`` (tests pass a double).
        cpus: a Zeus ``CPUs`` object to use instead of ``zeus.device.get_cpus()``.

    Example:
        ```python
        meter = ZeusMeter()
        meter.components()  # one NVML GPU, no RAPL: {"gpu:0": "measured:nvml"}; neither: {}
        joules = meter.read().energy_j
        ZeusMeter(gpu_indices=server.gpu_indices)  # only the GPUs a managed vLLM server serves on
        ```
    """

    def __init__(
        self,
        gpu_indices: Sequence[int] | None = None,
        cpu: bool = True,
        gpu: bool = True,
        clock: Clock = default_clock,
        gpus: Any | None = None,
        cpus: Any | None = None,
    ) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._gpus = (gpus if gpus is not None else _load_zeus_gpus()) if gpu else None
        self._cpus = (cpus if cpus is not None else _load_zeus_cpus()) if cpu else None
        self._components: dict[str, str] = {}
        self._gpu_indices: list[int] = []
        self._requested = None if gpu_indices is None else list(gpu_indices)
        if self._requested is not None and len(set(self._requested)) != len(self._requested):
            raise ConfigError(f"a GPU index was given more than once in gpu_indices={self._requested}")
        self._gpus_visible = 0
        self._handles: dict[int, Any] = {}
        if self._gpus is not None:
            prov = _gpu_provenance(self._gpus)
            available = range(len(self._gpus))
            self._gpus_visible = len(available)
            wanted = list(available) if self._requested is None else sorted(self._requested)
            for i in wanted:
                if i not in available:
                    raise MeterError(f"GPU index {i} not visible to Zeus (it sees {len(self._gpus)} GPUs)")
                if not self._safe(lambda i=i: self._gpus.supports_get_total_energy_consumption(i), False):
                    # Pre-Volta GPUs have no energy counter; integrating sampled power would be a different
                    # (coarser) measurement, so they are left out rather than mislabelled.
                    logger.warning("GPU %d has no NVML energy counter; it is not metered", i)
                    continue
                self._gpu_indices.append(i)
                self._components[f"gpu:{i}"] = prov
                handle = getattr(getattr(self._gpus, "gpus", [None] * (i + 1))[i], "handle", None)
                if handle is not None:
                    self._handles[i] = handle
        self._cpu_indices: list[int] = []
        self._dram = False
        if self._cpus is not None:
            try:
                self._cpu_indices = list(range(len(self._cpus)))
                self._dram = bool(self._cpu_indices) and all(
                    self._cpus.supports_get_dram_energy_consumption(i) for i in self._cpu_indices
                )
                # Read once now: a RAPL tree we may not read (permissions) should fail here, not in the sampler.
                for i in self._cpu_indices:
                    self._cpus.get_total_energy_consumption(i)
            except Exception as exc:
                logger.info("RAPL present but unreadable: %s", exc)
                self._cpu_indices, self._dram = [], False
            if self._cpu_indices:
                self._components["cpu"] = "measured:rapl"
                if self._dram:
                    self._components["dram"] = "measured:rapl"
        # NVML's energy counter steps about every 100 ms (RAPL's about every 1 ms): calls shorter than this
        # cannot be resolved by the counter alone, and their records say so.
        self.resolution_s: float | None = NVML_COUNTER_STEP_S if self._gpu_indices else (
            RAPL_COUNTER_STEP_S if self._cpu_indices else None)
        self._guard = MonotonicGuard(self.counter_ranges_j(), name="ZeusMeter")
        # Counters start at driver load; report joules since this meter started.
        self._origin: dict[str, float] = {}
        self._origin = dict(self._raw())
        # The origin is the guard's first value, so that even the first read is checked against it.
        self._guard.apply(Reading(t=self.clock(), energy_j={k: 0.0 for k in self._origin}))

    @staticmethod
    def _safe(fn: Any, default: Any) -> Any:
        try:
            return fn()
        except Exception:
            return default

    def _raw(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i in self._gpu_indices:
            out[f"gpu:{i}"] = self._gpus.get_total_energy_consumption(i) / 1000.0
        if self._cpu_indices:
            cpu_j = dram_j = 0.0
            for i in self._cpu_indices:
                m = self._cpus.get_total_energy_consumption(i)
                cpu_j += m.cpu_mj / 1000.0
                if self._dram and m.dram_mj is not None:
                    dram_j += m.dram_mj / 1000.0
            out["cpu"] = cpu_j
            if self._dram:
                out["dram"] = dram_j
        return out

    def components(self) -> dict[str, str]:
        """The measured components on this machine (may be empty)."""
        return dict(self._components)

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        """The GPUs read (Zeus's indices), in order."""
        return tuple(self._gpu_indices)

    def counter_ranges_j(self) -> dict[str, float]:
        """Wrap range in joules of each counter whose range is known: RAPL's ``max_energy_range_uj``.

        The CPU and DRAM components sum the packages' zones, so a wrap of any one lowers the sum by one range
        only when every zone has the same range; otherwise the range is not declared (and a backward read is
        dropped instead of corrected). NVML's GPU counter is 64-bit millijoules and does not wrap.
        """
        out: dict[str, float] = {}
        packages = getattr(self._cpus, "cpus", None)  # Zeus's RAPLCPU objects; zeusd's carry no range
        if not self._cpu_indices or packages is None:
            return out
        zones = {"cpu": "rapl_file", "dram": "dram"} if self._dram else {"cpu": "rapl_file"}
        for comp, attr in zones.items():
            spans = {self._safe(lambda i=i, a=attr: float(getattr(packages[i], a).max_energy_range_uj), None)
                     for i in self._cpu_indices}
            span = spans.pop() if len(spans) == 1 else None
            if span is not None and span > 0:
                out[comp] = span / 1e6
        return out

    def read(self) -> Reading:
        """Counters now, minus their values when the meter started, plus GPU power and utilization."""
        with self._lock:
            t = self.clock()
            try:
                raw = self._raw()
            except Exception as exc:
                raise MeterError(f"reading energy counters through Zeus failed: {exc}") from exc
            power = {}
            for i in self._gpu_indices:
                mw = self._safe(lambda i=i: self._gpus.get_instant_power_usage(i), None)
                if mw is not None:
                    power[i] = mw / 1000.0
            util = {i: u for i in self._gpu_indices if (u := self._utilization(i)) is not None}
            # Guarded under the lock: the guard's order is the order of the reads.
            since_start = {k: v - self._origin.get(k, 0.0) for k, v in raw.items()}
            return self._guard.apply(Reading(t=t, energy_j=since_start, gpu_util=util, gpu_power_w=power))

    def _utilization(self, index: int) -> float | None:
        # Zeus does not expose utilization; NVML does, through the handle Zeus already holds.
        handle = self._handles.get(index)
        if handle is None:
            util_fn = getattr(self._gpus, "get_utilization", None)
            return self._safe(lambda: float(util_fn(index)), None) if util_fn else None
        try:
            import pynvml

            return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            return None

    def describe(self) -> dict[str, object]:
        """Which devices are read: the GPUs by index and name, the visible ones left out, the RAPL zones.

        GPU indices are Zeus's, i.e. positions in this process's ``CUDA_VISIBLE_DEVICES`` (recorded too).
        """
        names = {i: self._safe(lambda i=i: self._gpus.get_name(i), "?") for i in self._gpu_indices}
        return {"zeus": {
            "gpus": names,
            "gpu_indices": list(self._gpu_indices),
            "gpu_selection": "all visible" if self._requested is None else "requested",
            "gpus_visible": self._gpus_visible,
            "gpus_not_read": [i for i in range(self._gpus_visible) if i not in self._gpu_indices],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "rapl_packages": len(self._cpu_indices),
            "rapl_dram": self._dram,
            "counter_ranges_j": self.counter_ranges_j(),
        }}

    def close(self) -> None:
        """Zeus keeps its device singletons; nothing to release here."""
