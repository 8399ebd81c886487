"""Proof of sweeps over Ray on two GPUs: wall time against one GPU, each configuration's joules from its own GPU,
and a tensor-parallel-2 engine against tensor-parallel-1.

On one machine with two GPUs (default: the Llama-2-7B shape with dummy weights, eager engines):

1. ``one-gpu``: a 4-configuration search sweep (batch size 8, 16, 32, 64; the same 8 sessions each) through
   `RayExecutor` on a local Ray that is given one GPU: the configurations run one after another on GPU 0
   while GPU 1 idles.
2. ``two-gpu``: the same sweep on a local Ray given both GPUs: one engine per GPU, two configurations at a
   time. Goal: wall time at least 1.8x shorter (the configurations do equal work, so 2.0x is the ceiling).
3. ``tensor-parallel``: batch 16 with ``tensor-parallel=2`` (one engine over both GPUs) against the
   batch-16 configuration of part 2 (one GPU): GPU J/token and latency.

Each part reads both GPUs' own counters (Zeus, NVML) before and after, from this process; each configuration's
GPU joules come from its worker's meter, which sees only the GPUs Ray gave it. So the idle GPU 1 of part 1
shows in the counters and in no configuration's joules. Writes ``gpu_multi.json`` and ``table.md`` (README
ready) to ``--out``; a part already in ``gpu_multi.json`` is not run again (a rerun after an interruption runs
the missing parts afresh: a wall time is only valid uninterrupted).

    python -m bench.gpu_multi --out docs/results/gpu-h200x2-ray
    python -m bench.gpu_multi --out results/gpu-multi --rehearse   # CPU: the embedded engine, 1 and 2 CPU workers
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from chains.harness.engine_runner import EngineTrialRunner
from chains.harness.ray_executor import RayExecutor, connect
from chains.harness.record import STATUS_OK
from chains.harness.store import ResultStore, SweepSpec, write_json_atomic, write_text_atomic
from chains.harness.sweep import run_sweep
from chains.harness.sweep_cli import engine_runner_maker
from langchain_energy.errors import EnergyError

SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        "model": "llama2-7b-shape",
        "engine": {"max_model_len": 4096, "enforce_eager": True},
        "tp_engine": {"extra_args": ("--distributed-executor-backend", "mp")},
        "batch": [8, 16, 32, 64],
        "tp_batch": 16,
        "repeats": 2,
        "settings": {"users": 8, "n_queries": 8, "max_follow_ups": 1, "output_len": 200, "ignore_eos": True,
                     "preset": "study"},
    },
    "rehearse": {
        "model": "smollm2-135m",
        "engine": {"max_model_len": 4096, "cpu_kvcache_gib": 1},
        "tp_engine": {},
        "batch": [4, 8],
        "tp_batch": 8,
        "repeats": 1,
        "settings": {"users": 2, "n_queries": 2, "max_follow_ups": 0, "output_len": 8, "ignore_eos": True},
    },
}


class Counters:
    """Both GPUs' own energy counters (Zeus over NVML), read from this process; nothing without GPUs."""

    def __init__(self, rehearse: bool) -> None:
        self.meter = None
        if not rehearse:
            from langchain_energy.meters import ZeusMeter

            self.meter = ZeusMeter(cpu=False)

    def read(self) -> dict[str, float]:
        if self.meter is None:
            return {}
        return {k: float(v) for k, v in self.meter.read().energy_j.items() if k.startswith("gpu:")}


def _sum(rows: list[dict[str, Any]], col: str) -> float:
    vals = [float(r[col]) for r in rows if isinstance(r.get(col), (int, float)) and r[col] == r[col]]
    return sum(vals) if vals else math.nan


