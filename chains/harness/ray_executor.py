"""Run a sweep on a Ray cluster: one Ray actor per engine configuration, on exactly the GPUs its engine needs.

``sweep --ray [ADDRESS]`` (and ``tune``, ``study``) hand their configurations to `RayExecutor` instead of
running them one after another. Each configuration becomes an actor that asks Ray for ``tensor-parallel``
GPUs (one CPU on a cluster without GPUs). Ray sets the actor's ``CUDA_VISIBLE_DEVICES``, so the engine the
actor starts serves on those devices and the actor's meter reads those GPUs and no other; the node's own
indices of them (``ray.get_gpu_ids()``) go into every record with the node's host name, and to a ``zeusd``
meter, which numbers a node's GPUs that way. The actor runs the configuration's trials one at a time and
returns each record to this process, the driver, which alone writes the store (atomically, under the store's
lock), so a killed driver or worker loses at most the trials in flight and a rerun runs exactly those.

A configuration that asks for more GPUs than any node has is recorded infeasible without waiting; one whose
worker dies (or whose trial raises) is retried once on a new worker, then recorded ``failed`` with the
reason. Without an address a local Ray starts on this machine; an address that does not answer is a
one-line error within seconds.

Example:
    >>> from chains.harness.sweep import run_sweep                                   # doctest: +SKIP
    >>> executor = RayExecutor(make_runner=lambda where: EngineTrialRunner(engine))  # doctest: +SKIP
    >>> run_sweep(spec, store, EngineTrialRunner(engine), executor=executor)          # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from chains.harness.progress import WorkerProgress
from chains.harness.record import STATUS_FAILED, STATUS_INFEASIBLE
from chains.harness.store import ResultStore
from chains.harness.sweep import SweepConfig, SweepOutcome, make_record
from langchain_energy.errors import ConfigError, InfeasibleConfigError
from langchain_energy.power import PowerCap

RAY_EXTRA = "pip install 'langchain-energy[ray]'"
CONNECT_TIMEOUT_S = 5.0


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        ConfigError: ray is not installed (the message names the extra), or cannot be imported.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs the ray extra: {RAY_EXTRA}") from None
    except Exception as exc:  # noqa: BLE001 - an import that fails inside ray's accelerator probes
        # Known case: the amdsmi package (a Zeus dependency) without ROCm's library raises KeyError on import.
        raise ConfigError(f"ray is installed but cannot be imported ({type(exc).__name__}: {exc}); on a machine "
                          "without AMD GPUs `pip uninstall amdsmi` removes the known cause") from None
    return ray


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _probe(address: str) -> None:
    """Fail fast when nothing listens at ``address`` (``host:port`` or ``ray://host:port``)."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"Ray address {address!r} is malformed; write HOST:PORT (e.g. 10.0.0.5:6379), "
                          "ray://HOST:10001 or auto")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"Ray address {address} does not answer ({exc.strerror or exc}); start the cluster "
                          "(ray start --head) or check the address") from None


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> Any:
    """Connect this process to Ray: the cluster at ``address``, or a new local Ray (``num_cpus`` and ``num_gpus``
    of this machine; None: all it has).

    A process already connected keeps its connection.

    Raises:
        ConfigError: no ray, an address that does not answer, or a cluster that refuses the connection.
    """
    ray = import_ray()
    if address and address != "auto":
        _probe(address)
    if ray.is_initialized():
        return ray
    # Workers import the driver's own modules (a runner defined beside the sweep) as the driver does.
    path = os.pathsep.join(dict.fromkeys(p for p in (os.getcwd(), *_own_paths(), os.environ.get("PYTHONPATH")) if p))
    options: dict[str, Any] = {"log_to_driver": False, "runtime_env": {"env_vars": {"PYTHONPATH": path}}}
    if not address:
        options.update(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)
        # Ray's memory monitor kills workers when the *machine* runs low, whoever uses the memory; an engine
        # that does not fit is already recorded infeasible by its own start. (Set it to a period to keep it.)
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    try:
        ray.init(address=address or None, **options)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError: all one line for the user
        raise ConfigError(f"cannot connect to Ray{f' at {address}' if address else ''}: {_first_line(exc)}") from None
    return ray


def _own_paths() -> list[str]:
    """This process's import paths outside the Python installation (its packages are installed on workers)."""
    installed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    return [p for p in sys.path if p and os.path.isdir(p)
            and not any(os.path.realpath(p).startswith(root) for root in installed)]


