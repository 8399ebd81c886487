"""GPU power cap: set, verify by reading back, and always restore the original limit.

The power cap goes through Zeus's device layer (``zeus.device.get_gpus()``); :class:`PowerCap` reads the
original limit first and puts it back at the end, on an exception, on Ctrl-C and on SIGTERM. Its dry-run mode
only records the caps asked for. :class:`SimulatedGPU` is a test double of one GPU's power-limit interface
(a range and a privilege flag) for tests and rehearsals without a GPU.

Example:
    >>> gpu = SimulatedGPU(min_w=100, max_w=300, default_w=250)
    >>> with PowerCap(gpu) as cap:
    ...     cap.set(150)
    >>> gpu.get_power_management_limit(0)
    250000
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from langchain_energy.errors import ConfigError, PowerCapError, PowerCapPermissionError


class PowerLimitDevice(Protocol):
    """The part of Zeus's ``GPUs`` interface the power cap uses (all limits in mW)."""

    def get_power_management_limit_constraints(self, gpu_index: int) -> tuple[int, int]: ...

    def get_power_management_limit(self, gpu_index: int) -> int: ...

    def set_power_management_limit(self, gpu_index: int, power_limit_mw: int, block: bool = True) -> None: ...


class SimulatedGPU:
    """Test double of one GPU's power-limit interface: enforces a range and a privilege flag.

    With ``state_path`` the limit lives in a JSON file, so another process can check what a killed process
    left behind. Nothing here touches real hardware.

    Example:
        >>> gpu = SimulatedGPU(min_w=200, max_w=700, default_w=700, privileged=False)
        >>> gpu.get_power_management_limit_constraints(0)
        (200000, 700000)
    """

    def __init__(
        self,
        min_w: float = 200,
        max_w: float = 700,
        default_w: float = 700,
        privileged: bool = True,
        state_path: str | os.PathLike[str] | None = None,
        fail_readback: bool = False,
    ) -> None:
        self.min_mw, self.max_mw = int(min_w * 1000), int(max_w * 1000)
        self.privileged = privileged
        self.fail_readback = fail_readback
        self.state_path = Path(state_path) if state_path else None
        self.set_calls: list[int] = []
        self._limit_mw = int(default_w * 1000)
        if self.state_path and self.state_path.exists():
            self._limit_mw = int(json.loads(self.state_path.read_text())["limit_mw"])
        self._save()

    def _save(self) -> None:
        if self.state_path:
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"limit_mw": self._limit_mw}))
            os.replace(tmp, self.state_path)

    def _check(self, gpu_index: int) -> None:
        if gpu_index != 0:
            raise PowerCapError(f"simulated GPU has only index 0, got {gpu_index}")

    def get_power_management_limit_constraints(self, gpu_index: int) -> tuple[int, int]:
        """Allowed range in mW."""
        self._check(gpu_index)
        return self.min_mw, self.max_mw

    def get_power_management_limit(self, gpu_index: int) -> int:
        """Current limit in mW (5 W low when ``fail_readback`` simulates a limit that did not stick)."""
        self._check(gpu_index)
        return self._limit_mw - (5000 if self.fail_readback else 0)

    def set_power_management_limit(self, gpu_index: int, power_limit_mw: int, block: bool = True) -> None:
        """Set the limit; refuses without privilege or outside the range, like NVML."""
        self._check(gpu_index)
        if not self.privileged:
            raise PermissionError("simulated GPU: setting the power limit needs SYS_ADMIN")
        if not self.min_mw <= power_limit_mw <= self.max_mw:
            raise ValueError(f"simulated GPU: {power_limit_mw} mW outside [{self.min_mw}, {self.max_mw}]")
        self.set_calls.append(int(power_limit_mw))
        self._limit_mw = int(power_limit_mw)
        self._save()

    def can_set_limits(self) -> bool:
        """Whether this process may set the limit."""
        return self.privileged