def _configs(store: ResultStore) -> list[dict[str, Any]]:
    """One row per configuration: where it ran, when, and its joules (GPU total and per GPU) and tokens."""
    out: dict[str, dict[str, Any]] = {}
    for rec in store.records():
        name = f"batch-size={rec.knobs.get('batch-size')} tp={rec.knobs.get('tensor-parallel') or 1}"
        row = out.setdefault(name, {"config": name, "status": rec.status, "reason": rec.reason,
                                    "node": rec.meta.get("node"), "gpus": rec.meta.get("gpus"), "trials": 0,
                                    "start": math.inf, "end": -math.inf, "energy_gpu_j": 0.0, "energy_j": 0.0,
                                    "completion_tokens": 0.0, "latency_s": [], "per_gpu_j": {}})
        if rec.status != STATUS_OK:
            continue
        row["trials"] += 1
        row["start"] = min(row["start"], rec.meta.get("started_at", math.inf))
        row["end"] = max(row["end"], rec.meta.get("ended_at", -math.inf))
        for col in ("energy_gpu_j", "energy_j", "completion_tokens"):
            value = _sum(rec.summary, col)
            row[col] += 0.0 if math.isnan(value) else value
        row["latency_s"] += [float(s["latency_s"]) for s in rec.summary if s.get("latency_s") is not None]
        for col in {k for s in rec.summary for k in s if k.startswith("energy_gpu") and k[10:-2].isdigit()}:
            row["per_gpu_j"][col] = row["per_gpu_j"].get(col, 0.0) + _sum(rec.summary, col)
    for row in out.values():
        lat = row.pop("latency_s")
        row["latency_s_mean"] = sum(lat) / len(lat) if lat else math.nan
        tokens = row["completion_tokens"]
        row["gpu_j_per_token"] = row["energy_gpu_j"] / tokens if tokens else math.nan
        row["j_per_token"] = row["energy_j"] / tokens if tokens else math.nan
        if row["trials"] == 0:
            row["start"] = row["end"] = None
    return list(out.values())


def run_part(name: str, size: dict[str, Any], out: Path, slots: int, knobs: dict[str, list[Any]],
             settings: dict[str, Any], engine: dict[str, Any], rehearse: bool, counters: Counters,
             deadline: float) -> dict[str, Any]:
    """One sweep on a local Ray of ``slots`` GPUs (CPU workers in a rehearsal); wall time, counters, configs."""
    import ray

    path = out / "stores" / name
    shutil.rmtree(path, ignore_errors=True)  # a part's wall time is only valid uninterrupted
    spec = SweepSpec(workloads=["search"], knobs=knobs, repeats=size["repeats"],
                     fixed={"settings": {"model": size["model"], **settings}, "engine": engine})
    connect(None, num_cpus=slots if rehearse else None, num_gpus=None if rehearse else slots)
    try:
        executor = RayExecutor(engine_runner_maker(engine, None, None, None), progress=False)
        before, t0 = counters.read(), time.monotonic()
        outcome = run_sweep(spec, ResultStore(path), EngineTrialRunner(engine), EngineTrialRunner.defaults(),
                            progress=False, deadline=deadline, executor=executor)
        wall, after = time.monotonic() - t0, counters.read()
    finally:
        ray.shutdown()
    configs = _configs(ResultStore(path))
    total = len(spec.knobs[next(iter(spec.knobs))]) * spec.repeats
    return {"part": name, "slots": slots, "wall_s": wall, "ran": outcome.ran, "complete": outcome.ran == total,
            "infeasible": outcome.infeasible, "failed": outcome.failed,
            "counters_j": {k: after[k] - before.get(k, 0.0) for k in after}, "configs": configs}


