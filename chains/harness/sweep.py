"""The sweep loop: plan a sweep's configurations, run each trial not yet stored, write it as it finishes.

Each ``--knob`` is swept one at a time with the other knobs at their defaults (the study's design);
``--across`` crosses a knob with every swept configuration (``--across backend=vllm,parrot`` compares
serving systems at every point). Engine knobs (batch size, prefix caching) get one engine per value, started
once and restarted when the value changes; the prefix cache is reset before every trial. Each trial is
written to the store as soon as it finishes; rerunning the same command skips finished trials. A configuration
whose engine cannot start for lack of memory is recorded as infeasible with the reason and the sweep goes on.

Example:
    >>> spec = SweepSpec(workloads=["search"], knobs={"batch-size": [1, 2]}, repeats=2)
    >>> [(c.knob, c.value, c.settings["batch_size"]) for c in plan(spec, {"batch_size": 8})]
    [('batch-size', 1, 1), ('batch-size', 2, 2)]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Protocol

import pandas as pd
from tqdm import tqdm

from chains.harness.knobs import KNOBS, knob
from chains.harness.record import STATUS_INFEASIBLE, TrialRecord, split_settings
from chains.harness.store import ResultStore, SweepSpec, frame_records, trial_key
from langchain_energy.errors import InfeasibleConfigError
from langchain_energy.power import PowerCap


@dataclass
class SweepConfig:
    """One configuration of a sweep: a workload with every knob it sets.

    Attributes:
        workload: workload name.
        knob: the swept knob; ``value`` its value here.
        assign: every knob set by the sweep for this configuration (swept and crossed).
        settings: run-settings fields (defaults, then the sweep's fixed settings, then ``assign``).
    """

    workload: str
    knob: str
    value: Any
    assign: dict[str, Any]
    settings: dict[str, Any]

    def key(self, repeat: int) -> str:
        """The store key of this configuration's ``repeat``-th trial."""
        return trial_key(self.workload, self.assign, repeat)

    def engine_key(self) -> tuple[tuple[str, Any], ...]:
        """What needs the same engine: the backend and every engine knob's value."""
        fields = [k.field for k in KNOBS.values() if k.is_engine_knob]
        return (("backend", self.settings.get("backend")), *((f, self.settings.get(f)) for f in fields))


def plan(spec: SweepSpec, defaults: Mapping[str, Any]) -> list[SweepConfig]:
    """Every configuration of ``spec``, grouped so each engine starts once per value.

    Args:
        spec: the sweep.
        defaults: run-settings defaults (field name -> value) for the knobs not swept.
    """
    fixed = dict(spec.fixed.get("settings", {}))
    across_names = list(spec.across)
    configs = []
    for workload in spec.workloads:
        for combo in product(*(spec.across[n] for n in across_names)):
            crossed = dict(zip(across_names, combo))
            for name, values in spec.knobs.items():
                for value in values:
                    assign = {**crossed, name: value}
                    settings = {**defaults, **fixed, "workload": workload}
                    settings.update({knob(k).field: v for k, v in assign.items()})
                    configs.append(SweepConfig(workload, name, value, assign, settings))
    # Stable sort by engine identity: fewer restarts, same order of trials within an engine.
    order: dict[tuple, int] = {}
    for c in configs:
        order.setdefault(c.engine_key(), len(order))
    return sorted(configs, key=lambda c: order[c.engine_key()])


class TrialRunner(Protocol):
    """What the sweep loop needs from whoever runs trials."""

    def prepare(self, config: SweepConfig) -> None:
        """Make the engine for ``config`` ready (restart when its engine knobs changed).

        Raises InfeasibleConfigError when the engine cannot start for lack of memory."""

    def run(self, config: SweepConfig, repeat: int) -> Any:
        """Run one trial; returns an object with ``summary`` and ``runs`` DataFrames and a ``meta`` dict."""

    def close(self) -> None:
        """Stop whatever :meth:`prepare` started."""


@dataclass
class SweepOutcome:
    """What a sweep call did: trials run now, skipped as already stored, infeasible and failed configurations."""

    ran: int = 0
    skipped: int = 0
    infeasible: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass
class _Pace:
    """How long this call's engine starts and trials took, to tell whether another configuration fits."""

    longest_prepare_s: float = 0.0
    shortest_trial_s: float | None = None

    def fits(self, deadline: float | None) -> bool:
        """Whether an engine start plus the shortest trial seen so far ends before ``deadline``."""
        if deadline is None:
            return True
        needed = self.longest_prepare_s + (self.shortest_trial_s or 0.0)
        return time.monotonic() + needed < deadline


def make_record(config: SweepConfig, repeat: int, result: Any = None, extra_meta: Mapping[str, Any] | None = None,
            **outcome: Any) -> TrialRecord:
    """The store's record of one trial of ``config``: each knob's value once, typed, then what the trial gave."""
    meta = dict(getattr(result, "meta", {}) or {})
    timeline = getattr(result, "timeline", None)
    if timeline is None:
        timeline = meta.pop("timeline", None)
    meta.update(extra_meta or {})
    knobs, settings = split_settings(config.settings)
    return TrialRecord(
        key=config.key(repeat),
        workload=config.workload,
        knob=config.knob,
        repeat=repeat,
        knobs=knobs,
        swept=list(config.assign),
        settings=settings,
        summary=frame_records(getattr(result, "summary", None)),
        runs=frame_records(getattr(result, "runs", None)),
        timeline=frame_records(pd.DataFrame(timeline)) if timeline is not None else [],
        meta=meta,
        **outcome,
    )


_record = make_record  # the name older tests import


class Executor(Protocol):
    """Runs the pending trials of a sweep's configurations, handing each finished record to the store.

    `LocalExecutor` runs them one configuration after another in this process;
    `chains.harness.ray_executor.RayExecutor` spreads them over a Ray cluster. Either way only this process
    writes the store.
    """

    def run(self, work: Sequence[tuple[SweepConfig, list[int]]], store: ResultStore, outcome: SweepOutcome,
            bar: Any, deadline: float | None) -> None:
        """Run the ``(configuration, pending repeats)`` of ``work``, appending each record to ``store``."""


@dataclass
class LocalExecutor:
    """One configuration after another in this process, on ``runner``, under ``power_cap``.

    Example:
        >>> LocalExecutor(runner=None).power_cap.mode
        'dry-run'
    """

    runner: Any
    power_cap: PowerCap = field(default_factory=lambda: PowerCap(dry_run=True))

    def run(self, work: Sequence[tuple[SweepConfig, list[int]]], store: ResultStore, outcome: SweepOutcome,
            bar: Any, deadline: float | None) -> None:
        """Run ``work`` in order; the original power limit is restored at the end."""
        pace = _Pace()
        with self.power_cap:
            for config, pending in work:
                if pending and pace.fits(deadline):
                    _run_config(config, pending, store, self.runner, self.power_cap, outcome, bar, deadline, pace)


def run_sweep(
    spec: SweepSpec,
    store: ResultStore,
    runner: TrialRunner,
    defaults: Mapping[str, Any] | None = None,
    power_cap: PowerCap | None = None,
    progress: bool = True,
    deadline: float | None = None,
    executor: Executor | None = None,
) -> SweepOutcome:
    """Run every trial of ``spec`` not already in ``store``.

    The power caps are checked (range, privilege) before any trial runs, and the original limit is
    restored at the end whatever happens. With a ``deadline`` (a ``time.monotonic()`` instant) no trial
    starts after it, and no configuration starts whose engine start plus the shortest trial seen so far
    would end after it; the next call with the same store resumes there. An ``executor`` runs the trials
    elsewhere (a Ray cluster); ``runner`` then only checks the configurations before anything starts.

    Raises:
        SweepMismatchError: the store holds a different sweep.
        PowerCapError / PowerCapPermissionError: a power cap cannot be applied.
    """
    configs = plan(spec, defaults or {})
    power_cap = power_cap or PowerCap(dry_run=True)
    preflight(configs, runner, power_cap)  # before the store is created: a sweep that cannot run leaves nothing
    with store.writer():
        store.init(spec)
        return run_configs(configs, spec.repeats, store, runner, power_cap, progress, deadline, executor)


def preflight(configs: Sequence[SweepConfig], runner: TrialRunner, power_cap: PowerCap) -> None:
    """Check the configurations' power caps (range, privilege) and, where the runner can, their settings.

    Raises:
        PowerCapError / PowerCapPermissionError: a power cap cannot be applied.
        ConfigError: a configuration the runner refuses.
    """
    caps = sorted({c.settings["power_cap_w"] for c in configs if c.settings.get("power_cap_w") is not None})
    power_cap.preflight(caps)
    if hasattr(runner, "check"):
        runner.check(configs)


def run_configs(
    configs: Sequence[SweepConfig],
    repeats: int,
    store: ResultStore,
    runner: TrialRunner,
    power_cap: PowerCap | None = None,
    progress: bool = True,
    deadline: float | None = None,
    executor: Executor | None = None,
) -> SweepOutcome:
    """Run the ``repeats`` trials of each of ``configs`` that ``store`` (already initialised) lacks.

    What `run_sweep` does after planning; the tuner calls it with the configurations it picks. The runner is
    closed and the original power limit restored at the end, whatever happens. ``executor`` (default: a
    `LocalExecutor` on ``runner`` and ``power_cap``) decides where the trials run.
    """
    executor = executor or LocalExecutor(runner, power_cap or PowerCap(dry_run=True))
    done = store.done_keys()
    total = len(configs) * repeats
    outcome = SweepOutcome(skipped=sum(c.key(r) in done for c in configs for r in range(repeats)))
    bar = tqdm(total=total, initial=outcome.skipped, desc="trials", unit="trial", disable=not progress)
    work = [(c, [r for r in range(repeats) if c.key(r) not in done]) for c in configs]
    try:
        executor.run(work, store, outcome, bar, deadline)
    finally:
        bar.close()
        runner.close()
    return outcome


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _run_config(config, pending, store, runner, power_cap, outcome, bar, deadline, pace) -> None:
    bar.set_postfix_str(f"{config.workload} {config.knob}={config.value}")
    cap = config.settings.get("power_cap_w")
    try:
        started = time.monotonic()
        runner.prepare(config)
        pace.longest_prepare_s = max(pace.longest_prepare_s, time.monotonic() - started)
        if cap is not None:
            power_cap.set(cap)
        else:
            power_cap.unset()  # configurations without a cap run at the device's original limit
        for repeat in pending:
            if _past(deadline):
                return
            t0 = time.monotonic()
            result = runner.run(config, repeat)
            wall = time.monotonic() - t0
            pace.shortest_trial_s = wall if pace.shortest_trial_s is None else min(wall, pace.shortest_trial_s)
            meta = {"trial_wall_s": wall}
            if cap is not None:  # the value itself is the knob's; here only whether it was really set
                meta["power_cap_mode"] = power_cap.mode
            store.append(make_record(config, repeat, result, meta))
            outcome.ran += 1
            bar.update(1)
    except InfeasibleConfigError as exc:
        # Recorded per remaining repeat, so a resumed sweep sees the configuration as finished.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for repeat in pending:
            if config.key(repeat) not in store.done_keys():
                store.append(make_record(config, repeat, status=STATUS_INFEASIBLE, reason=reason))
                bar.update(1)
        outcome.infeasible.append(f"{config.workload} {config.knob}={config.value}: {reason}")
        tqdm.write(f"infeasible: {config.workload} {config.knob}={config.value}: {reason}", file=sys.stderr)