def has_sys_admin() -> bool:
    """Whether this process is root or holds CAP_SYS_ADMIN (what NVML wants for setting power limits)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 21))
    except OSError:
        pass
    return False


def zeus_gpus() -> PowerLimitDevice:
    """Zeus's GPU manager.

    Raises:
        PowerCapError: no NVIDIA/AMD GPU management library or GPU on this machine.
    """
    try:
        from zeus.device import get_gpus

        gpus = get_gpus()
    except Exception as exc:  # Zeus raises its own init errors when no GPU library/device exists
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PowerCapError(f"no GPU to power-cap on this machine ({first}); {_NO_GPU_HINT}") from exc
    if len(gpus) == 0:
        raise PowerCapError(f"no GPU to power-cap on this machine; {_NO_GPU_HINT}")
    return gpus


_NO_GPU_HINT = "a power cap needs a GPU even to be recorded (use --power-cap-mode simulate to rehearse)"


def _is_permission_error(exc: BaseException) -> bool:
    return isinstance(exc, PermissionError) or "NoPermission" in type(exc).__name__


#: How a command treats its power caps (``--power-cap-mode``).
POWER_CAP_MODES = ("dry-run", "apply", "simulate")
POWER_CAP_MODE_HELP = ("dry-run (default): check each cap against the GPU's range and record it as NOT applied; "
                       "apply: set it through Zeus (needs root), restored at exit; simulate: a simulated GPU, "
                       "for rehearsals without one")


@dataclass
class PowerCapEvent:
    """One thing the power cap did: ``action`` is read, set, restore or dry-run."""

    action: str
    watts: float
    verified_watts: float | None = None


@dataclass
class PowerCap:
    """Set a GPU power cap and always restore the original limit.

    Use as a context manager: the original limit is read on entry and written back (and verified) on exit,
    on an exception, on Ctrl-C (KeyboardInterrupt unwinds through the exit) and on SIGTERM (a handler
    restores, then exits with status 143). In ``dry_run`` the device's limit is never set: each requested
    cap is checked against its range and recorded in ``events`` (``mode`` says which of the two happened).

    Args:
        device: a Zeus-like device (``zeus.device.get_gpus()`` when None and not dry-run).
        gpu_index: which GPU.
        dry_run: record requested caps only.
        tolerance_w: how far a read-back may differ from the requested cap.

    Example:
        >>> with PowerCap(SimulatedGPU(min_w=100), dry_run=True) as cap:
        ...     cap.set(150)
        >>> [(e.action, e.watts) for e in cap.events]
        [('dry-run', 150)]
    """

    device: PowerLimitDevice | None = None
    gpu_index: int = 0
    dry_run: bool = False
    tolerance_w: float = 1.0
    events: list[PowerCapEvent] = field(default_factory=list)
    original_mw: int | None = None
    current_w: float | None = None
    _old_handlers: dict[int, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _entered: bool = field(default=False, repr=False)

    def _dev(self) -> PowerLimitDevice:
        if self.device is None:
            self.device = zeus_gpus()
        return self.device

    @classmethod
    def for_mode(cls, mode: str) -> PowerCap:
        """The power cap of a ``--power-cap-mode`` (see ``POWER_CAP_MODES``).

        Raises:
            ConfigError: an unknown mode.
        """
        if mode == "simulate":
            return cls(SimulatedGPU())
        if mode not in POWER_CAP_MODES:
            raise ConfigError(f"unknown power-cap mode {mode!r}; choose one of: {', '.join(POWER_CAP_MODES)}")
        return cls(dry_run=mode == "dry-run")

    @property
    def mode(self) -> str:
        """``dry-run`` (caps recorded, never set), ``simulated`` (set on the test double) or ``applied``."""
        if self.dry_run:
            return "dry-run"
        return "simulated" if isinstance(self.device, SimulatedGPU) else "applied"

    def range_w(self) -> tuple[float, float]:
        """The device's allowed power-limit range in W."""
        lo, hi = self._dev().get_power_management_limit_constraints(self.gpu_index)
        return lo / 1000, hi / 1000

    def current_limit_w(self) -> float:
        """The device's current limit in W."""
        return self._dev().get_power_management_limit(self.gpu_index) / 1000

    def preflight(self, caps_w: Sequence[float]) -> None:
        """Check, before any trial runs, that every cap is settable: in range and with the privilege.

        The range is checked in every mode, dry run included: a cap no device here could take is not recorded
        as if it were one. Only the privilege is the dry run's to skip.

        Raises:
            ConfigError: a cap that is not a positive number.
            PowerCapError: a cap outside the device's range, or no GPU (and no simulated device).
            PowerCapPermissionError: this process may not set power limits (not in a dry run).
        """
        for cap in caps_w:
            if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 0:
                raise ConfigError(f"power cap must be a positive number of watts, got {cap!r}")
        if not caps_w:
            return
        lo, hi = self.range_w()
        bad = [c for c in caps_w if not lo <= c <= hi]
        if bad:
            raise PowerCapError(f"power cap(s) {bad} W outside this GPU's range [{lo:g}, {hi:g}] W")
        if self.dry_run:
            return
        dev = self._dev()
        allowed = dev.can_set_limits() if hasattr(dev, "can_set_limits") else has_sys_admin()
        if not allowed:
            raise PowerCapPermissionError(
                "setting the GPU power limit needs root or CAP_SYS_ADMIN; run with that privilege "
                "or use the dry-run mode (--power-cap-mode dry-run)"
            )

    def __enter__(self) -> PowerCap:
        self._entered = True
        return self

    def _remember_original(self) -> None:
        # Read lazily, on the first cap: a sweep without caps never needs a GPU.
        if self.original_mw is None:
            self.original_mw = self._dev().get_power_management_limit(self.gpu_index)
            self.events.append(PowerCapEvent("read", self.original_mw / 1000))
            self._install_handlers()

    def __exit__(self, *exc: object) -> None:
        try:
            self.restore()
        finally:
            self._remove_handlers()
            self._entered = False

    def set(self, watts: float) -> None:
        """Set the cap to ``watts`` and verify it by reading it back.

        Raises:
            PowerCapError: outside the range, or the read-back differs.
            PowerCapPermissionError: the device refused for lack of privilege.
        """
        if self.dry_run:
            self._check_range(watts)
            self.events.append(PowerCapEvent("dry-run", watts))
            self.current_w = watts
            return
        if not self._entered:
            raise PowerCapError("use PowerCap as a context manager so the original limit is restored")
        self._check_range(watts)
        self._remember_original()
        got = self._write(int(round(watts * 1000)))
        self.events.append(PowerCapEvent("set", watts, got))
        self.current_w = watts

    def _check_range(self, watts: float) -> None:
        lo, hi = self.range_w()
        if not lo <= watts <= hi:
            raise PowerCapError(f"power cap {watts:g} W outside this GPU's range [{lo:g}, {hi:g}] W")

    def _write(self, mw: int) -> float:
        dev = self._dev()
        try:
            dev.set_power_management_limit(self.gpu_index, mw)
        except Exception as exc:
            if _is_permission_error(exc):
                raise PowerCapPermissionError(f"the GPU refused a power limit of {mw / 1000:g} W: {exc}") from exc
            raise PowerCapError(f"could not set the GPU power limit to {mw / 1000:g} W: {exc}") from exc
        got = dev.get_power_management_limit(self.gpu_index) / 1000
        if abs(got - mw / 1000) > self.tolerance_w:
            raise PowerCapError(f"power limit set to {mw / 1000:g} W but reads back {got:g} W")
        return got

    def unset(self) -> None:
        """Go back to the original limit for now; later :meth:`set` calls still work."""
        with self._lock:
            self._put_back(final=False)

    def restore(self) -> None:
        """Write the original limit back for good (once; later calls do nothing)."""
        with self._lock:
            self._put_back(final=True)

    def _put_back(self, final: bool) -> None:
        if self.dry_run:
            self.current_w = None
            return
        if self.original_mw is None:
            return
        original = self.original_mw
        if final:
            self.original_mw = None
        now = self._dev().get_power_management_limit(self.gpu_index)
        # Only write when something changed: an unprivileged run that never capped must not fail here.
        if now != original:
            got = self._write(original)
            self.events.append(PowerCapEvent("restore", original / 1000, got))
        self.current_w = None

    # Signals: SIGTERM (and SIGHUP) would kill the process without unwinding; restore first, then exit.
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _remove_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        try:
            self.restore()
        finally:
            self._remove_handlers()
            raise SystemExit(128 + signum)
