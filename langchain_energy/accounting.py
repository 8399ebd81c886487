"""Turn recorded runs and the ledger's split into tables: per run, per workflow, and totals.

Everything here is computed once per change of the ledger (the handler caches an `Accounts`), from three
inputs: the handler's run records, a `LedgerView` (what each run received), and the meter's provenance.
The idle baseline is an explicit quantity: a run's idle joules are the baseline watts times the seconds it
received (`Received.share_s`), so idle shares add up exactly like energy shares.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_energy.ledger import LedgerView, Received, RunRecord
from langchain_energy.meters.base import COMPONENTS, UNAVAILABLE, component_group, is_measured

_NAN = float("nan")

#: Per-run columns of `EnergyCallbackHandler.to_dataframe`, in order (per-GPU columns follow when present).
RUN_COLUMNS: tuple[str, ...] = (
    "run_id", "parent_run_id", "root_run_id", "name", "kind", "tags", "status",
    "t_start", "t_first_token", "t_end", "latency_s",
    "prompt_tokens", "completion_tokens", "cached_tokens", "token_source",
    "energy_j", "energy_cpu_j", "energy_gpu_j", "energy_dram_j",
    "provenance_cpu", "provenance_gpu", "provenance_dram",
    "prefill_energy_j", "decode_energy_j",
    # beyond the fixed contract:
    "energy_measured_j", "orchestration_energy_j", "idle_energy_j", "active_energy_j",
    "ttft_s", "timing", "final", "below_resolution", "langgraph_node", "langgraph_step", "metadata", "error",
)

#: Per-workflow columns of `EnergyCallbackHandler.summary`, in order (per-GPU columns follow when present).
SUMMARY_COLUMNS: tuple[str, ...] = (
    "workflow", "root_run_id", "latency_s", "llm_calls", "prompt_tokens", "completion_tokens",
    "cached_tokens", "throughput_tok_s", "energy_j", "energy_cpu_j", "energy_gpu_j", "energy_dram_j",
    "active_energy_j", "idle_energy_j", "energy_per_token_j", "cache_hit_rate", "provenance",
    # beyond the fixed contract:
    "energy_measured_j", "energy_per_token_measured_j", "calls_without_tokens",
    "status", "errors", "orchestration_energy_j", "decode_throughput_tok_s", "t_start", "t_end",
)


def group_provenance(provenance: Mapping[str, str]) -> dict[str, str]:
    """Collapse component provenance to the record groups cpu/gpu/dram.

    Distinct labels are joined by '+'; GPU labels name the devices read, e.g. ``measured:nvml@gpu0+gpu1``.

    Example:
        >>> group_provenance({"cpu": "estimated:x", "gpu:0": "measured:nvml"})
        {'cpu': 'estimated:x', 'gpu': 'measured:nvml@gpu0', 'dram': 'unavailable'}
    """
    labels: dict[str, dict[str, list[str]]] = {g: {} for g in COMPONENTS}
    for key, prov in provenance.items():
        group = component_group(key)
        device = key.split(":", 1)[1] if ":" in key else None
        labels.setdefault(group, {}).setdefault(prov, [])
        if device is not None:
            labels[group][prov].append(f"{group}{device}")
    out = {}
    for g, by_label in labels.items():
        # A label that already names its device (zeusd's ``measured:zeusd@node:gpu0``) is kept as it is.
        parts = [f"{p}@{'+'.join(sorted(d))}" if d and "@" not in p else p for p, d in sorted(by_label.items())]
        out[g] = "+".join(parts) if parts else UNAVAILABLE
    return out


_GROUP_COLUMNS = {g: f"energy_{g}_j" for g in COMPONENTS}


@dataclass
class EnergyColumns:
    """How to turn per-component joules into record columns, given the meter's provenance."""

    provenance: Mapping[str, str]

    def __post_init__(self) -> None:
        self.groups = group_provenance(self.provenance)
        self.gpus = sorted(k for k in self.provenance if component_group(k) == "gpu")
        self.measured = [k for k, p in self.provenance.items() if is_measured(p)]
        self._group_of = {k: component_group(k) for k in self.provenance}
        self._gpu_columns = [(k, f"energy_gpu{k.split(':', 1)[1]}_j") for k in self.gpus]
        # Each group's component keys (None where the meter does not report the group): this runs for every call.
        self._keys_of = [(g, None if self.groups[g] == UNAVAILABLE
                          else [k for k, kg in self._group_of.items() if kg == g]) for g in COMPONENTS]

    def _by_group(self, energy: Mapping[str, float]) -> dict[str, float]:
        """Joules per available group (NaN for a group the meter does not report)."""
        if energy.keys() <= self._group_of.keys():  # (the usual case: the components this provenance names)
            out = {}
            for g, keys in self._keys_of:  # (loops, not comprehensions: this runs at every call's end)
                if keys is None:
                    out[g] = _NAN
                elif len(keys) == 1:
                    out[g] = energy.get(keys[0], 0.0)
                else:
                    out[g] = math.fsum([energy.get(k, 0.0) for k in keys])
            return out
        by_group: dict[str, list[float]] = {g: [] for g in COMPONENTS}
        for k, v in energy.items():
            g = self._group_of.get(k) or component_group(k)
            if g in by_group:
                by_group[g].append(v)
        return {g: _NAN if self.groups[g] == UNAVAILABLE else math.fsum(by_group[g]) for g in COMPONENTS}

    def total(self, energy: Mapping[str, float]) -> float:
        """The ``energy_j`` column alone: the sum over the groups the meter reports."""
        known = [v for v in self._by_group(energy).values() if not math.isnan(v)]
        return math.fsum(known) if known else _NAN

    def columns(self, energy: Mapping[str, float]) -> dict[str, float]:
        """``energy_j``, per group, ``energy_measured_j`` and per GPU (``energy_gpu0_j``, ...)."""
        out: dict[str, float] = {}
        known = []
        for g, j in self._by_group(energy).items():
            out[_GROUP_COLUMNS[g]] = j
            if j == j:  # (not NaN)
                known.append(j)
        out["energy_j"] = math.fsum(known) if known else _NAN
        out["energy_measured_j"] = math.fsum([energy.get(k, 0.0) for k in self.measured]) if self.measured else _NAN
        for k, column in self._gpu_columns:
            out[column] = energy.get(k, 0.0)
        return out

    def column_provenance(self) -> dict[str, str]:
        """Where each energy column comes from (for ``DataFrame.attrs["provenance"]`` and reports)."""
        prov = {f"energy_{g}_j": self.groups[g] for g in COMPONENTS}
        summed = "; ".join(f"{g}={self.groups[g]}" for g in COMPONENTS if self.groups[g] != UNAVAILABLE)
        prov["energy_j"] = f"sum of {summed}" if summed else UNAVAILABLE
        measured = sorted({self.provenance[k] for k in self.measured})
        prov["energy_measured_j"] = (f"sum of {'+'.join(measured)} over {'+'.join(self.measured)}"
                                     if measured else UNAVAILABLE)
        for k in self.gpus:
            prov[f"energy_gpu{k.split(':', 1)[1]}_j"] = self.provenance[k]
        for col in ("prefill_energy_j", "decode_energy_j", "orchestration_energy_j", "active_energy_j"):
            prov[col] = f"derived from energy_j ({prov['energy_j']})"
        prov["energy_per_token_j"] = "energy_j of calls with token counts / their completion tokens"
        prov["energy_per_token_measured_j"] = "energy_measured_j of calls with token counts / their completion tokens"
        return prov


