"""One background sampler per meter: a bounded, thread-safe record of cumulative joules over time.

The timeline stores *cumulative* joules per component at each sample and hands every sample to its
`Ledger`, which shares the joules among runs exactly and keeps samples only as far back as an open call
needs. The timeline's own copy is for display (figures, `timeline_frame`) and holds the periodic and explicit
samples, not the ones taken at runs' edges, which only sharpen the ledger's split: when it is full, every other
interior sample is dropped, halving the resolution of old data but never its total. Several handlers share
one timeline; `acquire`/`release` count them, and the sampler thread runs while the count is positive.

Each sample also records the whole machine's CPU time, busy and total, cumulatively for the same reason:
utilization between two kept samples stays exact after thinning.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import weakref
from dataclasses import dataclass, field

import psutil

from langchain_energy.accounting import EnergyColumns
from langchain_energy.attribution import interpolate
from langchain_energy.errors import ConfigError
from langchain_energy.ledger import Ledger
from langchain_energy.meters.base import Clock, Meter, Reading, is_measured
from langchain_energy.meters.served import is_attributed, served_gpus
from langchain_energy.meters.estimated import busy_fraction, cpu_busy_and_total

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Samples:
    """A consistent copy of the timeline: times and cumulative joules per component (same length).

    Attributes:
        t: sample times on the meter's clock.
        energy_j: cumulative joules per component at each sample.
        gpu_util: GPU utilization (percent) per GPU index at each sample, where the meter reports it.
        cpu_util: the whole machine's CPU utilization (percent) since the previous sample; NaN at the first
            sample and wherever it could not be measured. Empty when not recorded.
    """

    t: list[float]
    energy_j: dict[str, list[float]]
    gpu_util: dict[int, list[float]]
    cpu_util: list[float] = field(default_factory=list)

    def cumulative_at(self, t: float) -> dict[str, float]:
        """Cumulative joules per component at instant `t`, interpolated; clamped outside the samples."""
        return {k: interpolate(self.t, v, t) for k, v in self.energy_j.items()}


def _cpu_busy_total() -> tuple[float, float]:
    """Cumulative busy and total CPU seconds of the whole machine, NaN when they cannot be read."""
    # Own deltas of cpu_times() rather than psutil.cpu_percent(): its baseline is kept per calling thread,
    # and samples come from the sampler, the handlers' threads and acquire/release alike.
    try:
        return cpu_busy_and_total()
    except (OSError, psutil.Error):  # utilization is an extra; it must never cost an energy sample
        return math.nan, math.nan


def _percent(busy: list[float], total: list[float]) -> list[float]:
    """Utilization (percent) over each interval between consecutive cumulative samples; NaN for the first."""
    out = [math.nan] if busy else []
    for i in range(1, len(busy)):
        fraction = busy_fraction((busy[i - 1], total[i - 1]), (busy[i], total[i]))  # None when no time passed
        out.append(100.0 * fraction if fraction is not None else math.nan)
    return out


@dataclass(frozen=True)
class _Shared:
    """Which components' joules are shared among calls, for one set of served GPUs."""

    served: frozenset[int] | None
    provenance: dict[str, str]
    held: frozenset[str]
    columns: EnergyColumns
    measured: bool

    @classmethod
    def of(cls, provenance: dict[str, str], served: frozenset[int] | None) -> _Shared:
        shared = {k: p for k, p in provenance.items() if is_attributed(k, served)}
        return cls(served=served, provenance=shared, held=frozenset(provenance.keys() - shared.keys()),
                   columns=EnergyColumns(shared), measured=any(is_measured(p) for p in shared.values()))


