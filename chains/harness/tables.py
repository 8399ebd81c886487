"""Tidy tables of a store's trials: workflow rows, one row of metrics per trial, tagged calls and samples.

Every row carries its trial's tags: the key, workload, swept knob and its typed ``value``, repeat, status,
reason, each knob's value under its settings field (``batch_size``, ``power_cap_w``, ...) and under its
knob name for the knobs the sweep set. Where a power cap is recorded, ``power_cap_mode`` says whether it was
applied, or only recorded (``dry-run``) or simulated: a cap that was not applied is never shown as one.

Example:
    >>> from chains.harness.record import TrialRecord
    >>> rec = TrialRecord(key="k", workload="search", knob="users", repeat=0, knobs={"users": 2}, swept=["users"])
    >>> load_workflows([rec])[["knob", "value", "users"]].to_dict("records")
    [{'knob': 'users', 'value': 2, 'users': 2}]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from chains.harness.knobs import KNOBS
from chains.harness.record import STATUS_OK, TrialRecord

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


_TAG_COLUMNS = ("key", "workload", "knob", "value", "repeat", "status", "reason")


def power_cap_mode(rec: TrialRecord) -> str | None:
    """``applied``, ``dry-run`` (recorded only) or ``simulated`` for a trial with a cap; None without one."""
    if rec.knobs.get("power-cap") is None:
        return None
    return str(rec.meta.get("power_cap_mode") or "dry-run")  # no mode recorded: nothing says it was applied


def _tags(rec: TrialRecord) -> dict[str, Any]:
    tags = {c: getattr(rec, c) for c in _TAG_COLUMNS}
    tags.update({k: v for k, v in rec.assign.items() if k not in tags})
    for k in KNOBS.values():
        tags.setdefault(k.field, rec.knobs.get(k.name))
    tags["power_cap_mode"] = power_cap_mode(rec)
    return tags


def tagged(records: Iterable[TrialRecord], attr: str) -> pd.DataFrame:
    """The rows of ``attr`` (``runs`` or ``timeline``) of every record, each with its trial's tags."""
    rows = []
    for rec in records:
        tags = _tags(rec)
        rows.extend({**row, **tags} for row in getattr(rec, attr))
    return pd.DataFrame(rows)


def load_workflows(records: Iterable[TrialRecord]) -> pd.DataFrame:
    """Tidy workflow rows of ``records`` (an infeasible trial becomes one row with NaN metrics)."""
    rows = []
    for rec in records:
        tags = _tags(rec)
        if rec.status != STATUS_OK or not rec.summary:
            rows.append(dict(tags))
        else:
            rows.extend({**row, **tags} for row in rec.summary)
    return pd.DataFrame(rows)


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
    df = pd.DataFrame(rows)
    for m in METRICS:
        if m not in df.columns:
            df[m] = pd.Series(dtype=float)
    return df




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


def shown_columns(table: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The ``columns`` a printed table shows: those it has; power-cap ones only where a cap was recorded."""
    return [c for c in columns if c in table and (not c.startswith("power_cap") or bool(table[c].notna().any()))]


def numeric_value(value: Any) -> float:
    """A knob value as a number for plotting axes (NaN when it is not numeric, e.g. a backend name)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