@dataclass
class Accounts:
    """Per-run and per-workflow figures computed once from records and a ledger view."""

    runs: list[dict[str, Any]]
    workflows: list[dict[str, Any]]
    totals: dict[str, dict[str, float]]  # "" for every component, else per group (cpu/gpu/dram)
    column_provenance: dict[str, str]


def _zero(components: Sequence[str]) -> Received:
    return Received({c: 0.0 for c in components})


def account(records: Sequence[RunRecord], view: LedgerView, provenance: Mapping[str, str],
            idle_power_w: Mapping[str, float] | None, open_status: str = "running",
            resolution_s: float | None = None) -> Accounts:
    """Build every table of a handler from its records and what the ledger says they received.

    Args:
        records: the handler's runs, in start order.
        view: the ledger's split up to `view.t`.
        provenance: component key -> provenance label.
        idle_power_w: the idle baseline (watts per component), or None for none.
        open_status: the status written for runs still open at `view.t` (``"open_at_close"`` when frozen).
        resolution_s: how often the meter's counters step (NVML: about 0.1 s); a call shorter than that is
            flagged ``below_resolution`` (its joules are interpolated within one counter step).
    """
    cols = EnergyColumns(provenance)
    components = tuple(provenance)
    by_id = {r.run_id: r for r in records}
    own = {r.run_id: view.received.get(r.run_id) or _zero(components) for r in records}
    # Inclusive sums (a run plus its descendants), and the same over calls only: children before parents.
    depth = {rid: _depth(rid, by_id) for rid in by_id}
    inclusive = {rid: own[rid].copy() for rid in by_id}
    calls_only = {rid: (own[rid].copy() if by_id[rid].takes_energy_first else _zero(components)) for rid in by_id}
    for rid in sorted(by_id, key=lambda r: -depth[r]):
        parent = by_id[rid].parent_run_id
        if parent in by_id:
            inclusive[parent].add(inclusive[rid].energy, None, None, inclusive[rid].share_s)
            calls_only[parent].add(calls_only[rid].energy, None, None, 0.0)
    idle_w = math.fsum(idle_power_w.values()) if idle_power_w is not None else None

    run_rows = []
    for r in records:
        e = cols.columns(inclusive[r.run_id].energy)
        calls_e = cols.columns(calls_only[r.run_id].energy)["energy_j"]
        idle = idle_w * inclusive[r.run_id].share_s if idle_w is not None else _NAN
        rec_own = own[r.run_id]
        t_end = r.t_end if r.t_end is not None and r.t_end <= view.t else None
        run_rows.append({
            "run_id": str(r.run_id),
            "parent_run_id": str(r.parent_run_id) if r.parent_run_id else None,
            "root_run_id": str(r.root_run_id),
            "name": r.name, "kind": r.kind, "tags": list(r.tags),
            "status": r.status if t_end is not None or r.status != "running" else open_status,
            "t_start": r.t_start, "t_first_token": r.t_first_token, "t_end": t_end,
            "latency_s": (t_end - r.t_start) if t_end is not None else _NAN,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "cached_tokens": r.cached_tokens, "token_source": r.token_source,
            **e,
            "provenance_cpu": cols.groups["cpu"], "provenance_gpu": cols.groups["gpu"],
            "provenance_dram": cols.groups["dram"],
            "prefill_energy_j": cols.columns(rec_own.prefill)["energy_j"] if rec_own.prefill is not None else _NAN,
            "decode_energy_j": cols.columns(rec_own.decode)["energy_j"] if rec_own.decode is not None else _NAN,
            "orchestration_energy_j": e["energy_j"] - calls_e,
            "idle_energy_j": idle, "active_energy_j": e["energy_j"] - idle,
            "ttft_s": (r.t_first_token - r.t_start) if r.t_first_token is not None else r.ttft_s,
            "timing": r.timing if r.takes_energy_first else None,
            "final": r.run_id in view.final,
            "below_resolution": bool(resolution_s and r.takes_energy_first and t_end is not None
                                     and t_end - r.t_start < resolution_s),
            "langgraph_node": r.metadata.get("langgraph_node"),
            "langgraph_step": r.metadata.get("langgraph_step"),
            "metadata": dict(r.metadata), "error": r.error,
        })

    workflows = _workflows(records, by_id, inclusive, calls_only, own, cols, idle_w, view.t)
    totals = {"": totals_of(records, own, view, list(cols.provenance))}
    for group in COMPONENTS:
        keys = [k for k in cols.provenance if component_group(k) == group]
        if keys:
            totals[group] = totals_of(records, own, view, keys)
    return Accounts(runs=run_rows, workflows=workflows, totals=totals, column_provenance=cols.column_provenance())