def table(result: dict[str, Any]) -> str:
    """The README-ready markdown of a run."""
    parts = {p["part"]: p for p in result["parts"]}
    lines = ["| part | slots | wall (s) | GPU counters over the part (J) |", "| --- | --- | --- | --- |"]
    for p in result["parts"]:
        counters = ", ".join(f"{k} {v:.0f}" for k, v in sorted(p["counters_j"].items())) or "n/a (no GPU)"
        lines.append(f"| {p['part']} | {p['slots']} | {p['wall_s']:.1f} | {counters} |")
    if "one-gpu" in parts and "two-gpu" in parts:
        lines += ["", f"Speed-up two GPUs / one GPU: **{result['speedup']:.2f}x** (goal 1.8x)."]
    tp1 = [c for c in parts.get("two-gpu", {}).get("configs", [])
           if c["config"] == f"batch-size={result.get('tp_batch')} tp=1"]
    tp2 = [c for c in parts.get("tensor-parallel", {}).get("configs", []) if c["trials"]]
    if tp1 and tp2:
        a, b = tp1[0], tp2[0]
        lines += ["", f"Tensor-parallel 2 against 1 (batch {result.get('tp_batch')}): GPU J/token "
                  f"{b['gpu_j_per_token']:.4g} vs {a['gpu_j_per_token']:.4g}, mean workflow latency "
                  f"{b['latency_s_mean']:.2f} s vs {a['latency_s_mean']:.2f} s."]
    lines += ["", "| part | configuration | node | GPUs | trials | start-end (s) | GPU J | per-GPU J | GPU J/token | "
              "all J/token | latency (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    t0 = min((c["start"] for p in result["parts"] for c in p["configs"] if c["start"] is not None), default=0.0)
    for p in result["parts"]:
        for c in p["configs"]:
            span = f"{c['start'] - t0:.0f}-{c['end'] - t0:.0f}" if c["start"] is not None else c["status"]
            per = ", ".join(f"{k[7:-2]} {v:.0f}" for k, v in sorted(c["per_gpu_j"].items())) or "-"
            lines.append(f"| {p['part']} | {c['config']} | {c['node']} | {c['gpus']} | {c['trials']} | {span} | "
                         f"{c['energy_gpu_j']:.0f} | {per} | {c['gpu_j_per_token']:.4g} | {c['j_per_token']:.4g} | "
                         f"{c['latency_s_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.gpu_multi", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu_multi.json, table.md and the sweep stores")
    p.add_argument("--rehearse", action="store_true", help="CPU rehearsal: the embedded engine on CPU workers")
    p.add_argument("--budget", type=float, default=450.0, metavar="SECONDS",
                   help="start no engine or trial after this many seconds (default 450: the run ends inside 9 minutes)")
    args = p.parse_args(argv)
    size = SIZES["rehearse" if args.rehearse else "gpu"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "gpu_multi.json"
    result: dict[str, Any] = json.loads(result_path.read_text()) if result_path.exists() else {"parts": []}
    result.update(size=("rehearse" if args.rehearse else "gpu"), model=size["model"], repeats=size["repeats"],
                  tp_batch=size["tp_batch"],
                  settings=size["settings"], command=" ".join(["python -m bench.gpu_multi", *sys.argv[1:]]))
    deadline = time.monotonic() + args.budget
    counters = Counters(args.rehearse)
    engine = {"model": size["model"], **size["engine"]}
    plan = [
        ("one-gpu", 1, {"batch-size": size["batch"]}, size["settings"], engine),
        ("two-gpu", 2, {"batch-size": size["batch"]}, size["settings"], engine),
        ("tensor-parallel", 2, {"tensor-parallel": [2]}, {**size["settings"], "batch_size": size["tp_batch"]},
         {**engine, **size["tp_engine"]}),
    ]
    try:
        for name, slots, knobs, settings, eng in plan:
            if any(p["part"] == name and p["complete"] for p in result["parts"]):
                print(f"{name}: already measured", flush=True)
                continue
            part = run_part(name, size, out, slots, knobs, settings, eng, args.rehearse, counters, deadline)
            result["parts"] = [p for p in result["parts"] if p["part"] != name] + [part]
            print(f"{name}: {part['ran']} trials in {part['wall_s']:.1f} s; counters {part['counters_j']}", flush=True)
            write_json_atomic(result_path, result, indent=1)
    except EnergyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    walls = {p["part"]: p["wall_s"] for p in result["parts"]}
    if "one-gpu" in walls and "two-gpu" in walls:
        result["speedup"] = walls["one-gpu"] / walls["two-gpu"]
    write_json_atomic(result_path, result, indent=1)
    write_text_atomic(out / "table.md", table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
