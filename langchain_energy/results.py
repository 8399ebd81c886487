"""The results store of a sweep: one JSON file per finished trial, a sweep identity, tidy loading and 95% CIs.

Layout of a results directory::

    DIR/sweep.json             what the sweep is (workloads, knobs and values, repeats, fixed settings)
    DIR/trials/<key>.json      one finished trial: its configuration, status, workflow rows, call rows, timeline

A trial file is written to a temporary name and renamed into place (``os.replace``), so a killed sweep
leaves either the whole trial or nothing; rerunning the same sweep skips the keys already present.

Example:
    >>> import tempfile
    >>> store = ResultStore(tempfile.mkdtemp())
    >>> store.init(SweepSpec(workloads=["search"], knobs={"batch-size": [1, 2]}, repeats=2))
    >>> store.done_keys()
    set()
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from langchain_energy.errors import ConfigError, DataError

SCHEMA_VERSION = 1

#: Per-trial metrics that aggregation reports as mean and 95% CI, with their units.
METRICS: dict[str, str] = {
    "latency_s": "s",
    "throughput_tok_s": "tokens/s",
    "energy_j": "J",
    "energy_cpu_j": "J",
    "energy_gpu_j": "J",
    "energy_dram_j": "J",
    "energy_per_token_j": "J/token",
    "cache_hit_rate": "fraction",
    "engine_cache_hit_rate": "fraction",
}

STATUS_OK = "ok"
STATUS_INFEASIBLE = "infeasible"


class SweepMismatchError(ConfigError):
    """A results directory already holds a different sweep; use another directory or the same command."""


@dataclass
class SweepSpec:
    """The identity of a sweep. A results directory holds exactly one.

    Attributes:
        workloads: workload names, in run order.
        knobs: knob name -> values swept one knob at a time (others at their defaults).
        repeats: trials per configuration.
        across: knob name -> values crossed with every swept configuration (e.g. ``backend``).
        fixed: settings held constant for the whole sweep (model, preset, engine arguments, ...).

    Example:
        >>> SweepSpec(workloads=["search"], knobs={"batch-size": [1, 2]}, repeats=3).repeats
        3
    """

    workloads: list[str]
    knobs: dict[str, list[Any]]
    repeats: int
    across: dict[str, list[Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.workloads:
            raise ConfigError("a sweep needs at least one workload")
        if not self.knobs:
            raise ConfigError("a sweep needs at least one knob (e.g. --knob batch-size=1,2,4)")
        for name, values in {**self.knobs, **self.across}.items():
            if not values:
                raise ConfigError(f"knob {name!r} has an empty value list")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ConfigError(f"repeats must be a positive integer, got {self.repeats!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, normalised by a JSON round trip so two equal sweeps compare equal."""
        return json.loads(json.dumps({"schema": SCHEMA_VERSION, **asdict(self)}, sort_keys=True, default=str))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepSpec:
        """Rebuild a spec from :meth:`to_dict` output."""
        body = {k: v for k, v in data.items() if k != "schema"}
        return cls(**body)


@dataclass
class TrialRecord:
    """One finished trial (or one infeasible configuration's repeat) as the store keeps it.

    Attributes:
        key: unique name of (workload, configuration, repeat); also the file name.
        workload: workload name.
        knob: the swept knob, ``value`` its value; ``assign`` every knob set for this trial.
        repeat: repeat index from 0.
        status: ``"ok"`` or ``"infeasible"``.
        reason: why a configuration is infeasible (empty when ok).
        settings: the effective run settings (plain JSON values).
        summary: workflow rows (the energy handler's summary columns).
        runs: per-call rows.
        timeline: utilization/power samples (columns t, cpu_util, gpu_util, power_w) if recorded.
        meta: anything else the trial reported (wall time, engine flags, power cap applied, ...).
    """

    key: str
    workload: str
    knob: str
    value: Any
    repeat: int
    status: str = STATUS_OK
    reason: str = ""
    assign: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    finished_at: float = field(default_factory=time.time)