def _depth(rid: Hashable, by_id: Mapping[Hashable, RunRecord]) -> int:
    d, seen, p = 0, {rid}, by_id[rid].parent_run_id
    while p in by_id and p not in seen:
        seen.add(p)
        d += 1
        p = by_id[p].parent_run_id
    return d


def _workflows(records: Sequence[RunRecord], by_id: Mapping[Hashable, RunRecord],
               inclusive: Mapping[Hashable, Received], calls_only: Mapping[Hashable, Received],
               own: Mapping[Hashable, Received], cols: EnergyColumns, idle_w: float | None,
               now: float) -> list[dict[str, Any]]:
    by_root: dict[Hashable, list[RunRecord]] = {}
    for r in records:
        root = r.root_run_id if r.root_run_id in by_id else r.run_id
        by_root.setdefault(root, []).append(r)
    prov_str = "; ".join(f"{g}={cols.groups[g]}" for g in COMPONENTS)
    rows = []
    for root_id, members in by_root.items():
        root = by_id[root_id]
        calls = [m for m in members if m.is_call]
        t_end = max((m.t_end if m.t_end is not None and m.t_end <= now else now) for m in members)
        t_start = min(m.t_start for m in members)
        latency = t_end - t_start
        prompt = _sum_opt([c.prompt_tokens for c in calls])
        completion = _sum_opt([c.completion_tokens for c in calls])
        with_cache = [c for c in calls if c.cached_tokens is not None and c.prompt_tokens]
        cached = _sum_opt([c.cached_tokens for c in with_cache])
        hit_rate = (cached / sum(c.prompt_tokens or 0 for c in with_cache)) if with_cache else _NAN
        e = cols.columns(inclusive[root_id].energy)
        calls_e = cols.columns(calls_only[root_id].energy)["energy_j"]
        idle = idle_w * inclusive[root_id].share_s if idle_w is not None else _NAN
        # Calls without a completion count leave both sides of J/token (their joules are not divided by
        # other calls' tokens); `calls_without_tokens` says how many were left out.
        tokenless = [c for c in calls if c.completion_tokens is None]
        tokenless_e = cols.columns(_sum_energy([own[c.run_id] for c in tokenless]))
        decode_time = _union_length([(c.t_first_token, c.t_end) for c in calls
                                     if c.t_first_token is not None and c.t_end is not None])
        rows.append({
            "workflow": root.name, "root_run_id": str(root_id), "latency_s": latency,
            "llm_calls": len(calls), "prompt_tokens": prompt, "completion_tokens": completion,
            "cached_tokens": cached,
            "throughput_tok_s": (completion / latency) if completion is not None and latency > 0 else _NAN,
            **e,
            "active_energy_j": e["energy_j"] - idle, "idle_energy_j": idle,
            "energy_per_token_j": ((e["energy_j"] - tokenless_e["energy_j"]) / completion) if completion else _NAN,
            "cache_hit_rate": hit_rate, "provenance": prov_str,
            "energy_per_token_measured_j": ((e["energy_measured_j"] - tokenless_e["energy_measured_j"]) / completion)
            if completion else _NAN,
            "calls_without_tokens": len(tokenless),
            "status": "error" if any(m.status == "error" for m in members) else
                      ("running" if any(m.t_end is None or m.t_end > now for m in members) else "ok"),
            "errors": sum(m.status == "error" for m in members),
            "orchestration_energy_j": e["energy_j"] - calls_e,
            "decode_throughput_tok_s": (completion / decode_time) if completion and decode_time > 0 else _NAN,
            "t_start": t_start, "t_end": t_end,
        })
    return rows


