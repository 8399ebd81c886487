"""The tuner: search the serving knobs for the least energy (or energy per token) that meets a latency SLO.

``python -m chains.run tune --workload search --objective energy --slo 'p90_latency_s<=20' --trials 30 --out DIR``

The default configuration is measured first; then every configuration when the space fits in the budget,
else coordinate descent from the best configuration so far (one knob, one step at a time), and Optuna's TPE
sampler (multi-objective: the energy objective and a latency metric, seeded, with the SLO as a constraint)
whenever that reaches a local optimum (see `tune`). The configurations are of the knobs in
`chains.harness.knobs.TUNE_VALUES`; each one runs with
repeats through the sweep machinery (`chains.harness.sweep.run_configs`) into a results store in ``DIR``, so
the trials are in the store format that ``tables``, ``plot`` and `ResultStore.aggregate` read, with 95% CIs.
The study lives in ``DIR/tune.db`` (SQLite): a killed tune resumes where it stopped, and a configuration
already measured is never measured again. An engine that cannot start for lack of memory is recorded
infeasible in the store and pruned in the study; an SLO missed is a violated constraint.

What runs a configuration is an `Objective`: `StoreObjective` runs it with any trial runner,
`EngineObjective` on a managed vLLM engine, `RecordedObjective` replays a committed sweep store (tests and
the benchmark search recorded data, fast, without an engine).

Example:
    >>> parse_slo("p90_latency_s<=20")
    SLO(metric='p90_latency_s', op='<=', threshold=20.0, relative=None)
    >>> parse_slo("p90_latency_s<=20").violation(25.0)
    5.0
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np
import pandas as pd

from chains.harness.knobs import KNOBS, TUNE_OPT_IN, TUNE_VALUES, knob, knob_values
from chains.harness.record import STATUS_INFEASIBLE, STATUS_OK, TrialRecord, from_json
from chains.harness.stats import aggregate, mean_ci, t_quantile
from chains.harness.store import ResultStore, SweepSpec, write_json_atomic, write_text_atomic
from chains.harness.sweep import SweepConfig, TrialRunner, preflight, run_configs
from chains.harness.tables import METRICS, load_workflows, tagged, trial_metrics
from langchain_energy.errors import ConfigError, DataError, InfeasibleConfigError
from langchain_energy.ledger import CALL_KINDS
from langchain_energy.power import PowerCap

STUDY_NAME = "tune"  # one study per directory: the name is fixed so that a rerun finds it
DB_NAME = "tune.db"
OBJECTIVES: dict[str, str] = {"energy": "energy_j", "energy-per-token": "energy_per_token_j"}
DEFAULT_LATENCY = "p90_latency_s"
_PERCENTILE = re.compile(r"^p(\d{1,2}(?:\.\d+)?)_(call_)?latency_s$")
_SLO = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+|default)\s*$")


# -- SLO ------------------------------------------------------------------------------------------------
def known_metric(name: str) -> bool:
    """Whether ``name`` is a metric of a configuration: a mean of `tables.METRICS` or a latency percentile.

    ``pNN_latency_s`` is the NN-th percentile of workflow latency over every repeat; ``pNN_call_latency_s``
    the same over the LLM calls.
    """
    m = _PERCENTILE.match(name)
    return name in METRICS or (m is not None and 0 < float(m.group(1)) < 100)


@dataclass(frozen=True)
class SLO:
    """A service-level objective on one metric of a configuration, e.g. ``p90_latency_s<=20``.

    ``p90_latency_s<=default`` takes the threshold from the default configuration, measured first
    (`relative` is ``"default"`` until `resolved` gives it the number).

    Example:
        >>> SLO("p90_latency_s", "<=", 20.0).met(19.5)
        True
        >>> parse_slo("p90_latency_s<=default").resolved(12.5).threshold
        12.5
    """

    metric: str
    op: str
    threshold: float
    relative: str | None = None

    def violation(self, value: float) -> float:
        """How far ``value`` is on the wrong side of the threshold (<= 0: met); NaN counts as missed."""
        if self.relative is not None:
            raise ConfigError(f"SLO {self} is not resolved: measure the default configuration first")
        if value is None or not math.isfinite(value):
            return math.inf
        gap = value - self.threshold if self.op in ("<=", "<") else self.threshold - value
        strict = self.op in ("<", ">")
        return gap + (1e-12 if strict and gap == 0 else 0.0)

    def met(self, value: float) -> bool:
        """Whether ``value`` meets the SLO."""
        return self.violation(value) <= 0

    def resolved(self, threshold: float) -> SLO:
        """This SLO with its threshold set (a relative one, from the default configuration's value)."""
        return SLO(self.metric, self.op, float(threshold))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.relative if self.relative else format(self.threshold, 'g')}"


def parse_slo(text: str) -> SLO:
    """Parse ``METRIC<=NUMBER`` (also ``<``, ``>=``, ``>``), or ``METRIC<=default``: the default configuration's value.

    Raises:
        ConfigError: the text does not parse, or names an unknown metric.
    """
    m = _SLO.match(text or "")
    if m is None:
        raise ConfigError(f"SLO {text!r} does not parse; write METRIC<=NUMBER, e.g. 'p90_latency_s<=20' "
                          "(or METRIC<=default)")
    metric, op, number = m.groups()
    if not known_metric(metric):
        raise ConfigError(f"SLO names unknown metric {metric!r}; known: {', '.join(METRICS)}, "
                          "pNN_latency_s, pNN_call_latency_s")
    if number == "default":
        return SLO(metric, op, math.nan, relative="default")
    try:
        threshold = float(number)
    except ValueError:
        raise ConfigError(f"SLO {text!r}: {number!r} is not a number") from None
    if not math.isfinite(threshold):
        raise ConfigError(f"SLO {text!r}: the threshold must be finite")
    return SLO(metric, op, threshold)