class ConfigWorker:
    """The Ray actor of one configuration: its runner (engine) on the GPUs Ray gave it, trial by trial.

    Args:
        make_runner: builds the trial runner in the worker, from where it runs (``node``, ``gpus``: the node's
            indices of the GPUs Ray assigned, ``pid``).
        power_cap_mode: the sweep's ``--power-cap-mode``; a cap is set on every GPU of the engine.
    """

    def __init__(self, make_runner: Callable[[Mapping[str, Any]], Any], power_cap_mode: str = "dry-run") -> None:
        import ray

        gpus = [int(g) if str(g).isdigit() else g for g in ray.get_gpu_ids()]
        self.where: dict[str, Any] = {"node": socket.gethostname(), "gpus": gpus, "pid": os.getpid()}
        self.runner = make_runner(self.where)
        self.power_cap_mode = power_cap_mode
        self.caps: list[PowerCap] = []

    def prepare(self, config: SweepConfig) -> tuple[dict[str, Any], str | None]:
        """Start the engine and set the configuration's power cap; returns (where, reason it is infeasible)."""
        try:
            self.runner.prepare(config)
        except InfeasibleConfigError as exc:
            return self.where, _first_line(exc)
        cap = config.settings.get("power_cap_w")
        if cap is not None:
            # This process sees only its engine's GPUs, as 0..n-1: the cap goes on each of them.
            for index in range(max(1, len(self.where["gpus"]))):
                pc = PowerCap.for_mode(self.power_cap_mode)
                if pc.mode != "simulated":  # each simulated device is one GPU of its own, index 0
                    pc.gpu_index = index
                pc.__enter__()
                self.caps.append(pc)
                pc.set(cap)
        return self.where, None

    def run(self, config: SweepConfig, repeat: int, attempt: int) -> Any:
        """One trial, as the store's record (with where and when it ran)."""
        started, t0 = time.time(), time.monotonic()
        result = self.runner.run(config, repeat)
        meta: dict[str, Any] = {"trial_wall_s": time.monotonic() - t0, "started_at": started,
                                "ended_at": time.time(), "node": self.where["node"], "gpus": self.where["gpus"],
                                "attempt": attempt}
        if self.caps:
            meta["power_cap_mode"] = self.caps[0].mode
            meta["power_cap_gpus"] = self.where["gpus"]
        return make_record(config, repeat, result, meta)

    def close(self) -> None:
        """Stop the engine and put the GPUs' power limits back."""
        try:
            self.runner.close()
        finally:
            for pc in self.caps:
                pc.__exit__(None, None, None)
            self.caps = []


@dataclass
class _Job:
    """A configuration on its way through the cluster."""

    index: int
    config: SweepConfig
    pending: list[int]
    gpus: int
    attempt: int = 0
    actor: Any = None
    where: dict[str, Any] = field(default_factory=dict)
    total: int = 0

    @property
    def name(self) -> str:
        return f"{self.config.workload} {self.config.knob}={self.config.value}"


