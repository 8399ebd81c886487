"""Reproduce the study's experiments on one machine: ``python -m chains.study --out DIR``.

Runs, in order, each part into its own resumable results store under DIR:

1. ``search-batch``: search at batch size 1, 2, 4, 8, 16 with 8 users (fixed output lengths).
2. ``search-output``: search at output lengths 200, 400, 800 (batch 8).
3. ``overhead``: the search workload through chains + ServingLLM + EnergyCallbackHandler against the same
   prompts sent straight to the same vLLM server without LangChain: latency and energy ratios.
4. ``workloads-batch``: summarization, agentic and composite at batch 1, 4, 16 with 16 users.
5. ``systems``: summarization on vLLM alone and through Parrot's ServeCore in front of the same vLLM
   (needs ``PARROT_SRC``), across input length, output length and batch size, one knob at a time.
6. ``search-graphs``: search at batch 1 to 16 with CUDA graphs and torch.compile (every other part runs the
   engine eager, so its many restarts skip compilation): how much of the batch-1 cost is kernel-launch overhead.
7. ``scheduling``: many workflows at once under each workflow-scheduling policy against vLLM FCFS (and
   Parrot with ``PARROT_SRC``) on one engine with CUDA graphs: per-workflow completion times and energy
   (`chains.harness.scheduling_study`; not in the default parts: run it with ``--parts scheduling``).

Then it writes ``roofline.json`` (energy per token of the best search configuration against the decode
roofline floor, on a GPU), the figures of each store and ``summary.md``. ``--time-budget`` stops starting
trials after that many seconds, and engines that could not fit one; rerunning the same command resumes.
``--size rehearse`` shrinks every part so the whole script runs on the embedded CPU engine in a few minutes
(a rehearsal before GPU time).

Example:
    python -m chains.study --out results/study --size gpu --time-budget 540
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chains.harness.engine_runner import EngineTrialRunner, zeusd_node
from chains.harness.overhead import overhead_part
from chains.harness.roofline import roofline_part
from chains.harness.store import ResultStore, SweepSpec
from chains.harness.sweep import run_sweep
from chains.harness.tables import shown_columns
from langchain_energy.errors import EnergyError
from langchain_energy.power import PowerCap

SEARCH = {"users": 8, "n_queries": 8, "max_follow_ups": 1, "ignore_eos": True, "preset": "study"}
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        "model": "llama2-7b-shape",
        "engine": {"max_model_len": 4096, "enforce_eager": True},
        "repeats": 2,
        "search-batch": ({"batch-size": [1, 2, 4, 8, 16]}, {**SEARCH, "output_len": 200}),
        "search-output": ({"output-len": [200, 400, 800]}, {**SEARCH, "batch_size": 8}),
        "workloads-batch": ({"batch-size": [1, 4, 16]}, {
            "users": 16, "preset": "study", "ignore_eos": True, "n_docs": 8, "input_len": 1000,
            "max_input_tokens": 2000, "output_len": 96, "review_len": 48, "n_tasks": 2, "rounds": 1,
            "n_queries": 4, "max_follow_ups": 1}),
        "systems": ({"batch-size": [1, 4, 16], "input-len": [500, 2000], "output-len": [64, 256]}, {
            "users": 4, "preset": "study", "ignore_eos": True, "n_docs": 4, "max_input_tokens": 2000,
            "output_len": 128, "input_len": 1000, "batch_size": 16}),
        "search-graphs": ({"batch-size": [1, 2, 4, 8, 16]}, {**SEARCH, "output_len": 200}),
        "overhead_pairs": 4,
    },
    "rehearse": {
        "model": "smollm2-135m",
        "engine": {"max_model_len": 4096},
        "repeats": 2,
        "search-batch": ({"batch-size": [1, 4]}, {**SEARCH, "users": 2, "n_queries": 2, "max_follow_ups": 0,
                                                   "output_len": 16}),
        "search-output": ({"output-len": [8, 16]}, {**SEARCH, "users": 2, "n_queries": 2, "max_follow_ups": 0,
                                                    "batch_size": 4}),
        "workloads-batch": ({"batch-size": [4]}, {
            "users": 2, "ignore_eos": True, "n_docs": 1, "input_len": 256, "max_input_tokens": 512,
            "output_len": 16, "review_len": 16, "n_tasks": 1, "rounds": 1, "n_queries": 1, "max_follow_ups": 0}),
        "systems": ({"batch-size": [4]}, {"users": 1, "ignore_eos": True, "n_docs": 1, "input_len": 256,
                                          "max_input_tokens": 512, "output_len": 16}),
        "search-graphs": ({"batch-size": [4]}, {**SEARCH, "users": 2, "n_queries": 2, "max_follow_ups": 0,
                                                 "output_len": 16}),
        "overhead_pairs": 1,
    },
}
PART_WORKLOADS = {
    "search-batch": ["search"],
    "search-output": ["search"],
    "workloads-batch": ["summarize", "agentic", "composite"],
    "systems": ["summarize"],
    "search-graphs": ["search"],
}
# Engine arguments a part changes from its size's ``engine``.
PART_ENGINE = {"search-graphs": {"enforce_eager": False}}
# Repeats a part uses instead of its size's ``repeats`` (a third repeat where the points are cheap or noisy).
PART_REPEATS = {"search-graphs": 3, "workloads-batch": 3, "systems": 3}
PARTS = ("search-batch", "search-output", "overhead", "workloads-batch", "systems", "search-graphs")
OPT_IN_PARTS = ("scheduling",)  # run only when named in --parts
SEARCH_PARTS = ("search-batch", "search-graphs")  # where the roofline looks for the best configuration



def sweep_part(name: str, size: dict, out: Path, deadline: float | None, ray: str | None = None,
               zeusd: str | None = None) -> str:
    """Run one sweep part into ``out/name`` (on a Ray cluster with ``ray``: an address or "local"; metering the
    engine's GPUs through ``zeusd``, the URL of its node's daemon); returns a one-line account."""
    knobs, settings = size[name]
    across = {"backend": ["vllm", "parrot"]} if name == "systems" and os.environ.get("PARROT_SRC") else {}
    engine = {"model": size["model"], **size["engine"], **PART_ENGINE.get(name, {})}
    repeats = PART_REPEATS.get(name, size["repeats"])
    spec = SweepSpec(workloads=PART_WORKLOADS[name], knobs=knobs, repeats=repeats, across=across,
                     fixed={"settings": {"model": size["model"], **settings}, "engine": engine})
    runner = EngineTrialRunner(engine, zeusd=zeusd)
    executor = None
    if ray is not None:
        from chains.harness.ray_executor import RayExecutor
        from chains.harness.sweep_cli import engine_runner_maker

        executor = RayExecutor(engine_runner_maker(engine, None, None, zeusd), address=None if ray == "local" else ray)
    outcome = run_sweep(spec, ResultStore(out / name), runner, defaults=runner.defaults(),
                        power_cap=PowerCap(dry_run=True), deadline=deadline, executor=executor)
    note = "" if across else " (vLLM only: set PARROT_SRC to add Parrot)" if name == "systems" else ""
    return f"{name}: {outcome.ran} trials run, {outcome.skipped} resumed, {len(outcome.infeasible)} infeasible{note}"


# -- report -----------------------------------------------------------------------------------------------

COLUMNS = ["workload", "knob", "value", "n", "status", "latency_s_mean", "latency_s_ci", "throughput_tok_s_mean",
           "energy_j_mean", "energy_j_ci", "energy_gpu_j_mean", "energy_cpu_j_mean", "energy_per_token_j_mean",
           "energy_per_token_j_ci", "cache_hit_rate_mean", "engine_cache_hit_rate_mean", "power_cap_mode", "provenance"]


def write_summary(out: Path, lines: list[str]) -> Path:
    """summary.md: what ran, then each store's aggregate table, overhead and roofline."""
    from chains.harness.plots import render_all

    text = ["# Study results", "", *[f"- {line}" for line in lines], ""]
    for part in PART_WORKLOADS:
        if not (out / part / "sweep.json").exists():
            continue
        store = ResultStore(out / part)
        agg = store.aggregate()
        cols = shown_columns(agg, COLUMNS + list(store.spec().across))
        text += [f"## {part}", "", agg[cols].to_markdown(index=False, floatfmt=".4g"), ""]
        figures = render_all(out / part)
        text += [f"- {name}: {path}" for name, path in figures.items()] + [""]
    for name in ("overhead.json", "roofline.json"):
        if (out / name).exists():
            text += [f"## {name}", "", "```json", (out / name).read_text(), "```", ""]
    path = out / "summary.md"
    path.write_text("\n".join(text))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m chains.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results directory (resumed when rerun)")
    p.add_argument("--size", choices=tuple(SIZES), default="gpu", help="gpu: 7B-shaped model; rehearse: tiny, CPU")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of: {', '.join(PARTS + OPT_IN_PARTS)}")
    p.add_argument("--scheduling-size", choices=("gpu", "full", "rehearse"), default=None,
                   help="sizes of the scheduling part (default: rehearse with --size rehearse, else gpu)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no trial after this many seconds, nor an engine that cannot fit one; rerun to resume")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run each sweep part's configurations in parallel on a Ray cluster (no address: a local Ray)")
    p.add_argument("--zeusd", default=None, metavar="URL",
                   help="meter the engine's GPUs through the zeusd of its node (e.g. http://127.0.0.1:4938: with "
                   "--ray, each worker's own node)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS) - set(OPT_IN_PARTS))
    if unknown:
        print(f"error: unknown part(s) {unknown}; choose from {', '.join(PARTS + OPT_IN_PARTS)}", file=sys.stderr)
        return 2
    if args.zeusd is not None:
        try:
            zeusd_node(args.zeusd)
        except EnergyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    size, out = SIZES[args.size], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    lines = []
    try:
        for part in parts:
            if deadline is not None and time.monotonic() >= deadline:
                lines.append(f"{part}: not started (time budget spent; rerun to resume)")
                continue
            if part == "scheduling":
                from chains.harness.scheduling_study import scheduling_part

                which = args.scheduling_size or ("rehearse" if args.size == "rehearse" else "gpu")
                line = scheduling_part(which, size["model"], out, deadline)
            elif part == "overhead":
                line = overhead_part(size, out)
            else:
                line = sweep_part(part, size, out, deadline, args.ray, args.zeusd)
            print(line, flush=True)
            lines.append(line)
        lines.append(roofline_part(out, SEARCH_PARTS))
        print(f"wrote {write_summary(out, lines)}")
    except EnergyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
