"""Means and 95% confidence intervals (Student's t) per configuration of a sweep.

Example:
    >>> m, h, n = mean_ci([1.0, 2.0, 3.0])
    >>> (m, round(h, 3), n)
    (2.0, 2.484, 3)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from chains.harness.knobs import KNOB_FIELDS
from chains.harness.record import STATUS_OK
from chains.harness.tables import METRICS
from langchain_energy.errors import ConfigError


def _order(value: Any) -> tuple[int, float, str]:
    """Sort key: numbers in numeric order, then text (and on/off) in string order, then missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


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
        for col in (*KNOB_FIELDS, "power_cap_mode"):
            if col in part and col not in row:
                row[col] = part[col].iloc[0]
        rows.append(row)
    # trials come in file-name order (batch-size=16 before batch-size=2), so order the rows explicitly
    rows.sort(key=lambda r: [_order(r[k]) for k in keys])
    return pd.DataFrame(rows)