def _extends(wanted: Mapping[str, Any], have: Mapping[str, Any]) -> bool:
    """Whether sweep ``wanted`` contains every configuration and repeat of sweep ``have`` (both ``to_dict``)."""
    same = ("schema", "workloads", "fixed")
    if any(wanted.get(k) != have.get(k) for k in same) or wanted["repeats"] < have["repeats"]:
        return False
    if set(wanted["across"]) != set(have["across"]):  # an across knob is part of every trial's key
        return False
    grown = {**wanted["knobs"], **wanted["across"]}
    old = {**have["knobs"], **have["across"]}
    return all(name in grown and all(v in grown[name] for v in values) for name, values in old.items())


def trial_key(workload: str, assign: Mapping[str, Any], repeat: int) -> str:
    """A readable, file-safe key for one trial, e.g. ``search__batch-size=4__r003``."""
    parts = [workload] + [f"{k}={_fmt(v)}" for k, v in sorted(assign.items())] + [f"r{repeat:03d}"]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "__".join(parts))


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _jsonable(obj: Any) -> Any:
    """Turn numpy scalars, NaN, timestamps and tuples into plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, TypeError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def frame_records(df: pd.DataFrame | None) -> list[dict[str, Any]]:
    """A DataFrame as JSON-ready records (empty list for None)."""
    if df is None or len(df) == 0:
        return []
    return _jsonable(df.to_dict(orient="records"))


def write_json_atomic(path: Path, data: Any, **dump_options: Any) -> None:
    """Write ``data`` as JSON so that readers see the old file or the new one, never a part of it.

    ``dump_options`` go to `json.dump` (keys are sorted unless ``sort_keys=False``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, **{"sort_keys": True, **dump_options})
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ResultStore:
    """An append-only store of trials in a directory.

    Args:
        path: the results directory (created on :meth:`init`).

    Example:
        >>> import tempfile
        >>> store = ResultStore(tempfile.mkdtemp())
        >>> store.init(SweepSpec(workloads=["search"], knobs={"output-len": [8]}, repeats=1))
        >>> _ = store.append(TrialRecord(key="k", workload="search", knob="output-len", value=8, repeat=0))
        >>> sorted(store.done_keys())
        ['k']
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.trials_dir = self.path / "trials"
        self.spec_path = self.path / "sweep.json"

    # -- identity -------------------------------------------------------------------------------------
    def init(self, spec: SweepSpec) -> None:
        """Create the store for ``spec``, or check that the directory already holds this same sweep.

        A spec that only extends the stored one (more values of a knob, another knob, more repeats; the same
        workloads, ``across`` knobs and fixed settings) replaces it: the finished trials are the same
        configurations and count toward it, so a finished sweep can grow without rerunning anything.

        Raises:
            SweepMismatchError: the directory holds a different sweep (nothing is changed).
            ConfigError: the path exists and is not a directory.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"results path {self.path} exists and is not a directory")
        wanted = spec.to_dict()
        if self.spec_path.exists():
            have = self._read_spec_dict()
            if have == wanted:
                return
            if not _extends(wanted, have):
                diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
                raise SweepMismatchError(
                    f"{self.path} holds a different sweep (differs in: {', '.join(diff)}); "
                    "rerun the same command to resume it, or choose another --out directory"
                )
            write_json_atomic(self.spec_path, wanted)
            return
        if self.trials_dir.exists() and any(self.trials_dir.glob("*.json")):
            raise SweepMismatchError(f"{self.path} holds trials but no sweep.json; choose another --out directory")
        write_json_atomic(self.spec_path, wanted)

    def _read_spec_dict(self) -> dict[str, Any]:
        try:
            return json.loads(self.spec_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {self.spec_path}: {exc}") from exc

    def spec(self) -> SweepSpec:
        """The sweep this store holds.

        Raises:
            DataError: no readable sweep.json in the directory.
        """
        if not self.spec_path.exists():
            raise DataError(f"{self.path} is not a results directory (no sweep.json); run a sweep with --out first")
        return SweepSpec.from_dict(self._read_spec_dict())

    # -- writing ---------------------------------------------------------------------------------------
    def append(self, record: TrialRecord) -> Path:
        """Write one trial atomically. A key already present is an error (trials are never overwritten)."""
        target = self.trials_dir / f"{record.key}.json"
        if target.exists():
            raise DataError(f"trial {record.key} is already in {self.path}; the store is append-only")
        write_json_atomic(target, _jsonable(asdict(record)))
        return target

    def done_keys(self) -> set[str]:
        """Keys of the trials already stored (finished or recorded infeasible)."""
        if not self.trials_dir.exists():
            return set()
        return {p.stem for p in self.trials_dir.glob("*.json") if not p.name.startswith(".")}

    # -- reading ---------------------------------------------------------------------------------------
    def records(self) -> list[TrialRecord]:
        """Every stored trial, in key order. Leftover temporary files of a killed write are ignored."""
        out = []
        for p in sorted(self.trials_dir.glob("*.json")) if self.trials_dir.exists() else []:
            if p.name.startswith("."):
                continue
            try:
                out.append(TrialRecord(**json.loads(p.read_text())))
            except (OSError, json.JSONDecodeError, TypeError) as exc:
                raise DataError(f"trial file {p} is unreadable: {exc}") from exc
        return out

    def load(self) -> pd.DataFrame:
        """Workflow rows of every trial as a tidy DataFrame; an infeasible trial is one row with its reason."""
        return load_workflows(self.records())

    def load_trials(self) -> pd.DataFrame:
        """One row per trial with the per-trial metrics that :func:`aggregate` averages."""
        return trial_metrics(self.records())

    def load_runs(self) -> pd.DataFrame:
        """Per-call rows of every trial, tagged with the trial's configuration."""
        return _tagged(self.records(), "runs")

    def load_timeline(self) -> pd.DataFrame:
        """Utilization/power samples of every trial that recorded them, tagged with the configuration."""
        return _tagged(self.records(), "timeline")

    def aggregate(self) -> pd.DataFrame:
        """Mean and 95% CI per configuration (see :func:`aggregate`)."""
        return aggregate(self.load_trials(), extra_keys=list(self.spec().across))


_TAG_COLUMNS = ("key", "workload", "knob", "value", "repeat", "status", "reason")


def _tags(rec: TrialRecord) -> dict[str, Any]:
    tags = {c: getattr(rec, c) for c in _TAG_COLUMNS}
    tags["value"] = _fmt(rec.value) if rec.value is not None else None
    tags.update({k: v for k, v in rec.assign.items() if k not in tags})
    for name in ("backend", "batch_size", "output_len", "input_len", "users", "power_cap_w", "prefix_caching"):
        if name in rec.settings and name not in tags:
            tags[name] = rec.settings[name]
    return tags


def _number(value: Any) -> int | float | None:
    """``value`` as a finite int or float (parsing text such as ``"16"``), or None when it is not a number."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        for kind in (int, float):
            try:
                num = kind(value)
            except ValueError:
                continue
            return num if math.isfinite(num) else None
    return None


def _typed_values(df: pd.DataFrame) -> pd.DataFrame:
    """Make the ``value`` column hold numbers for each knob whose values are all numeric.

    Tags carry values as text (so 4 and 4.0 name one configuration); left as text, 16 sorts before 2.
    Knobs with any non-numeric value (a backend name, ``true``) keep their text.
    """
    if df.empty or "value" not in df or "knob" not in df:
        return df
    values = df["value"].astype(object)
    for _, index in df.groupby("knob", dropna=False).groups.items():
        nums = [_number(v) for v in values[index]]
        if all(n is not None for n in nums):
            values[index] = pd.Series(nums, index=index, dtype=object)
    df["value"] = values
    return df


def _order(value: Any) -> tuple[int, float, str]:
    """Sort key: numbers in numeric order, then text in string order, then missing values."""
    num = _number(value)
    if num is not None:
        return (0, float(num), "")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, 0.0, "")
    return (1, 0.0, str(value))


def _tagged(records: Iterable[TrialRecord], attr: str) -> pd.DataFrame:
    rows = []
    for rec in records:
        tags = _tags(rec)
        rows.extend({**row, **tags} for row in getattr(rec, attr))
    return _typed_values(pd.DataFrame(rows))


def load_workflows(records: Iterable[TrialRecord]) -> pd.DataFrame:
    """Tidy workflow rows of ``records`` (an infeasible trial becomes one row with NaN metrics)."""
    rows = []
    for rec in records:
        tags = _tags(rec)
        if rec.status != STATUS_OK or not rec.summary:
            rows.append(dict(tags))
        else:
            rows.extend({**row, **tags} for row in rec.summary)
    return _typed_values(pd.DataFrame(rows))


def _num(rows: Sequence[Mapping[str, Any]], col: str) -> list[float]:
    vals = []
    for r in rows:
        v = r.get(col)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            vals.append(float(v))
    return vals


def _trial_span(rec: TrialRecord) -> float | None:
    """Wall time of a trial: its meta's wall_s, else first call start to last call end."""
    wall = rec.meta.get("wall_s")
    if isinstance(wall, (int, float)) and wall > 0:
        return float(wall)
    starts, ends = _num(rec.runs, "t_start"), _num(rec.runs, "t_end")
    if starts and ends and max(ends) > min(starts):
        return max(ends) - min(starts)
    return None


def trial_metrics(records: Iterable[TrialRecord]) -> pd.DataFrame:
    """Reduce each trial to one row of metrics; repeats are the independent samples the CI is over.

    Within a trial (several concurrent workflows), latency and energies are means over its workflows;
    energy per token is the trial's joules over its generated tokens; throughput is the trial's generated
    tokens over its wall time (so concurrency counts), falling back to the workflows' mean throughput;
    the prefix-cache hit rate is cached prompt tokens over prompt tokens, falling back to the mean rate.
    """
    rows = []
    for rec in records:
        row: dict[str, Any] = _tags(rec)
        s = rec.summary
        row["workflows"] = len(s)
        row["provenance"] = ";".join(sorted({str(r.get("provenance")) for r in s if r.get("provenance")}))
        if rec.status == STATUS_OK and s:
            for col in ("latency_s", "energy_j", "energy_cpu_j", "energy_gpu_j", "energy_dram_j"):
                vals = _num(s, col)
                row[col] = sum(vals) / len(vals) if vals else math.nan
            gen = sum(_num(s, "completion_tokens"))
            energy = _num(s, "energy_j")
            row["completion_tokens"] = gen
            row["energy_per_token_j"] = sum(energy) / gen if gen > 0 and energy else math.nan
            span = _trial_span(rec)
            if span and gen > 0:
                row["throughput_tok_s"] = gen / span
            else:
                tp = _num(s, "throughput_tok_s")
                row["throughput_tok_s"] = sum(tp) / len(tp) if tp else math.nan
            # The engine's prefix-cache counters over the trial, when the sweep read them (both backends).
            engine = (rec.meta.get("engine_metrics") or {}).get("prefix_cache_hit_rate")
            row["engine_cache_hit_rate"] = float(engine) if engine is not None else math.nan
            prompt, cached = sum(_num(s, "prompt_tokens")), sum(_num(s, "cached_tokens"))
            if prompt > 0 and _num(s, "cached_tokens"):
                row["cache_hit_rate"] = cached / prompt
            else:
                hr = _num(s, "cache_hit_rate")
                row["cache_hit_rate"] = sum(hr) / len(hr) if hr else math.nan
        else:
            for m in METRICS:
                row[m] = math.nan
        rows.append(row)
    df = _typed_values(pd.DataFrame(rows))
    for m in METRICS:
        if m not in df.columns:
            df[m] = pd.Series(dtype=float)
    return df


# -- 95% confidence intervals --------------------------------------------------------------------------

# Two-sided 97.5% quantiles of Student's t for df = 1..30; used only when scipy is missing.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(dof: int, confidence: float = 0.95) -> float:
    """Two-sided Student's t critical value for ``dof`` degrees of freedom."""
    if dof < 1:
        raise ValueError("a t quantile needs at least one degree of freedom")
    try:
        from scipy.stats import t

        return float(t.ppf(0.5 + confidence / 2, dof))
    except ImportError:
        if confidence != 0.95:
            raise ConfigError("confidence levels other than 0.95 need scipy installed") from None
        return _T975[dof - 1] if dof <= len(_T975) else 1.96 + 2.4 / dof  # close to t for large dof


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """Mean, CI half-width (Student's t) and sample count of the finite ``values``.

    The half-width is NaN for fewer than two values (no spread to estimate).

    Example:
        >>> m, h, n = mean_ci([1.0, 2.0, 3.0])
        >>> (m, round(h, 3), n)
        (2.0, 2.484, 3)
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan, n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t_quantile(n - 1, confidence) * sd / math.sqrt(n), n


def aggregate(trials: pd.DataFrame, extra_keys: Sequence[str] = (), confidence: float = 0.95) -> pd.DataFrame:
    """Mean and CI of every metric per configuration (workload, knob, value and the crossed knobs).

    Output columns: the keys, ``status`` (``ok``, ``infeasible`` or ``mixed``), ``reason``, ``n``
    (finished repeats), ``provenance`` and for each metric M: ``M_mean``, ``M_ci`` (half-width),
    ``M_lo``, ``M_hi``. Infeasible configurations stay as rows with NaN metrics and their reason.
    Rows are ordered by the keys, numeric values numerically (batch size 1, 2, 4, 8, 16), others as text.
    """
    keys = ["workload", "knob", "value", *[k for k in extra_keys if k not in ("workload", "knob", "value")]]
    if trials.empty:
        return pd.DataFrame(columns=[*keys, "status", "reason", "n"])
    rows = []
    for group, part in trials.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, group if isinstance(group, tuple) else (group,)))
        statuses = set(part["status"])
        row["status"] = statuses.pop() if len(statuses) == 1 else "mixed"
        reasons = [r for r in part.get("reason", pd.Series(dtype=str)) if isinstance(r, str) and r]
        row["reason"] = reasons[0] if reasons else ""
        ok = part[part["status"] == STATUS_OK]
        row["n"] = len(ok)
        labels = (p.strip() for v in ok.get("provenance", []) if isinstance(v, str) for p in v.split(";"))
        provs = sorted({p for p in labels if p})
        row["provenance"] = ";".join(provs)
        for m in METRICS:
            mean, half, _ = mean_ci(ok[m].tolist() if m in ok else [], confidence)
            row[f"{m}_mean"], row[f"{m}_ci"] = mean, half
            row[f"{m}_lo"], row[f"{m}_hi"] = mean - half, mean + half
        for col in ("batch_size", "output_len", "input_len", "users", "power_cap_w", "backend", "prefix_caching"):
            if col in part and col not in row:
                row[col] = part[col].iloc[0]
        rows.append(row)
    # trials come in file-name order (batch-size=16 before batch-size=2), so order the rows explicitly
    rows.sort(key=lambda r: [_order(r[k]) for k in keys])
    return pd.DataFrame(rows)


def timeline_frame(samples: Any, t_start: float, t_end: float, provenance: str = "") -> pd.DataFrame:
    """Turn a meter timeline's samples into the store's timeline rows for one trial.

    Args:
        samples: an object with ``t`` (times), ``energy_j`` (component -> cumulative joules),
            ``gpu_util`` (GPU index -> percent) and optionally ``cpu_util`` (machine CPU percent since the
            previous sample), such as ``Timeline.snapshot()``.
        t_start, t_end: the trial's window on the same clock.
        provenance: where the joules came from, kept with each row.

    Returns:
        Columns ``t`` (s from ``t_start``), ``power_w`` (all components), ``power_<component>_w``,
        ``gpu_util`` (mean over GPUs, percent, NaN without GPUs), ``cpu_util`` (whole machine, percent,
        NaN when not recorded) and ``provenance``.
    """
    cpu = getattr(samples, "cpu_util", None) or []  # older or hand-made samples may not carry it
    idx = [i for i, t in enumerate(samples.t) if t_start <= t <= t_end]
    rows = []
    for a, b in zip(idx, idx[1:]):
        dt = samples.t[b] - samples.t[a]
        if dt <= 0:
            continue
        row: dict[str, Any] = {"t": samples.t[b] - t_start}
        total = 0.0
        for comp, series in samples.energy_j.items():
            watts = (series[b] - series[a]) / dt
            row[f"power_{comp}_w"] = watts
            total += watts
        row["power_w"] = total
        utils = [u[b] for u in samples.gpu_util.values() if len(u) > b and u[b] == u[b]]
        row["gpu_util"] = sum(utils) / len(utils) if utils else math.nan
        # Samples a and b are adjacent, so the value at b is the utilization over exactly this row's interval.
        row["cpu_util"] = float(cpu[b]) if len(cpu) > b else math.nan
        row["provenance"] = provenance
        rows.append(row)
    return pd.DataFrame(rows)


def numeric_value(value: Any) -> float:
    """A knob value as a number for plotting axes (NaN when it is not numeric, e.g. a backend name)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