# -- evaluations ----------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """What measuring one configuration gave.

    Attributes:
        config: knob name -> value of every knob the tuner set.
        status: ``ok`` or ``infeasible``.
        reason: why infeasible.
        metrics: metric -> value: each `tables.METRICS` mean (``energy_j``), its CI half-width
            (``energy_j_ci``), and latency percentiles (``p90_latency_s``, ``p90_call_latency_s``, ...).
        samples: metric -> per-trial values (the repeats), for comparisons with CIs.
        n: finished repeats.
        provenance: where the joules came from.
    """

    config: dict[str, Any]
    status: str = STATUS_OK
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    n: int = 0
    provenance: str = ""

    @property
    def ok(self) -> bool:
        """Whether the configuration ran."""
        return self.status == STATUS_OK and self.n > 0

    def metric(self, name: str) -> float:
        """The value of metric ``name`` (NaN when not measured)."""
        return float(self.metrics.get(name, math.nan))


def evaluate_records(config: Mapping[str, Any], records: Sequence[TrialRecord]) -> Evaluation:
    """An `Evaluation` of one configuration from its trial records: means, CIs and latency percentiles."""
    ok = [r for r in records if r.status == STATUS_OK]
    if not ok:
        reason = next((r.reason for r in records if r.reason), "no finished trial")
        return Evaluation(dict(config), STATUS_INFEASIBLE, reason)
    trials = trial_metrics(ok)
    row = aggregate(trials.assign(knob="", value=""), extra_keys=()).iloc[0]
    metrics = {m: float(row[f"{m}_mean"]) for m in METRICS}
    metrics.update({f"{m}_ci": float(row[f"{m}_ci"]) for m in METRICS})
    workflow = pd.to_numeric(load_workflows(ok).get("latency_s"), errors="coerce").dropna()
    runs = tagged(ok, "runs")
    calls = runs[runs["kind"].isin(CALL_KINDS)] if "kind" in runs else runs  # completions and chat
    call = pd.to_numeric(calls.get("latency_s", pd.Series(dtype=float)), errors="coerce").dropna()
    for p in (50, 90, 95, 99):
        metrics[f"p{p}_latency_s"] = float(np.percentile(workflow, p)) if len(workflow) else math.nan
        metrics[f"p{p}_call_latency_s"] = float(np.percentile(call, p)) if len(call) else math.nan
    samples = {m: [float(v) for v in trials[m]] for m in METRICS}
    samples["workflow_latency_s"], samples["call_latency_s"] = workflow.tolist(), call.tolist()
    return Evaluation(dict(config), STATUS_OK, "", metrics, samples, int(row["n"]), str(row["provenance"]))


def metric_of(ev: Evaluation, name: str) -> float:
    """Metric ``name`` of ``ev``, computing an uncommon percentile (``p75_latency_s``) from the samples."""
    if name in ev.metrics:
        return ev.metric(name)
    m = _PERCENTILE.match(name)
    values = ev.samples.get("call_latency_s" if m and m.group(2) else "workflow_latency_s", []) if m else []
    return float(np.percentile(values, float(m.group(1)))) if m and values else math.nan


# -- objectives -----------------------------------------------------------------------------------------
class Objective(Protocol):
    """What the tuner needs from whatever measures a configuration.

    Attributes:
        workload: the workload (or the user's target) being tuned.
        repeats: trials per configuration.
    """

    workload: str
    repeats: int

    def space(self) -> dict[str, list[Any]]:
        """Knob name -> the values to search (two or more each), in order."""

    def fixed_knobs(self) -> dict[str, Any]:
        """Knobs held at one value for the whole tune (by knob name)."""

    def default(self) -> dict[str, Any]:
        """The default configuration of the searched knobs (what the saving is measured against)."""

    def evaluate(self, config: Mapping[str, Any]) -> Evaluation:
        """Measure ``config`` (every searched knob set); an infeasible one comes back with its reason."""

    def reproduce(self, config: Mapping[str, Any], out: str) -> list[str]:
        """The command line that measures ``config`` again, into ``out``."""


def _fmt(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


class _Held:
    """A trial runner whose ``close`` leaves the engine up: `run_configs` closes its runner after every call,
    and the tuner calls it once per configuration; `StoreObjective.close` stops the engine at the end."""

    def __init__(self, runner: TrialRunner) -> None:
        self.runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def close(self) -> None:
        """Nothing: the engine is stopped by `StoreObjective.close`."""


class StoreObjective:
    """Runs each configuration with repeats through `run_configs` into a `ResultStore`, then reads it back.

    The store's sweep is the search space (the first knob swept, the others crossed), so every trial has
    the usual key and its configuration's row in `ResultStore.aggregate` (95% CIs); a configuration already
    in the store is read back, not run again.

    Args:
        out: the results directory (the store).
        workload: workload name or the user's target.
        space: knob name -> values searched.
        runner: runs the trials (`chains.harness.sweep.TrialRunner`).
        repeats: trials per configuration.
        defaults: run-settings fields of every trial before the fixed ones and the knobs.
        fixed: the sweep's fixed part: ``settings``, ``engine`` and, for a user's target, ``target``.
        fixed_knobs: knobs held at one value, by knob name.
        default: the default configuration (default: each knob's value in ``defaults``).
        power_cap: applies (or records) power caps.
        progress: show the trials' progress bar.
        deadline: a ``time.monotonic()`` instant after which no trial starts, nor a configuration that the
            longest one so far says would not end before it.

    Example:
        >>> StoreObjective  # doctest: +SKIP
    """

    def __init__(self, out: str | os.PathLike[str], workload: str, space: Mapping[str, Sequence[Any]],
                 runner: TrialRunner, repeats: int, defaults: Mapping[str, Any] | None = None,
                 fixed: Mapping[str, Any] | None = None, fixed_knobs: Mapping[str, Any] | None = None,
                 default: Mapping[str, Any] | None = None, power_cap: PowerCap | None = None,
                 progress: bool = False, deadline: float | None = None) -> None:
        self.workload = workload
        self.repeats = repeats
        self.runner = runner
        self.fixed = {"settings": {}, "engine": {}, **dict(fixed or {})}
        self._space = {k: list(v) for k, v in space.items()}
        self._fixed_knobs = dict(fixed_knobs or {})
        self.defaults = dict(defaults or {})
        self._default = dict(default) if default is not None else {
            k: self.defaults.get(knob(k).field) for k in self._space}
        self.power_cap = power_cap or PowerCap(dry_run=True)
        self.progress = progress
        self.deadline = deadline
        self._longest_s = 0.0  # the longest configuration so far (engine start and repeats), for the deadline
        self.store = ResultStore(out)
        names = list(self._space)
        settings = {**self.fixed["settings"], **{knob(k).field: v for k, v in self._fixed_knobs.items()}}
        self.spec = SweepSpec(workloads=[workload], knobs={names[0]: self._space[names[0]]}, repeats=repeats,
                              across={k: self._space[k] for k in names[1:]}, fixed={**self.fixed, "settings": settings})

    def space(self) -> dict[str, list[Any]]:
        """Knob name -> values searched."""
        return {k: list(v) for k, v in self._space.items()}

    def fixed_knobs(self) -> dict[str, Any]:
        """Knobs held at one value."""
        return dict(self._fixed_knobs)

    def default(self) -> dict[str, Any]:
        """The default configuration."""
        return dict(self._default)

    def sweep_config(self, config: Mapping[str, Any]) -> SweepConfig:
        """The sweep's configuration of ``config``: its key names only the searched knobs."""
        assign = {k: config[k] for k in self._space}
        settings = {**self.defaults, **self.spec.fixed["settings"], "workload": self.workload}
        settings.update({knob(k).field: v for k, v in assign.items()})
        first = next(iter(self._space))
        return SweepConfig(self.workload, first, assign[first], assign, settings)

    def prepare(self) -> None:
        """Check power caps and settings before anything is written, then create (or reopen) the store.

        Raises:
            SweepMismatchError: the directory holds another search.
            ConfigError / PowerCapError: a configuration that cannot run.
        """
        caps = [v for v in self._space.get("power-cap", [])]
        configs = [self.sweep_config(self.default())]
        configs += [self.sweep_config({**self.default(), "power-cap": c}) for c in caps]
        preflight(configs, self.runner, self.power_cap)
        self.store.init(self.spec)

    def records(self, config: SweepConfig) -> list[TrialRecord]:
        """The stored trials of ``config``."""
        out = []
        for r in range(self.repeats):
            path = self.store.trials_dir / f"{config.key(r)}.json"
            if path.exists():
                try:
                    out.append(from_json(json.loads(path.read_text())))
                except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DataError(f"trial file {path} is unreadable: {exc}") from exc
        return out

    def evaluate(self, config: Mapping[str, Any]) -> Evaluation:
        """Run the missing repeats of ``config`` and evaluate all of them."""
        sc = self.sweep_config(config)
        if self.deadline is not None and len(self.records(sc)) < self.repeats \
                and time.monotonic() + self._longest_s > self.deadline:
            # Judged by the longest configuration so far: one that cannot end in time is not started.
            raise TimeoutError("the time budget cannot fit another configuration")
        started = time.monotonic()
        with self.store.writer():  # one writer per directory, as for sweeps
            run_configs([sc], self.repeats, self.store, _Held(self.runner), self.power_cap, self.progress,
                        self.deadline, getattr(self, "executor", None))  # tune --ray: a RayExecutor
        self._longest_s = max(self._longest_s, time.monotonic() - started)
        records = self.records(sc)
        if len(records) < self.repeats and not any(r.status == STATUS_INFEASIBLE for r in records):
            raise TimeoutError("the time budget ran out before this configuration finished")
        return evaluate_records(dict(config), records)

    def close(self) -> None:
        """Stop the runner's engine (kept up between configurations, so one with the same engine reuses it)."""
        self.runner.close()

    def reproduce(self, config: Mapping[str, Any], out: str) -> list[str]:
        """``python -m chains.run sweep`` of ``config`` alone: same settings, engine, repeats and store format."""
        knobs = {**{k: v for k, v in config.items() if v is not None}, **self._fixed_knobs}
        knobs = {k: v for k, v in knobs.items() if v is not None}
        set_by_knobs = {KNOBS[k].to for k in knobs if KNOBS[k].target == "engine"}
        first, *rest = list(knobs)
        cmd = ["python", "-m", "chains.run", "sweep", "--workload", self.workload,
               "--knob", f"{first}={_fmt(knobs[first])}"]
        cmd += [a for k in rest for a in ("--set", f"{k}={_fmt(knobs[k])}")]
        by_field = {k.field: k.name for k in KNOBS.values()}
        held = {k: v for k, v in self.fixed["settings"].items() if k != "workload" and v is not None
                and not isinstance(v, (list, dict))}
        # A knob held fixed (--set) goes back as --set: the sweep refuses a knob given as a --setting.
        cmd += [a for k, v in sorted(held.items()) if k in by_field and by_field[k] not in knobs
                for a in ("--set", f"{by_field[k]}={_fmt(v)}")]
        cmd += [a for k, v in sorted(held.items()) if k not in by_field for a in ("--setting", f"{k}={v}")]
        cmd += [a for k, v in sorted(self.fixed["engine"].items()) if k not in set_by_knobs and v is not None
                for a in ("--engine-arg", f"{k}={v}")]
        target = self.fixed.get("target")
        if target:
            cmd += ["--inputs", str(target["inputs"])]
            cmd += ["--column", str(target["column"])] if target.get("column") else []
            cmd += ["--config", str(target["config"])] if target.get("config") else []
        if self.power_cap.mode == "applied" and "power-cap" in knobs:
            cmd += ["--power-cap-mode", "apply"]
        return cmd + ["--repeats", str(self.repeats), "--out", out]


class EngineObjective(StoreObjective):
    """Measures configurations on the managed vLLM engine (`EngineTrialRunner`).

    Example:
        >>> obj = EngineObjective("/tmp/t", "search", {"batch-size": [4, 8]}, repeats=3)  # doctest: +SKIP
    """

    def __init__(self, out: str | os.PathLike[str], workload: str, space: Mapping[str, Sequence[Any]],
                 repeats: int, fixed: Mapping[str, Any] | None = None, parrot_url: str | None = None,
                 **options: Any) -> None:
        from chains.harness.engine_runner import EngineTrialRunner

        fixed = {"settings": {}, "engine": {}, **dict(fixed or {})}
        runner = EngineTrialRunner(fixed["engine"], parrot_url=parrot_url, target=fixed.get("target"),
                                   log_dir=str(out))
        defaults = runner.defaults()
        super().__init__(out, workload, space, runner, repeats, defaults=defaults, fixed=fixed,
                         default=options.pop("default", None) or engine_default(
                             space, {**defaults, **fixed["settings"]}, fixed["engine"]),
                         **options)


def engine_default(space: Mapping[str, Any], settings: Mapping[str, Any],
                   engine_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Each searched knob's default: its run setting, else (an engine knob left unset) the sweep's fixed engine
    argument (``--engine-arg``), else the engine's default."""
    import dataclasses

    from langchain_energy.backends.vllm_server import EngineConfig

    engine = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    engine.update({k: v for k, v in (engine_args or {}).items() if v is not None})
    out = {}
    for name in space:
        k = knob(name)
        value = settings.get(k.field)
        if value is None and k.is_engine_knob and k.to:
            value = engine.get(k.to)
        out[name] = k.coerce(value) if value is not dataclasses.MISSING else None
    return out


def _identity(values: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((k, json.dumps(values.get(k), default=str)) for k in KNOBS)


class RecordedRunner:
    """A trial runner that replays the trials of committed sweep stores instead of running an engine.

    Args:
        groups: full knob identity -> the recorded trials of that configuration.

    Example:
        >>> RecordedRunner({}).close()
    """

    def __init__(self, groups: Mapping[tuple, Sequence[TrialRecord]]) -> None:
        self.groups = groups

    def _group(self, config: SweepConfig) -> Sequence[TrialRecord]:
        group = self.groups.get(_identity(knob_values(config.settings)))
        if not group:
            raise InfeasibleConfigError("not recorded in the oracle store(s)")
        bad = [r for r in group if r.status != STATUS_OK]
        if len(bad) == len(group):
            raise InfeasibleConfigError(bad[0].reason or "recorded infeasible")
        return [r for r in group if r.status == STATUS_OK]

    def prepare(self, config: SweepConfig) -> None:
        """Refuse a configuration that was not recorded, or was recorded infeasible (as an engine would)."""
        self._group(config)

    def run(self, config: SweepConfig, repeat: int) -> Any:
        """The recorded trial ``repeat`` of ``config``."""
        group = self._group(config)
        if repeat >= len(group):
            raise DataError(f"the oracle holds {len(group)} repeat(s) of this configuration, not {repeat + 1}")
        rec = group[repeat]
        return SimpleNamespace(summary=pd.DataFrame(rec.summary), runs=pd.DataFrame(rec.runs),
                               timeline=rec.timeline or None, meta={**rec.meta, "replayed_from": rec.key})

    def close(self) -> None:
        """Nothing to stop."""


class RecordedObjective(StoreObjective):
    """Replays configurations from committed sweep stores: the search is tested fast and without an engine.

    The stores' trials of ``workload`` are grouped by their knob values (an engine knob the sweep held in its
    fixed engine arguments counts as set); knobs with one recorded value are held fixed, the others
    searched over their recorded values. A configuration not recorded is infeasible ("not recorded").

    Args:
        stores: committed results directories (trial formats 1 and 2).
        workload: the workload to tune.
        out: where the tune writes its own store.
        where: knob name -> value: use only the trials with these values (e.g. ``{"output-len": 128}``).
        repeats: trials per configuration (default: the fewest any recorded configuration has).
        **options: as `StoreObjective` (progress, deadline, ...).

    Example:
        >>> obj = RecordedObjective(["docs/results/gpu-h100/search-batch"], "search", "/tmp/t")  # doctest: +SKIP
        >>> obj.space()  # doctest: +SKIP
        {'batch-size': [1, 2, 4, 8, 16]}
    """

    def __init__(self, stores: Sequence[str | os.PathLike[str]], workload: str, out: str | os.PathLike[str],
                 where: Mapping[str, Any] | None = None, repeats: int | None = None,
                 space: Mapping[str, Sequence[Any]] | None = None, **options: Any) -> None:
        where = {k: knob(k).coerce(v) for k, v in (where or {}).items()}
        self.groups: dict[tuple, list[TrialRecord]] = {}
        settings: dict[str, Any] | None = None
        fixed_engine: dict[str, Any] = {}
        held: dict[str, list[Any]] = {}
        self.group_values: dict[tuple, dict[str, Any]] = {}
        from chains.harness.engine_runner import EngineTrialRunner

        swept_defaults = EngineTrialRunner.defaults()  # the run settings' defaults, then each sweep's fixed ones
        for path in stores:
            store = ResultStore(path)
            spec = store.spec()
            engine = dict(spec.fixed.get("engine", {}))
            for k, v in spec.fixed.get("settings", {}).items():
                swept_defaults.setdefault(f"_{k}", v)
            for rec in store.records():
                if rec.workload != workload:
                    continue
                values = dict(rec.knobs)
                for k in KNOBS.values():  # an engine knob held by the sweep's fixed engine arguments
                    if values.get(k.name) is None and k.is_engine_knob and k.to in engine:
                        values[k.name] = k.coerce(engine[k.to])
                if any(values.get(k) != v for k, v in where.items()):
                    continue
                others = {k: v for k, v in rec.settings.items() if k not in ("seed", "workload")}
                if settings is None:
                    settings, fixed_engine = others, {k: v for k, v in engine.items()}
                elif others != settings:
                    diff = sorted(k for k in set(others) | set(settings) if others.get(k) != settings.get(k))
                    raise DataError(f"the oracle stores disagree on settings {diff} for {workload}; "
                                    "tune on stores of one workload size")
                for k, v in values.items():
                    held.setdefault(k, [])
                    if v not in held[k]:
                        held[k].append(v)
                self.groups.setdefault(_identity(values), []).append(rec)
                self.group_values[_identity(values)] = values
        if not self.groups:
            raise DataError(f"the oracle stores hold no trial of {workload!r}" + (f" with {where}" if where else ""))
        recorded = {k: sorted(v, key=lambda x: (str(type(x)), x)) for k, v in held.items() if len(v) > 1}
        searched = dict(space) if space is not None else recorded
        for k, values in searched.items():
            if not values:
                raise ConfigError(f"knob {k!r} has an empty value list")
        fixed_knobs = {k: v[0] for k, v in held.items() if k not in searched}
        ok_counts = [sum(r.status == STATUS_OK for r in g) for g in self.groups.values()]
        fewest = min([c for c in ok_counts if c > 0] or [1])
        repeats = repeats or fewest
        if repeats > fewest:
            raise ConfigError(f"the oracle holds only {fewest} repeat(s) of some configuration; ask for at most that")
        base = {"workload": workload, **(settings or {})}
        # The default: the sweeps' fixed value, else the run settings' (or the engine's) default, where recorded.
        defaults = {f: swept_defaults.get(f"_{f}", v) for f, v in swept_defaults.items() if not f.startswith("_")}
        default = {}
        for k in searched:
            first = engine_default({k: None}, defaults)[k]
            default[k] = first if first in searched[k] else searched[k][len(searched[k]) // 2]
        engine = {k: v for k, v in fixed_engine.items()
                  if not any(kn.to == k and kn.name in searched for kn in KNOBS.values())}
        super().__init__(out, workload, searched, RecordedRunner(self.groups), repeats, defaults=base,
                         fixed={"settings": {}, "engine": engine}, fixed_knobs=fixed_knobs, default=default,
                         **options)
        self.base_settings = base

    def grid(self) -> list[Evaluation]:
        """Every recorded configuration of the search space, evaluated straight from the oracle (no store).

        Each from its first ``repeats`` recorded trials: the ones a tune replays, so the two compare exactly.
        """
        out = []
        for ident, group in self.groups.items():
            values = self.group_values[ident]
            if any(values.get(k) != v for k, v in self._fixed_knobs.items()):
                continue
            config = {k: values.get(k) for k in self._space}
            ok = [r for r in group if r.status == STATUS_OK]
            out.append(evaluate_records(config, ok[:self.repeats] or group))  # the trials a tune replays
        return out


# -- the search -----------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    """What a tune found.

    Attributes:
        table: one row per measured configuration: knob values, status, objective and latency with CIs,
            the SLO's metric, ``slo_met`` and ``pareto``.
        pareto: the rows on the energy-latency Pareto front (feasible configurations only).
        winner: the configuration with the least objective that meets the SLO (None if none does).
        default: the default configuration's evaluation.
        saving: the winner against the default (see `compare`).
        command: the command line that measures the winner again.
        measured: configurations measured (each with its repeats); ``proposals`` the sampler's trials.
        stopped: why the search stopped before its budget ("" when it did not).
    """

    table: pd.DataFrame
    pareto: pd.DataFrame
    winner: Evaluation | None
    default: Evaluation
    saving: dict[str, Any]
    command: list[str]
    measured: int
    proposals: int
    objective: str
    latency: str
    slo: SLO | None
    stopped: str = ""


def compare(default: Sequence[float], winner: Sequence[float]) -> dict[str, float | bool]:
    """How much less the winner's per-trial values are than the default's, with 95% CIs.

    ``ratio`` is default over winner (the delta method for its CI, Welch's degrees of freedom);
    ``saving`` is ``1 - 1/ratio`` (a fraction), its CI from the ratio's; ``separated`` says whether the two
    configurations' own CIs do not overlap.

    Example:
        >>> round(compare([10.0, 10.2, 9.8], [5.0, 5.1, 4.9])["ratio"], 2)
        2.0
    """
    md, hd, nd = mean_ci(default)
    mw, hw, nw = mean_ci(winner)
    out: dict[str, float | bool] = {"default_mean": md, "default_ci": hd, "winner_mean": mw, "winner_ci": hw}
    ratio = md / mw if mw else math.nan
    half = math.nan
    if nd > 1 and nw > 1 and mw and md:
        sd, sw = hd / t_quantile(nd - 1), hw / t_quantile(nw - 1)  # standard errors of the means
        rel = math.hypot(sd / md, sw / mw)
        dof = (sd**2 + sw**2) ** 2 / (sd**4 / (nd - 1) + sw**4 / (nw - 1)) if sd or sw else nd + nw - 2
        half = t_quantile(max(1, int(dof))) * ratio * rel
    lo, hi = ratio - half, ratio + half
    out.update(ratio=ratio, ratio_lo=lo, ratio_hi=hi, saving=1 - 1 / ratio if ratio else math.nan,
               saving_lo=1 - 1 / lo if lo and lo > 0 else math.nan, saving_hi=1 - 1 / hi if hi else math.nan,
               separated=bool(mw + hw < md - hd) if nd > 1 and nw > 1 else False)
    return out


def pareto_mask(x: Sequence[float], y: Sequence[float]) -> list[bool]:
    """Which points no other point beats on both ``x`` and ``y`` (both minimised; NaN is never on it).

    Example:
        >>> pareto_mask([1, 2, 3], [3, 1, 2])
        [True, True, False]
    """
    pts = list(zip(x, y))
    out = []
    for i, (a, b) in enumerate(pts):
        if not (math.isfinite(a) and math.isfinite(b)):
            out.append(False)
            continue
        out.append(not any(j != i and c <= a and d <= b and (c < a or d < b) for j, (c, d) in enumerate(pts)
                           if math.isfinite(c) and math.isfinite(d)))
    return out


def _distributions(space: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Ordered (numeric) knobs as an index into their values, so TPE models their order; others categorical."""
    import optuna

    out = {}
    for name, values in space.items():
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[name] = optuna.distributions.IntDistribution(0, len(values) - 1)
        else:
            out[name] = optuna.distributions.CategoricalDistribution(list(values))
    return out


def _params(config: Mapping[str, Any], space: Mapping[str, Sequence[Any]], dists: Mapping[str, Any]) -> dict | None:
    """Optuna parameters of ``config`` (None if a value lies outside the space)."""
    import optuna

    out = {}
    for name, values in space.items():
        if config.get(name) not in values:
            return None
        int_index = isinstance(dists[name], optuna.distributions.IntDistribution)
        out[name] = values.index(config[name]) if int_index else config[name]
    return out


def _config_of(params: Mapping[str, Any], space: Mapping[str, Sequence[Any]], dists: Mapping[str, Any]) -> dict:
    import optuna

    return {name: values[int(params[name])] if isinstance(dists[name], optuna.distributions.IntDistribution)
            else params[name] for name, values in space.items()}


def _constraint(trial: Any) -> list[float]:
    return list(trial.user_attrs.get("constraint", [0.0]))


def _set_constraint(trial: Any, values: list[float]) -> None:
    """Record the SLO's violation on ``trial`` (<= 0: met): Optuna 5's API, else read by `_constraint`."""
    trial.set_user_attr("constraint", values)
    if hasattr(trial, "set_constraint"):
        trial.set_constraint("slo", values[0])


def _open_study(out: Path, seed: int, budget: int, identity: Mapping[str, Any]) -> Any:
    """The study in ``out/tune.db`` (created, or reopened for the same objective, SLO and space)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Few random trials before TPE models the results: a tune is short, each trial costs engine minutes.
    old_api = not hasattr(optuna.trial.Trial, "set_constraint")  # Optuna 4 reads constraints via a function
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=max(2, min(10, budget // 3)),
                                         **({"constraints_func": _constraint} if old_api else {}))
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / DB_NAME}", sampler=sampler,
                                directions=["minimize", "minimize"], load_if_exists=True)
    have = study.user_attrs.get("identity")
    if have is None:
        study.set_user_attr("identity", dict(identity))
    elif have != json.loads(json.dumps(identity, default=str)):
        diff = sorted(k for k in set(have) | set(identity) if have.get(k) != json.loads(json.dumps(identity.get(k), default=str)))
        raise ConfigError(f"{out} holds another tune (differs in: {', '.join(diff)}); rerun the same command "
                          "to resume it, or choose another --out directory")
    return study


def tune(objective: Objective, out: str | os.PathLike[str], target: str = "energy", slo: SLO | None = None,
         trials: int = 30, seed: int = 0, latency: str | None = None, warm_start: bool = True) -> TuneResult:
    """Search ``objective``'s space for the least ``target`` that meets ``slo``; resumable in ``out``.

    The default configuration is measured first: the saving is against it, and an SLO such as
    ``p90_latency_s<=default`` takes its threshold from it. When the whole space fits in the budget, every
    configuration is measured (a grid). Otherwise the search is coordinate descent with TPE: from the
    incumbent (the least objective that meets the SLO so far, else the configuration nearest to meeting it)
    one knob moves one step at a time, each knob in turn (see `next_move`); a move that beats the incumbent
    becomes the incumbent. When every one-step move of the incumbent has been measured (a local optimum),
    Optuna's TPE sampler, fitted on every configuration measured so far, proposes the next one; if that one
    wins, the moves start again from it. A few trials cannot teach TPE much, while one-knob moves from a
    sensible default find the knobs that matter within a handful of configurations. The moves are enqueued
    Optuna trials, so the study holds every configuration however it was chosen.

    Args:
        objective: what measures a configuration (`EngineObjective`, `RecordedObjective`, ...).
        out: the directory of the study (``tune.db``) and of the objective's store.
        target: ``energy`` or ``energy-per-token``.
        slo: the SLO every recommended configuration meets (None: none).
        trials: configurations to measure in all, the default one included (measured first even where it lies
            outside the space: an engine knob the engine sets itself); a proposal of one already measured is
            answered from the study, not measured again.
        seed: the sampler's seed.
        latency: the second objective (default: the SLO's metric if it is a latency, else p90 latency).
        warm_start: False for plain TPE after the default (the search before coordinate descent; the
            benchmark compares the two).

    Raises:
        ConfigError: a bad target or trial count, an empty or missing search space, another tune in ``out``,
            an SLO relative to a default configuration that did not run.
        TimeoutError: the objective's time budget ran out before the default configuration was measured.
    """
    if target not in OBJECTIVES:
        raise ConfigError(f"unknown objective {target!r}; choose one of: {', '.join(OBJECTIVES)}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials must be a positive integer, got {trials!r}")
    space = objective.space()
    if not space:
        raise ConfigError("nothing to tune: every knob has a single value")
    for name, values in space.items():
        if not values:
            raise ConfigError(f"knob {name!r} has an empty value list")
    metric = OBJECTIVES[target]
    latency = latency or (slo.metric if slo is not None and "latency" in slo.metric else DEFAULT_LATENCY)
    out = Path(out)
    identity = {"workload": objective.workload, "objective": target, "slo": str(slo) if slo else None,
                "latency": latency, "space": {k: list(v) for k, v in space.items()}, "repeats": objective.repeats,
                "fixed": objective.fixed_knobs(), "seed": seed, "search": "descent+tpe" if warm_start else "tpe"}
    study = _open_study(out, seed, trials, identity)
    if hasattr(objective, "prepare"):
        objective.prepare()  # type: ignore[attr-defined]
    try:
        search = _Search(objective, study, space, metric, latency, slo, trials, warm_start)
        search.run()
    finally:
        if hasattr(objective, "close"):
            objective.close()  # type: ignore[attr-defined]
    return search.result(out)


class _Search:
    """One call of `tune`: the study's trials, the default's evaluation, and the loop that proposes and measures."""

    def __init__(self, objective: Objective, study: Any, space: dict[str, list[Any]], metric: str, latency: str,
                 slo: SLO | None, trials: int, warm_start: bool) -> None:
        self.objective, self.study, self.space = objective, study, space
        self.metric, self.latency, self.slo, self.warm_start = metric, latency, slo, warm_start
        self.dists = _distributions(space)
        self.size = math.prod(len(v) for v in space.values())
        self.trials = trials
        self.done: dict[str, Any] = {}  # config key -> the study's trial that measured it
        self.evals: dict[str, Evaluation] = {}
        self.default = objective.default()
        self.default_ev: Evaluation | None = None  # measured outside the space (else it is in self.evals)
        self.proposals = 0
        self.stopped = ""

    def key(self, config: Mapping[str, Any]) -> str:
        return json.dumps({k: config.get(k) for k in self.space}, sort_keys=True, default=str)

    def run(self) -> None:
        from optuna.trial import TrialState

        study = self.study
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.RUNNING:
                # A tune killed mid-configuration: the store keeps its finished repeats; measure the rest first.
                study.tell(t.number, state=TrialState.FAIL)
                study.enqueue_trial(dict(t.params))
            elif t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.user_attrs.get("measured"):
                self.done[t.user_attrs["config_key"]] = t
        budget = min(self.trials, self.size)
        default_params = _params(self.default, self.space, self.dists)
        if default_params is None:
            # Outside the space (a knob the engine sets itself): measured first all the same, and counted.
            self.default_ev = self.objective.evaluate(self.default)
            budget = min(self.trials - 1, self.size)
        elif self.key(self.default) not in self.done and not study.user_attrs.get("default_enqueued"):
            study.enqueue_trial(default_params)  # measured first: the saving is against it
            study.set_user_attr("default_enqueued", True)
        self._resolve_slo()
        self.proposals = len(study.trials)
        cap = self.proposals + 20 * self.trials + self.size  # a sampler stuck on measured configurations stops here
        while len(self.done) < budget and self.proposals < cap:
            if self.warm_start and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                move = next_move(self.space, self._measured(), self.default, grid=self.size <= budget)
                if move is not None:
                    study.enqueue_trial(_params(move, self.space, self.dists))
            trial = study.ask(dict(self.dists))
            self.proposals += 1
            config = _config_of(trial.params, self.space, self.dists)
            k = self.key(config)
            seen = self.done.get(k)
            if seen is not None:  # answered from the study: measuring it again would repeat finished trials
                trial.set_user_attr("duplicate_of", seen.number)
                _set_constraint(trial, seen.user_attrs.get("constraint", [0.0]))
                if seen.state == TrialState.PRUNED:
                    study.tell(trial, state=TrialState.PRUNED)
                else:
                    study.tell(trial, list(seen.values))
                continue
            try:
                ev = self.objective.evaluate(config)
            except TimeoutError:
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(dict(trial.params))  # the rerun measures it first
                if self._default_ev() is None:
                    raise  # nothing to compare against: no result yet
                self.stopped = "the time budget ran out; rerun the same command to resume"
                break
            self.evals[k] = ev
            self._resolve_slo()
            values, violation = self._outcome(ev)
            for name, value in (("config_key", k), ("config", json.loads(k)), ("status", ev.status),
                                ("reason", ev.reason), ("measured", True)):
                trial.set_user_attr(name, value)
            _set_constraint(trial, [violation])
            if values is None or not all(math.isfinite(v) for v in values):
                study.tell(trial, state=TrialState.PRUNED)  # out of memory (or nothing measured): no values to model
            else:
                study.tell(trial, values)
            self.done[k] = study.get_trials(deepcopy=False)[trial.number]

    def _default_ev(self) -> Evaluation | None:
        """The default configuration's evaluation, if it was measured (read back from the store on a resume)."""
        if self.default_ev is not None:
            return self.default_ev
        k = self.key(self.default)
        if k not in self.evals and k in self.done:
            self.evals[k] = self.objective.evaluate(self.done[k].user_attrs["config"])
        return self.evals.get(k)

    def _resolve_slo(self) -> None:
        """Give an SLO relative to the default configuration its threshold, once the default is measured."""
        if self.slo is None or self.slo.relative is None:
            return
        ev = self._default_ev()
        if ev is None:
            return
        if not ev.ok:
            raise ConfigError(f"the SLO {self.slo} needs the default configuration, which did not run "
                              f"({ev.reason}); give the SLO a number")
        self.slo = self.slo.resolved(metric_of(ev, self.slo.metric))

    def _outcome(self, ev: Evaluation) -> tuple[list[float] | None, float]:
        if not ev.ok:
            return None, 1.0
        values = [ev.metric(self.metric), metric_of(ev, self.latency)]
        violation = self.slo.violation(metric_of(ev, self.slo.metric)) if self.slo else 0.0
        return values, min(violation, 1e12)

    def _measured(self) -> list[tuple[dict[str, Any], float, float]]:
        """(configuration, objective, SLO violation) of every measured configuration; infeasible ones: inf, inf."""
        from optuna.trial import TrialState

        out = []
        for t in self.done.values():
            ok = t.state == TrialState.COMPLETE
            out.append((t.user_attrs["config"], float(t.values[0]) if ok else math.inf,
                        float(_constraint(t)[0]) if ok else math.inf))
        return out

    def result(self, out: Path) -> TuneResult:
        # Configurations measured before a resume are read back from the store: nothing runs again.
        evaluations = [self.evals.get(k) or self.objective.evaluate(t.user_attrs["config"])
                       for k, t in self.done.items()]
        default = self._default_ev()
        if default is None:
            default = next((e for e in evaluations if self.key(e.config) == self.key(self.default)), None) \
                or self.objective.evaluate(self.default)
        if self.default_ev is not None:
            evaluations.append(self.default_ev)
        self._resolve_slo()
        numbers = {k: t.number for k, t in self.done.items()}
        res = _result(self.objective, out, evaluations, default, self.metric, self.latency, self.slo,
                      len(evaluations), self.proposals, numbers, self.key)
        res.stopped = self.stopped
        return res


def next_move(space: Mapping[str, Sequence[Any]], measured: Sequence[tuple[Mapping[str, Any], float, float]],
              default: Mapping[str, Any], grid: bool = False) -> dict[str, Any] | None:
    """The next configuration of the coordinate descent (or of the grid), or None when none is left to try.

    The incumbent is the measured configuration with the least objective among those that meet the SLO
    (violation <= 0), else the one with the least violation; an infeasible one (objective inf) only if nothing
    else ran. Its one-step moves, each knob in turn: an ordered (numeric) knob to its next value up, then down;
    a switch or category to each other value, in order; so every knob moves once before any moves twice. The
    first move not yet measured is returned; None when all are (the incumbent is a local optimum). Before
    anything is measured: the default (or, where a value lies outside the space, the nearest configuration in
    it: the middle value of that knob).

    Args:
        space: knob -> values.
        measured: (configuration, objective, SLO violation) of each measured configuration.
        default: the default configuration.
        grid: every configuration in order instead (the whole space fits in the budget).

    Example:
        >>> next_move({"b": [1, 2, 4], "e": [True, False]}, [({"b": 2, "e": True}, 10.0, 0.0)], {"b": 2, "e": True})
        {'b': 4, 'e': True}
    """
    from itertools import product

    def key(config: Mapping[str, Any]) -> str:
        return json.dumps({k: config.get(k) for k in space}, sort_keys=True, default=str)

    tried = {key(c) for c, _, _ in measured}
    names = list(space)
    if grid:
        return next((dict(zip(names, combo)) for combo in product(*space.values())
                     if key(dict(zip(names, combo))) not in tried), None)
    inside = [(c, v, x) for c, v, x in measured if all(c.get(k) in space[k] for k in names)]
    if not inside:
        start = {k: default.get(k) if default.get(k) in space[k] else space[k][len(space[k]) // 2] for k in names}
        return start if key(start) not in tried else None
    incumbent = min(inside, key=lambda m: (0, m[1]) if m[2] <= 0 else (1 if math.isfinite(m[1]) else 2, m[2]))[0]
    moves: list[list[dict[str, Any]]] = []
    for name in names:
        values, here = list(space[name]), space[name].index(incumbent[name])
        ordered = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        steps = [i for i in (here + 1, here - 1) if 0 <= i < len(values)] if ordered else \
            [i for i in range(len(values)) if i != here]
        moves.append([{**incumbent, name: values[i]} for i in steps])
    for i in range(max(len(m) for m in moves)):
        for knob_moves in moves:
            if i < len(knob_moves) and key(knob_moves[i]) not in tried:
                return dict(knob_moves[i])
    return None


def _result(objective: Objective, out: Path, evaluations: list[Evaluation], default: Evaluation, metric: str,
            latency: str, slo: SLO | None, measured: int, proposals: int, numbers: Mapping[str, int],
            key: Any) -> TuneResult:
    rows = []
    for ev in evaluations:
        row: dict[str, Any] = {"trial": numbers.get(key(ev.config)), **ev.config, "status": ev.status,
                               "reason": ev.reason, "n": ev.n}
        for m in dict.fromkeys((metric, "energy_j", "latency_s")):
            row[f"{m}_mean"], row[f"{m}_ci"] = ev.metric(m), ev.metric(f"{m}_ci")
        row[latency] = metric_of(ev, latency)
        if slo is not None:
            row[slo.metric] = metric_of(ev, slo.metric)
            row["slo_met"] = bool(ev.ok and slo.met(metric_of(ev, slo.metric)))
        else:
            row["slo_met"] = ev.ok
        row["default"] = key(ev.config) == key(default.config)
        row["provenance"] = ev.provenance
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values(f"{metric}_mean", na_position="last").reset_index(drop=True)
        ok = table["status"] == STATUS_OK
        table["pareto"] = pareto_mask(table[f"{metric}_mean"].where(ok), table[latency].where(ok))
    pareto = table[table["pareto"]].sort_values(latency) if not table.empty else table
    feasible = [e for e in evaluations if e.ok and (slo is None or slo.met(metric_of(e, slo.metric)))]
    winner = min(feasible, key=lambda e: e.metric(metric)) if feasible else None
    saving = compare(default.samples.get(metric, []), winner.samples.get(metric, [])) if winner and default.ok else {}
    command = objective.reproduce(winner.config, str(out / "winner")) if winner else []
    return TuneResult(table, pareto, winner, default, saving, command, measured, proposals,
                      metric, latency, slo)


# -- output ---------------------------------------------------------------------------------------------
def _num(v: float, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def report(result: TuneResult) -> str:
    """The tune's outcome as text: the Pareto front, the recommendation, its saving and the command."""
    m, lat = result.objective, result.latency
    unit = METRICS.get(m, "")
    lines = [f"{result.measured} configuration(s) measured ({result.proposals} proposal(s)); "
             f"objective {m} ({unit}), latency {lat} (s)" + (f", SLO {result.slo}" if result.slo else "")]
    if result.stopped:
        lines.append(f"stopped early: {result.stopped}")
    cols = [c for c in result.table.columns if c in KNOBS] if not result.table.empty else []
    if not result.pareto.empty:
        shown = result.pareto[[*cols, f"{m}_mean", f"{m}_ci", lat, "slo_met"]]
        lines += ["", "Pareto front (energy vs latency):", shown.to_string(index=False)]
    if result.winner is None:
        lines += ["", "no configuration met the SLO" if result.slo else "no configuration ran"]
        return "\n".join(lines)
    w, s = result.winner, result.saving
    lines += ["", "recommended: " + ", ".join(f"{k}={_fmt(v)}" for k, v in w.config.items())
              + f" ({m} {_num(w.metric(m))} ± {_num(w.metric(m + '_ci'), 2)} {unit}, {lat} {_num(metric_of(w, lat))} s)"]
    if s:
        lines.append(f"against the default ({', '.join(f'{k}={_fmt(v)}' for k, v in result.default.config.items())}): "
                     f"{_num(s['ratio'], 3)}x less [95% CI {_num(s['ratio_lo'], 3)}-{_num(s['ratio_hi'], 3)}], "
                     f"saving {_num(100 * s['saving'], 3)}% [{_num(100 * s['saving_lo'], 3)}-"
                     f"{_num(100 * s['saving_hi'], 3)}%], CIs {'separate' if s['separated'] else 'overlap'}")
    lines += ["reproduce: " + shlex.join(result.command)]
    return "\n".join(lines)


def figure(result: TuneResult) -> Any:
    """Energy (objective) against latency for every measured configuration, the front, the SLO and the winner."""
    from chains.harness import plots

    plt = plots.plt
    m, lat = result.objective, result.latency
    t = result.table
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ok = t[t["status"] == STATUS_OK] if not t.empty else t
    if not ok.empty:
        miss = ok[~ok["slo_met"]]
        met = ok[ok["slo_met"]]
        for part, style, label in ((met, "o", "meets the SLO"), (miss, "x", "misses the SLO")):
            if not part.empty:
                ax.errorbar(part[lat], part[f"{m}_mean"], yerr=part[f"{m}_ci"].fillna(0), fmt=style, ms=5,
                            capsize=2, color="tab:blue" if style == "o" else "tab:gray", label=label)
        front = result.pareto
        ax.plot(front[lat], front[f"{m}_mean"], "-", color="tab:orange", label="Pareto front")
        d = result.default
        if d.ok:
            ax.plot([metric_of(d, lat)], [d.metric(m)], "s", mfc="none", ms=11, color="black", label="default")
        if result.winner is not None:
            ax.plot([metric_of(result.winner, lat)], [result.winner.metric(m)], "*", ms=15, color="tab:green",
                    label="recommended")
    if result.slo is not None and result.slo.metric == lat:
        ax.axvline(result.slo.threshold, ls="--", color="tab:red", label=f"SLO {result.slo}")
    ax.set_xlabel(f"{lat} (s)")
    what = "Energy per token" if m == "energy_per_token_j" else "Energy per trial"
    ax.set_ylabel(plots._energy_label(ok, what, METRICS[m]))  # noqa: SLF001 - the harness's own label rule
    infeasible = int((t["status"] != STATUS_OK).sum()) if not t.empty else 0
    ax.set_title(f"Tune: {result.measured} configurations, mean ± 95% CI"
                 + (f", {infeasible} infeasible" if infeasible else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    plots._layout_with_provenance(fig, ok)  # noqa: SLF001
    return fig


def write_outputs(result: TuneResult, out: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``configs.csv``, ``pareto.csv``, ``pareto.png`` and ``recommendation.json`` atomically."""
    from chains.harness import plots

    out = Path(out)
    paths = {name: out / name for name in ("configs.csv", "pareto.csv", "pareto.png", "recommendation.json")}
    write_text_atomic(paths["configs.csv"], result.table.to_csv(index=False))
    write_text_atomic(paths["pareto.csv"], result.pareto.to_csv(index=False))
    fig = figure(result)
    fd, tmp = tempfile.mkstemp(prefix=".pareto.", suffix=".png", dir=out)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, paths["pareto.png"])
    finally:
        plots.plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    w = result.winner
    write_json_atomic(paths["recommendation.json"], {
        "objective": result.objective, "latency": result.latency, "slo": str(result.slo) if result.slo else None,
        "measured": result.measured, "stopped": result.stopped or None, "winner": w.config if w else None,
        "winner_metrics": {k: v for k, v in (w.metrics.items() if w else ()) if math.isfinite(v)},
        "default": result.default.config, "saving": {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                                     for k, v in result.saving.items()},
        "command": shlex.join(result.command) if result.command else None,
    }, indent=2)
    return {k: str(v) for k, v in paths.items()}


def search_space(overrides: Iterable[tuple[str, list[Any]]] = (), allow: Iterable[str] = (),
                 fixed: Iterable[str] = (), power_cap: bool = False, parrot: bool = False) -> dict[str, list[Any]]:
    """The knobs to search and their values: `TUNE_VALUES`, less what cannot or may not be searched.

    Args:
        overrides: ``(knob, values)`` pairs (from ``--knob``) that replace a knob's values or add a knob.
        allow: opt-in knobs the user allows (``users``, ``output-len``).
        fixed: knobs held at one value (``--set``): never searched.
        power_cap: whether caps can be applied (``--power-cap-mode apply``).
        parrot: whether a Parrot backend can run (``--parrot-url`` or ``$PARROT_SRC``).

    Raises:
        ConfigError: an empty value list, a knob given twice, an unknown knob in ``allow``.
    """
    for name in allow:
        if knob(name).name not in TUNE_OPT_IN:
            raise ConfigError(f"--allow {name!r}: only {', '.join(sorted(TUNE_OPT_IN))} need allowing")
    space = {k: list(v) for k, v in TUNE_VALUES.items()
             if (k not in TUNE_OPT_IN or k in allow) and (k != "power-cap" or power_cap)
             and (k != "backend" or parrot)}
    given: set[str] = set()
    for name, values in overrides:
        if name in given:
            raise ConfigError(f"knob {name!r} given twice")
        if not values:
            raise ConfigError(f"knob {name!r} has an empty value list")
        given.add(name)
        space[name] = list(values)
    return {k: v for k, v in space.items() if k not in set(fixed) and len(v) > 0 and (len(v) > 1 or k in given)}