class Timeline:
    """Samples a meter in a background thread at a fixed interval and answers energy questions.

    Args:
        meter: the source of cumulative joules; its clock is the timeline's clock.
        interval_s: seconds between samples (0.1 = 10 Hz).
        max_samples: bound on stored samples; older ones are thinned when it is reached.

    Example:
        ```python
        tl = Timeline(auto_meter(), interval_s=0.1)
        tl.acquire()          # starts the sampler
        t0 = tl.clock(); work(); t1 = tl.clock()
        tl.sample_now()
        tl.energy_between(t0, t1)   # {"cpu": 1.9, "dram": 0.8}
        tl.release()          # stops it when no one else holds it
        ```
    """

    def __init__(self, meter: Meter, interval_s: float = 0.1, max_samples: int = 20_000) -> None:
        if not interval_s > 0:
            raise ConfigError(f"sample interval must be positive seconds, got {interval_s!r}")
        if max_samples < 4:
            raise ConfigError(f"max_samples must be at least 4, got {max_samples}")
        self.meter = meter
        self.clock: Clock = meter.clock
        self.interval_s = float(interval_s)
        self.max_samples = int(max_samples)
        self.provenance: dict[str, str] = meter.components()
        self._t: list[float] = []
        self._e: dict[str, list[float]] = {k: [] for k in self.provenance}
        self._util: dict[int, list[float]] = {}
        self.ledger = Ledger(self.provenance)
        self._cpu_busy: list[float] = []  # cumulative CPU seconds, one per sample
        self._cpu_total: list[float] = []
        self._last: tuple[float, dict[str, float]] | None = None  # the newest sample, an edge's included
        self._data_lock = threading.Lock()
        self._ctl_lock = threading.Lock()
        self._edge_lock = threading.Lock()
        self._shared_now: _Shared | None = None
        self._refs = 0
        self._handlers = 0  # energy handlers built on this timeline and still alive (`add_handler`)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        self.last_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Register one user; the first starts the sampler thread (after taking a first sample)."""
        with self._ctl_lock:
            self._refs += 1
            if self._refs == 1:
                _remember(self)
                self.sample_now()
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="energy-timeline", daemon=True)
                self._thread.start()

    def release(self) -> None:
        """Unregister one user; the last stops the sampler, after a final sample."""
        with self._ctl_lock:
            if self._refs == 0:
                return
            self._refs -= 1
            if self._refs == 0:
                self._stop.set()
                thread, self._thread = self._thread, None
                if thread is not None and thread is not threading.current_thread():
                    thread.join(timeout=max(5 * self.interval_s, 1.0))
                self.sample_now()
                _forget(self)

    @property
    def running(self) -> bool:
        """Whether the sampler thread is alive."""
        t = self._thread
        return t is not None and t.is_alive()

    @property
    def users(self) -> int:
        """How many holders keep the sampler running."""
        return self._refs

    @property
    def handlers(self) -> int:
        """How many energy handlers built on this timeline are alive (started or not)."""
        return self._handlers

    def add_handler(self, handler: object) -> None:
        """Count an energy handler built on this timeline until it is collected."""
        with self._ctl_lock:
            self._handlers += 1
        weakref.finalize(handler, self._handler_gone)

    def _handler_gone(self) -> None:
        with self._ctl_lock:
            self._handlers -= 1

    def _run(self) -> None:
        # Event.wait paces the loop and wakes immediately on stop, so stop never waits a full interval.
        measure = getattr(self.meter, "measure_utilization", None)  # (estimates: see `EstimatedMeter.read`)
        while not self._stop.wait(self.interval_s):
            if measure is not None:
                try:
                    measure()
                except Exception as exc:  # like a failed read: counted, never fatal to the sampler
                    self._read_failed(exc)
            self.sample_now()

    # -- sampling ----------------------------------------------------------------------------------------
    def sample_now(self, edge: bool = False) -> None:
        """Take one sample immediately (handlers call this at run boundaries for sharp edges).

        Args:
            edge: a run's edge: the sample sharpens the ledger's split only. The timeline's own copy, which is
                for display, keeps the other samples (the sampler's ticks, explicit ones), each with the
                machine's CPU times, so its utilization has no gaps and edges do not crowd it.
        """
        try:
            r = self.meter.read()
        except Exception as exc:  # a failing meter must not kill the sampler or the user's chain
            self._read_failed(exc)
            return
        with self._data_lock:
            last = self._last
            if last is not None and r.t < last[0]:
                return  # a reading raced a later one: keep time monotone
            # Cumulative joules never fall: a reading that raced another one, or a counter that stepped back,
            # holds the previous value (the meters correct wraps; this only keeps the record consistent).
            read = r.energy_j
            energy = {}
            if last is None:
                for k in self._e:
                    energy[k] = float(read.get(k, 0.0))
            else:
                for k, j in last[1].items():  # (a loop, not a comprehension: this runs at every call's end)
                    now = float(read.get(k, j))
                    energy[k] = now if now > j else j
            self._last = (r.t, energy)
            if last is None or r.t > last[0]:
                self.ledger.add_sample(r.t, energy, held=self._shared().held)
            if not edge:
                self._keep(r, energy)

    def _keep(self, r: Reading, energy: dict[str, float]) -> None:
        """Add a sample to the display copy (under the data lock), replacing one taken at the same instant."""
        # Read under the lock so the cumulative CPU times are stored in the order they were read.
        busy, total = _cpu_busy_total()
        if self._t and r.t == self._t[-1]:
            for k in self._e:
                self._e[k][-1] = energy[k]
            self._cpu_busy[-1], self._cpu_total[-1] = busy, total
            return
        self._t.append(r.t)
        self._cpu_busy.append(busy)
        self._cpu_total.append(total)
        for k, series in self._e.items():
            series.append(energy[k])
        n = len(self._t)
        for i, series in self._util.items():
            series.append(float(r.gpu_util.get(i, series[-1] if series else float("nan"))))
        for i, u in r.gpu_util.items():
            if i not in self._util:
                self._util[i] = [float("nan")] * (n - 1) + [float(u)]
        if n > self.max_samples:
            self._thin()

    def _read_failed(self, exc: Exception) -> None:
        self.errors += 1
        self.last_error = repr(exc)
        if self.errors == 1:
            logger.warning("energy meter read failed (further failures counted silently): %s", exc)

    def _shared(self) -> _Shared:
        served = served_gpus()
        known = self._shared_now
        if known is None or known.served != served:  # it changes only when an engine registers its GPUs
            known = self._shared_now = _Shared.of(self.provenance, served)
        return known

    def attributed_provenance(self) -> dict[str, str]:
        """Provenance of the components whose joules are shared among calls (GPUs the engines serve on)."""
        return dict(self._shared().provenance)

    def attributed_columns(self) -> EnergyColumns:
        """The record columns of the shared components (built once per set of served GPUs)."""
        return self._shared().columns

    @property
    def counters_step(self) -> bool:
        """Whether a shared component is a measured counter, which steps (NVML's, RAPL's): then a run's start is
        sampled, else the time before it would take part of its first step. An estimate is computed at each read
        from the utilization measured over the interval, known at its end: a read at a start would only make
        the time before it use an older utilization, so estimates are read at ends only."""
        return self._shared().measured

    def sample_if_stale(self, max_age_s: float, edge: bool = False) -> None:
        """Sample now unless the newest sample is younger than `max_age_s` (cheap edges for rapid-fire runs)."""
        last = self.last_sample_t
        if last is None or self.clock() - last >= max_age_s:
            self.sample_now(edge=edge)

    def sample_covering(self, t: float) -> None:
        """Make sure a sample at or after `t` exists, reading the meter only if none does (a call's end: its split
        is final only once a sample covers it). Callers at once share one read: each waits for the read in
        progress, which covers every end stamped before it began."""
        with self._edge_lock:
            last = self._last
            if last is None or last[0] < t:
                self.sample_now(edge=True)

    def _thin(self) -> None:
        # Keep the first and last samples and every other one between: cumulative values make this lossless
        # in joules, it only coarsens where within an interval those joules were spent.
        keep = list(range(0, len(self._t) - 1, 2)) + [len(self._t) - 1]
        self._t = [self._t[i] for i in keep]
        self._e = {k: [v[i] for i in keep] for k, v in self._e.items()}
        self._util = {k: [v[i] for i in keep] for k, v in self._util.items()}
        self._cpu_busy = [self._cpu_busy[i] for i in keep]
        self._cpu_total = [self._cpu_total[i] for i in keep]

    # -- queries -----------------------------------------------------------------------------------------
    def snapshot(self) -> Samples:
        """A consistent copy of the stored samples."""
        with self._data_lock:
            return Samples(
                t=list(self._t),
                energy_j={k: list(v) for k, v in self._e.items()},
                gpu_util={k: list(v) for k, v in self._util.items()},
                cpu_util=_percent(self._cpu_busy, self._cpu_total),
            )

    def __len__(self) -> int:
        return len(self._t)

    @property
    def last_sample_t(self) -> float | None:
        """Time of the newest sample (an edge's included), or None before the first."""
        last = self._last  # (one tuple, replaced whole: read without the lock)
        return last[0] if last is not None else None

    def energy_between(self, t0: float, t1: float) -> dict[str, float]:
        """Joules per component between two instants, interpolating between samples."""
        if t1 < t0:
            raise ConfigError(f"energy_between needs t0 <= t1, got {t0} > {t1}")
        with self._data_lock:
            return {k: interpolate(self._t, v, t1) - interpolate(self._t, v, t0) for k, v in self._e.items()}

    def mean_gpu_util(self, t0: float, t1: float) -> dict[int, float]:
        """Mean reported GPU utilization (percent) of samples within [t0, t1], per GPU."""
        with self._data_lock:
            lo, hi = bisect.bisect_left(self._t, t0), bisect.bisect_right(self._t, t1)
            out = {}
            for i, series in self._util.items():
                vals = [u for u in series[lo:hi] if u == u]
                if vals:
                    out[i] = sum(vals) / len(vals)
            return out


