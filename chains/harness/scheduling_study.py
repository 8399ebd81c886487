"""The scheduling experiment: per-workflow completion time and energy under each policy, on one engine.

Many workflows start at once (the composite load: documents plus search sessions; the agentic load: tasks),
so the engine is saturated. Each arm serves the same load on the same engine: vLLM FCFS (no scheduler), each
workflow-aware policy of `langchain_energy.scheduling` (the client's gate admits batch-size calls at a time
in policy order; a leading workflow keeps its slot between its calls), and Parrot's ServeCore in front of the same vLLM where ``PARROT_SRC`` is
set. The trials run through the sweep machinery (one resumable store, atomic trials, one engine for every
arm of a batch size: any scheduling value starts it with vLLM's priority scheduling, whose equal-priority
order is FCFS). The report reads each workflow's start and end from the energy handler's run table
(a workflow is a child of the workload's root run: a document, a session, a task).

    python -m chains.study --size rehearse --parts scheduling --out results/sched   # CPU rehearsal
    python -m chains.study --size gpu --parts scheduling --out results/sched --time-budget 400   # one H200
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from chains.harness.stats import mean_ci
from chains.harness.store import ResultStore, SweepSpec, write_json_atomic, write_text_atomic
from langchain_energy.ledger import CALL_KINDS
from langchain_energy.scheduling import POLICIES

PART = "scheduling"

#: What the part runs at each study size: loads (workload -> settings), batch sizes, policies, repeats.
SIZES: dict[str, dict[str, Any]] = {
    # One H200 within 9 minutes: one engine with CUDA graphs, the composite at batch 8, FCFS and one policy.
    "gpu": {
        "engine": {"max_model_len": 4096, "enforce_eager": False},
        "batch": [8], "policies": ["fcfs", "workflow-fcfs"], "repeats": 3,
        "loads": {"composite": {"preset": "study", "ignore_eos": True, "n_docs": 32, "n_queries": 32, "users": 32,
                                "input_len": 1000, "max_input_tokens": 6000, "max_follow_ups": 6,
                                "output_len": 64}},
    },
    # The full experiment (a longer GPU session): every policy, batch 8 and 16, agentic with 16 tasks.
    "full": {
        "engine": {"max_model_len": 4096, "enforce_eager": False},
        "batch": [8, 16], "policies": list(POLICIES), "repeats": 3,
        "loads": {"composite": {"preset": "study", "ignore_eos": True, "n_docs": 32, "n_queries": 32, "users": 32,
                                "input_len": 1000, "max_input_tokens": 6000, "max_follow_ups": 6,
                                "output_len": 96},
                  "agentic": {"preset": "study", "ignore_eos": True, "n_tasks": 16, "users": 16, "rounds": 1,
                              "output_len": 256, "review_len": 128}},
    },
    # The CPU rehearsal (a few minutes on two cores with the embedded model).
    "rehearse": {
        "engine": {"max_model_len": 4096},
        "batch": [4], "policies": list(POLICIES), "repeats": 2,
        "loads": {"composite": {"ignore_eos": True, "n_docs": 4, "n_queries": 4, "users": 4, "input_len": 256,
                                "max_input_tokens": 768, "max_follow_ups": 1, "output_len": 16}},
    },
}


def scheduling_part(size_name: str, model: str, out: Path, deadline: float | None) -> str:
    """Run the part into ``out/scheduling`` (resumable), then write its report and figure; a one-line account.

    One engine per batch size serves every load, arm and repeat (a policy needs no restart). Repeats run one
    round at a time over all arms, so a time budget that stops the part early leaves the arms balanced.
    """
    from chains.harness.engine_runner import EngineTrialRunner, _warm_up
    from chains.harness.sweep import run_sweep
    from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer
    from langchain_energy.power import PowerCap

    size = SIZES[size_name]
    store_dir = out / PART
    knobs: dict[str, list[Any]] = {"scheduling": list(size["policies"])}
    if os.environ.get("PARROT_SRC"):
        knobs["backend"] = ["parrot"]
    # Parrot's arm sets no scheduling value: the fixed engine flag keeps it on the same engine as the others.
    engine = {"model": model, **size["engine"], "scheduling_policy": "priority"}
    loads = {}
    for workload, settings in size["loads"].items():
        if settings.get("n_docs"):
            settings = {**settings, "docs": str(document_pieces(store_dir / "docs", settings["n_docs"]))}
        loads[workload] = settings
    def stored() -> int:
        return sum(len(list((store_dir / w / "trials").glob("*.json"))) for w in loads)

    before = stored()
    for batch in size["batch"]:
        if deadline is not None and time.monotonic() >= deadline:
            break
        with VLLMServer(EngineConfig(**{**engine, "max_num_seqs": batch}), log_dir=str(store_dir)) as server:
            _warm_up(server, batch)
            for repeats in range(1, size["repeats"] + 1):
                for workload, settings in loads.items():
                    spec = SweepSpec(workloads=[workload], knobs=knobs, repeats=repeats,
                                     across={"batch-size": [batch]},
                                     fixed={"settings": {"model": model, **settings}, "engine": engine})
                    runner = EngineTrialRunner(engine, server=server)   # borrowed: close() leaves it running
                    run_sweep(spec, ResultStore(store_dir / workload), runner, defaults=runner.defaults(),
                              power_cap=PowerCap(dry_run=True), deadline=deadline)
    report = write_report(store_dir)
    parrot = "" if os.environ.get("PARROT_SRC") else "; Parrot arm skipped: PARROT_SRC is not set"
    return f"{PART}: {stored() - before} trials run, {before} resumed{parrot}; report {report}"


def document_pieces(folder: Path, n: int) -> Path:
    """``n`` documents for the summarization side, cut from the embedded corpus (its 11 documents into equal
    pieces, as few per document as give ``n``), written once as text files that ``--docs`` reads in order."""
    from chains.workloads.corpus import embedded_corpus

    if folder.is_dir() and len(list(folder.glob("*.txt"))) == n:
        return folder
    corpus = [d.page_content for d in embedded_corpus()]
    per_doc = math.ceil(n / len(corpus))
    pieces = []
    for k in range(per_doc):            # the first piece of every document, then the second, ...
        for text in corpus:
            step = len(text) // per_doc
            pieces.append(text[k * step:(k + 1) * step])
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("doc*.txt"):
        stale.unlink()
    for i, text in enumerate(pieces[:n]):
        write_text_atomic(folder / f"doc{i:03d}.txt", text)
    return folder


# -- the report ------------------------------------------------------------------------------------------

def _arm(rec: Any) -> str:
    if rec.knobs.get("backend") == "parrot":
        return "parrot"
    return rec.knobs.get("scheduling") or "fcfs"


def completion_times(rec: Any) -> pd.DataFrame:
    """One row per workflow of a trial: name and completion time from the load's start (s).

    A workflow is a run whose parent is a root run (the workload's fan-out); the load starts with its
    first run.
    """
    runs = pd.DataFrame(rec.runs)
    if runs.empty:
        return pd.DataFrame(columns=["workflow", "completion_s"])
    roots = set(runs.loc[runs["parent_run_id"].isna(), "run_id"])
    flows = runs[runs["parent_run_id"].isin(roots) & ~runs["kind"].isin(CALL_KINDS)]
    t0 = float(runs["t_start"].min())
    return pd.DataFrame({"workflow": flows["name"].to_numpy(), "completion_s": (flows["t_end"] - t0).to_numpy()})


def trial_row(rec: Any) -> dict[str, Any]:
    """One trial: the completion-time statistics of its workflows, its energy, wall time and engine counters."""
    times = completion_times(rec)["completion_s"].dropna().to_numpy()
    summary = pd.DataFrame(rec.summary)
    runs = pd.DataFrame(rec.runs)
    engine = rec.meta.get("engine_metrics") or {}
    energy = float(summary["energy_j"].sum()) if "energy_j" in summary else math.nan
    provenance = ";".join(sorted({str(p) for p in summary.get("provenance", [])}))
    gpu_j = float(summary["energy_gpu_j"].sum()) \
        if "energy_gpu_j" in summary and "gpu=unavailable" not in provenance else math.nan
    tokens = float(summary["completion_tokens"].sum()) if "completion_tokens" in summary else math.nan
    timeline = pd.DataFrame(rec.timeline)
    util = float(timeline["gpu_util"].mean()) if "gpu_util" in timeline and timeline["gpu_util"].notna().any() \
        else math.nan
    steps = engine.get("engine_steps")
    return {
        "workload": rec.workload, "batch_size": rec.knobs.get("batch-size"), "arm": _arm(rec), "repeat": rec.repeat,
        "workflows": len(times),
        "mean_s": float(times.mean()) if len(times) else math.nan,
        "p50_s": float(pd.Series(times).quantile(0.5)) if len(times) else math.nan,
        "p90_s": float(pd.Series(times).quantile(0.9)) if len(times) else math.nan,
        "wall_s": float(runs["t_end"].max() - runs["t_start"].min()) if not runs.empty else math.nan,
        "energy_j": energy, "energy_gpu_j": gpu_j, "completion_tokens": tokens,
        "j_per_token": energy / tokens if tokens and tokens > 0 else math.nan,
        "gpu_util_pct": util,
        "engine_steps": float(steps) if steps is not None else math.nan,
        "tokens_per_step": float(engine["generation_tokens"]) / steps
        if steps and engine.get("generation_tokens") is not None else math.nan,
        "cache_hit_rate": engine.get("prefix_cache_hit_rate", math.nan),
        # Slot-seconds the gate kept free for a workflow's next call (0 under fcfs: no gate).
        "kept_idle_s": float((rec.meta.get("scheduler") or {}).get("idle_s", 0.0)),
        "provenance": provenance,
    }


METRICS = ("mean_s", "p50_s", "p90_s", "wall_s", "energy_j", "energy_gpu_j", "j_per_token", "gpu_util_pct",
           "engine_steps", "tokens_per_step", "cache_hit_rate", "kept_idle_s")


def arm_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per workload, batch size and arm: each metric's mean and 95% CI over repeats, and the ratios to FCFS."""
    rows = []
    for (workload, batch, arm), part in trials.groupby(["workload", "batch_size", "arm"], sort=False):
        row: dict[str, Any] = {"workload": workload, "batch_size": batch, "arm": arm, "repeats": len(part)}
        for m in METRICS:
            mean, half, _ = mean_ci(part[m].dropna().tolist())
            row[m], row[f"{m}_ci"] = mean, half
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for (workload, batch), part in table.groupby(["workload", "batch_size"], sort=False):
        base = part[part["arm"] == "fcfs"]
        if base.empty:
            continue
        b = base.iloc[0]
        idx = part.index
        table.loc[idx, "speedup_mean"] = b["mean_s"] / part["mean_s"]
        table.loc[idx, "energy_ratio"] = part["energy_j"] / b["energy_j"]
        # Non-overlapping 95% CIs of the mean completion time, against FCFS.
        table.loc[idx, "ci_separate"] = (part["mean_s"] + part["mean_s_ci"]) < (b["mean_s"] - b["mean_s_ci"])
    return table


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """The report's columns, each metric as ``mean ± CI``."""
    out = table[["workload", "batch_size", "arm", "repeats"]].copy()
    for m in METRICS:
        out[m] = [f"{v:.4g} ± {c:.2g}" if math.isfinite(v) else "n/a" for v, c in zip(table[m], table[f"{m}_ci"])]
    for col, fmt in (("speedup_mean", "{:.3g}x"), ("energy_ratio", "{:.3g}")):
        values = table[col] if col in table else [math.nan] * len(table)   # no FCFS arm: nothing to compare with
        out[col] = [fmt.format(v) if isinstance(v, float) and math.isfinite(v) else "n/a" for v in values]
    out["ci_separate"] = table["ci_separate"] if "ci_separate" in table else None
    return out


def write_report(store_dir: Path) -> Path:
    """``report.md``, ``trials.csv``, ``arms.csv``, ``completion_times.csv`` and the figure, from the stores."""
    from chains.harness.plots import fig_completion_times
    from chains.harness.record import STATUS_OK

    trials, times = [], []
    for path in sorted(p for p in store_dir.iterdir() if (p / "sweep.json").exists()) if store_dir.exists() else []:
        for rec in ResultStore(path).records():
            if rec.status != STATUS_OK:
                continue
            trials.append(trial_row(rec))
            ct = completion_times(rec)
            ct["workload"], ct["batch_size"], ct["arm"], ct["repeat"] = (
                rec.workload, rec.knobs.get("batch-size"), _arm(rec), rec.repeat)
            times.append(ct)
    trials_df = pd.DataFrame(trials)
    times_df = pd.concat(times, ignore_index=True) if times else pd.DataFrame()
    table = arm_table(trials_df) if not trials_df.empty else pd.DataFrame()
    store_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(store_dir / "trials.csv", trials_df.to_csv(index=False))
    write_text_atomic(store_dir / "arms.csv", table.to_csv(index=False))
    write_text_atomic(store_dir / "completion_times.csv", times_df.to_csv(index=False))
    lines = ["# Workflow scheduling", ""]
    if not table.empty:
        prov = ";".join(sorted(set(trials_df["provenance"])))
        lines += [f"Energy provenance: {prov}. Each cell: mean ± 95% CI half-width over repeats; completion "
                  "times are from the load's start; speedup and energy ratio are against FCFS vLLM.", "",
                  shown(table).to_markdown(index=False), ""]
        best = best_policy(table)
        lines += ["No policy finished workflows sooner at no more energy than FCFS." if best is None else
                  f"Best at no more energy than FCFS: {best['arm']} ({best['workload']}, batch {best['batch_size']}): "
                  f"mean completion {best['speedup_mean']:.3g}x sooner, energy ratio {best['energy_ratio']:.3g}, "
                  f"completion-time CIs {'apart' if best['ci_separate'] else 'overlapping'}.", ""]
        fig = fig_completion_times(times_df)
        fig.savefig(store_dir / "completion_times.png", dpi=120)
        lines += ["![workflow completion times](completion_times.png)", ""]
        write_json_atomic(store_dir / "arms.json", table.to_dict(orient="records"))
    path = store_dir / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path


def best_policy(table: pd.DataFrame) -> dict[str, Any] | None:
    """The arm with the largest mean-completion speedup over FCFS (above 1) at no more energy, if any."""
    fair = table[(table["arm"] != "fcfs") & (table["energy_ratio"] <= 1.0) & (table["speedup_mean"] > 1.0)] \
        if "energy_ratio" in table else table[:0]
    return None if fair.empty else fair.sort_values("speedup_mean", ascending=False).iloc[0].to_dict()


__all__: Sequence[str] = ("SIZES", "scheduling_part", "write_report", "arm_table", "trial_row", "completion_times",
                          "best_policy")