def totals_of(records: Sequence[RunRecord], own: Mapping[Hashable, Received], view: LedgerView,
              comps: Sequence[str]) -> dict[str, float]:
    """Metered joules of `comps` over the records' window, and how calls, chains and nobody received them."""
    calls = math.fsum(own[r.run_id].energy.get(c, 0.0) for r in records if r.takes_energy_first for c in comps)
    orch = math.fsum(own[r.run_id].energy.get(c, 0.0) for r in records if not r.takes_energy_first for c in comps)
    marks = [view.cumulative[r.run_id] for r in records if r.run_id in view.cumulative]
    if marks:
        first = min(records, key=lambda r: r.t_start)
        last = max(records, key=lambda r: r.t_end if r.t_end is not None and r.t_end <= view.t else view.t)
        start = view.cumulative.get(first.run_id, marks[0])[0]
        end = view.cumulative.get(last.run_id, marks[-1])[1]
        metered = math.fsum(end[c] - start[c] for c in comps)
    else:
        metered = 0.0
    return {"metered_j": metered, "calls_j": calls, "orchestration_j": orch, "outside_j": metered - calls - orch}


def _sum_energy(items: Sequence[Received]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in items:
        for c, j in r.energy.items():
            out[c] = out.get(c, 0.0) + j
    return out


def _sum_opt(values: Sequence[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total