# One timeline per meter object per process: handlers built with the same meter share one sampler. An entry
# lives while some handler holds the timeline (it holds the meter, so the id cannot be reused meanwhile).
_registry: dict[int, Timeline] = {}
_registry_lock = threading.Lock()
_default_meter: Meter | None = None


def default_meter() -> Meter:
    """The process-wide automatic meter (built once, on first use)."""
    global _default_meter
    with _registry_lock:
        if _default_meter is None:
            from langchain_energy.meters.composite import auto_meter

            _default_meter = auto_meter()
        return _default_meter


def shared_timeline(meter: Meter | None = None, interval_s: float = 0.1) -> Timeline:
    """The timeline sampling `meter` (the default meter when None), created on first request.

    The first request fixes the interval; a later one asking for a different interval gets the existing
    timeline (one sampler per meter), and the difference is logged.
    """
    meter = meter if meter is not None else default_meter()
    with _registry_lock:
        tl = _registry.get(id(meter))
        if tl is None:
            tl = Timeline(meter, interval_s=interval_s)
            _registry[id(meter)] = tl
        elif tl.interval_s != interval_s:
            logger.info("timeline already samples every %.3fs; ignoring request for %.3fs", tl.interval_s, interval_s)
        return tl


def _remember(tl: Timeline) -> None:
    with _registry_lock:
        _registry.setdefault(id(tl.meter), tl)


def _forget(tl: Timeline) -> None:
    with _registry_lock:
        if _registry.get(id(tl.meter)) is tl:
            del _registry[id(tl.meter)]