@dataclass
class RayExecutor:
    """Runs a sweep's configurations as Ray actors, in parallel as the cluster's resources allow.

    Args:
        make_runner: builds a trial runner inside a worker from where it runs (``{"node", "gpus", "pid"}``);
            it must be picklable (a function, or a class defined in an importable module).
        address: the Ray cluster (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``); None starts a local Ray.
        power_cap_mode: ``--power-cap-mode`` for the caps each worker sets on its engine's GPUs.
        num_cpus: CPUs of a local Ray (None: all of this machine's).
        retries: how many times a configuration whose worker died is retried on a new worker.
        progress: show one line per worker.

    Example:
        >>> RayExecutor(make_runner=print, address="10.0.0.5:6379").retries
        1
    """

    make_runner: Callable[[Mapping[str, Any]], Any]
    address: str | None = None
    power_cap_mode: str = "dry-run"
    num_cpus: int | None = None
    retries: int = 1
    progress: bool = True

    @staticmethod
    def gpus_needed(config: SweepConfig) -> int:
        """The GPUs of ``config``'s engine: its tensor-parallel size (1 when unset)."""
        return int(config.settings.get("tensor_parallel_size") or 1)

    def run(self, work: Sequence[tuple[SweepConfig, list[int]]], store: ResultStore, outcome: SweepOutcome,
            bar: Any, deadline: float | None) -> None:
        """Run ``work`` on the cluster; every finished trial is appended to ``store`` here, as it arrives."""
        ray = connect(self.address, self.num_cpus)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        largest = max((int(n.get("Resources", {}).get("GPU", 0)) for n in nodes), default=0)
        on_gpus = largest > 0
        worker_class = ray.remote(ConfigWorker)
        lines = WorkerProgress(disable=not self.progress)
        jobs: list[_Job] = []
        for i, (config, pending) in enumerate(work):
            if not pending:
                continue
            job = _Job(i, config, list(pending), self.gpus_needed(config) if on_gpus else 0, total=len(pending))
            if on_gpus and job.gpus > largest:
                self._give_up(job, store, outcome, bar, STATUS_INFEASIBLE,
                              f"needs {job.gpus} GPUs on one node; the largest node of the cluster has {largest}")
                continue
            if not on_gpus and self.gpus_needed(config) > 1:
                self._give_up(job, store, outcome, bar, STATUS_INFEASIBLE,
                              f"needs {self.gpus_needed(config)} GPUs; the cluster has none")
                continue
            jobs.append(job)
        in_flight: dict[Any, tuple[_Job, str, int | None]] = {}

        def past() -> bool:
            return deadline is not None and time.monotonic() >= deadline

        def start(job: _Job) -> None:
            if past():  # no engine starts after the deadline; a rerun resumes
                return
            job.attempt += 1
            resources = {"num_gpus": job.gpus, "num_cpus": 1}
            job.actor = worker_class.options(max_restarts=0, max_task_retries=0, **resources).remote(
                self.make_runner, self.power_cap_mode)
            in_flight[job.actor.prepare.remote(job.config)] = (job, "prepare", None)

        def advance(job: _Job) -> None:
            if job.pending and not past():
                repeat = job.pending[0]
                done = job.total - len(job.pending)
                lines.show(str(job.index), f"{job.where.get('node', '?')} gpus{job.where.get('gpus', [])} "
                                           f"{job.name}: trial {done + 1}/{job.total}")
                in_flight[job.actor.run.remote(job.config, repeat, job.attempt)] = (job, "trial", repeat)
            else:
                lines.done(str(job.index))
                in_flight[job.actor.close.remote()] = (job, "close", None)

        try:
            for job in jobs:
                start(job)
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                job, what, repeat = in_flight.pop(ready[0])
                try:
                    value = ray.get(ready[0])
                except Exception as exc:  # noqa: BLE001 - a dead worker or a trial that raised
                    if what == "close":
                        self._kill(ray, job)
                        continue
                    self._kill(ray, job)
                    lines.done(str(job.index))
                    reason = _reason(exc)
                    if job.attempt <= self.retries:
                        print(f"retrying {job.name} on a new worker: {reason}", file=sys.stderr)
                        start(job)
                    else:
                        self._give_up(job, store, outcome, bar, STATUS_FAILED,
                                      f"worker failed {job.attempt} times; last: {reason}")
                    continue
                if what == "prepare":
                    job.where, infeasible = value
                    if infeasible:
                        self._give_up(job, store, outcome, bar, STATUS_INFEASIBLE, infeasible)
                        in_flight[job.actor.close.remote()] = (job, "close", None)
                        continue
                    advance(job)
                elif what == "trial":
                    if value.key not in store.done_keys():
                        store.append(value)
                        outcome.ran += 1
                        bar.update(1)
                    job.pending.remove(repeat)
                    advance(job)
                else:
                    self._kill(ray, job)
        finally:
            lines.close()
            for job in jobs:
                self._kill(ray, job)

    @staticmethod
    def _kill(ray: Any, job: _Job) -> None:
        if job.actor is not None:
            try:
                ray.kill(job.actor)
            except Exception:  # noqa: BLE001 - already dead
                pass
            job.actor = None

    @staticmethod
    def _give_up(job: _Job, store: ResultStore, outcome: SweepOutcome, bar: Any, status: str, reason: str) -> None:
        """Record every pending repeat of ``job`` with ``status`` (a resumed sweep sees it finished)."""
        done = store.done_keys()
        for repeat in job.pending:
            if job.config.key(repeat) not in done:
                store.append(make_record(job.config, repeat, status=status, reason=reason,
                                         extra_meta={"node": job.where.get("node"), "gpus": job.where.get("gpus"),
                                                     "attempt": job.attempt}))
                bar.update(1)
        job.pending = []
        (outcome.infeasible if status == STATUS_INFEASIBLE else outcome.failed).append(f"{job.name}: {reason}")
        print(f"{status}: {job.name}: {reason}", file=sys.stderr)


def _reason(exc: BaseException) -> str:
    """One line on why a worker's call failed: the trial's own exception, or how the worker died."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {_first_line(cause)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"
