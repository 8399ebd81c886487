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
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from chains.harness.engine_runner import EngineTrialRunner
from chains.harness.knobs import engine_fields
from chains.harness.store import ResultStore, SweepSpec, write_json_atomic
from chains.harness.sweep import run_sweep
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
SEARCH_PARTS = ("search-batch", "search-graphs")  # where the roofline looks for the best configuration

# Decode roofline: every step reads all weights once; memory bandwidth bounds the step time.
LLAMA2_7B_SHAPE_PARAMS = 2 * 49152 * 4096 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096


def sweep_part(name: str, size: dict, out: Path, deadline: float | None) -> str:
    """Run one sweep part into ``out/name``; returns a one-line account."""
    knobs, settings = size[name]
    across = {"backend": ["vllm", "parrot"]} if name == "systems" and os.environ.get("PARROT_SRC") else {}
    engine = {"model": size["model"], **size["engine"], **PART_ENGINE.get(name, {})}
    repeats = PART_REPEATS.get(name, size["repeats"])
    spec = SweepSpec(workloads=PART_WORKLOADS[name], knobs=knobs, repeats=repeats, across=across,
                     fixed={"settings": {"model": size["model"], **settings}, "engine": engine})
    runner = EngineTrialRunner(engine)
    outcome = run_sweep(spec, ResultStore(out / name), runner, defaults=runner.defaults(),
                        power_cap=PowerCap(dry_run=True), deadline=deadline)
    note = "" if across else " (vLLM only: set PARROT_SRC to add Parrot)" if name == "systems" else ""
    return f"{name}: {outcome.ran} trials run, {outcome.skipped} resumed, {len(outcome.infeasible)} infeasible{note}"


# -- overhead: the package's path against raw HTTP on the same server ---------------------------------------

class _PromptRecorder:
    """Collects each LLM call's prompt and start order."""

    def __init__(self) -> None:
        from langchain_core.callbacks import BaseCallbackHandler

        calls = self.calls = []

        class Recorder(BaseCallbackHandler):
            def on_llm_start(self, serialized, prompts, *, run_id, parent_run_id=None, **kwargs):
                calls.append({"run_id": str(run_id), "prompt": prompts[0], "t": time.monotonic()})

        self.handler = Recorder()


def _sessions(calls: list[dict], runs: pd.DataFrame) -> list[list[dict]]:
    """Group recorded calls by session (the workflow's direct child), each in call order.

    Each call's token cap is the number of tokens it generated: the replay runs with ``ignore_eos``, as the
    measured trial does, so both generate the same tokens.
    """
    parent = dict(zip(runs["run_id"].astype(str), runs["parent_run_id"].astype(str)))
    root = dict(zip(runs["run_id"].astype(str), runs["root_run_id"].astype(str)))
    generated = dict(zip(runs["run_id"].astype(str), runs["completion_tokens"]))
    groups: dict[str, list[dict]] = {}
    for call in calls:
        call["max_tokens"] = int(generated[call["run_id"]])
        node = call["run_id"]
        while parent.get(node) not in (None, "None", "nan", root.get(node)):
            node = parent[node]
        groups.setdefault(node, []).append(call)
    return [sorted(g, key=lambda c: c["t"]) for g in groups.values()]


async def _replay(sessions: list[list[dict]], base_url: str, model: str, seed: int) -> int:
    """Send the same requests straight to the server, sessions concurrently, calls in order."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        async def session(calls: list[dict]) -> int:
            tokens = 0
            for call in calls:
                body = {"model": model, "messages": [{"role": "user", "content": call["prompt"]}],
                        "max_tokens": call["max_tokens"], "temperature": 0.7, "top_p": 1.0, "ignore_eos": True,
                        "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
                async with client.stream("POST", base_url + "/chat/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if '"usage"' in line and '"completion_tokens"' in line:
                            tokens += json.loads(line[5:])["usage"]["completion_tokens"]
            return tokens

        return sum(await asyncio.gather(*(session(s) for s in sessions)))


def overhead_part(size: dict, out: Path) -> str:
    """Search through the package vs. raw HTTP, alternating, on one engine; writes overhead.json."""
    from chains.harness.trial import RunSettings, prepare_inputs, run_trial
    from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer
    from langchain_energy.callbacks import EnergyCallbackHandler
    from langchain_energy.llms import ServingLLM
    from langchain_energy.timeline import shared_timeline

    target = out / "overhead.json"
    if target.exists():
        return "overhead: already measured"
    _, settings = size["search-batch"]
    fields = {k: v for k, v in settings.items() if k in RunSettings.__dataclass_fields__}
    run_settings = RunSettings(workload="search", model=size["model"], **{"batch_size": 8, **fields})
    config = EngineConfig(model=size["model"], **{**size["engine"], **engine_fields(run_settings.to_dict())})
    timeline = shared_timeline()
    timeline.acquire()
    pairs = []
    try:
        with VLLMServer(config) as server:
            llm = ServingLLM.from_server(server)
            inputs = prepare_inputs(run_settings, llm.get_num_tokens)  # loading the queries is not per-call work
            # One unrecorded trial: warms the engine and records the prompts the raw path replays.
            recorder = _PromptRecorder()
            result = run_trial(run_settings, llm, inputs=inputs, callbacks=[recorder.handler])
            sessions = _sessions(recorder.calls, result.runs)

            def chain() -> int:
                handler = EnergyCallbackHandler()
                with handler:
                    trial = run_trial(run_settings, llm, inputs=inputs, handler=handler)
                return int(trial.summary["completion_tokens"].sum())

            def raw() -> int:
                return asyncio.run(_replay(sessions, server.base_url, server.served_model_name,
                                           run_settings.seed or 0))

            for pair in range(size["overhead_pairs"]):
                row = {"pair": pair, "calls": len(recorder.calls), "sessions": len(sessions)}
                # Alternate which path goes first, so drift in the engine or the GPU's clocks hits both alike.
                for name, path in ((("chain", chain), ("raw", raw)) if pair % 2 == 0 else (("raw", raw), ("chain", chain))):
                    server.reset_prefix_cache()
                    t0 = timeline.clock()
                    row[f"{name}_completion_tokens"] = path()
                    t1 = timeline.clock()
                    time.sleep(0.3)  # let the sampler pass t1 before reading the window
                    row[f"{name}_latency_s"] = t1 - t0
                    row[f"{name}_energy_j"] = sum(v for v in timeline.energy_between(t0, t1).values() if v == v)
                pairs.append(row)
    finally:
        timeline.release()
    latency = [p["chain_latency_s"] / p["raw_latency_s"] for p in pairs]
    energy = [p["chain_energy_j"] / p["raw_energy_j"] for p in pairs if p["raw_energy_j"]]
    report = {"pairs": pairs, "latency_ratio_median": statistics.median(latency),
              "energy_ratio_median": statistics.median(energy) if energy else None,
              "meter": timeline.meter.describe() if hasattr(timeline.meter, "describe") else None, "target": 1.05}
    write_json_atomic(target, report, indent=2, default=str, sort_keys=False)
    return (f"overhead: latency ratio {report['latency_ratio_median']:.3f}, energy ratio "
            f"{report['energy_ratio_median'] if energy else float('nan'):.3f} (median of {len(pairs)} pairs)")


# -- roofline ---------------------------------------------------------------------------------------------

def gpu_facts() -> dict[str, Any] | None:
    """Name, memory bandwidth (bytes/s) and power limit (W) of GPU 0, read through NVML; None without one."""
    try:
        import pynvml as nvml

        nvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML, no GPU
        return None
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    mem_clock_hz = nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM) * 1e6
    bus_bits = nvml.nvmlDeviceGetMemoryBusWidth(handle)
    name = nvml.nvmlDeviceGetName(handle)
    return {"name": name.decode() if isinstance(name, bytes) else name,
            "bandwidth_bytes_s": mem_clock_hz * 2 * bus_bits / 8,  # double data rate
            "power_limit_w": nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000}


def roofline(trials: pd.DataFrame, runs: pd.DataFrame, facts: dict[str, Any]) -> dict[str, Any] | None:
    """GPU energy per token of a search store's best configuration against the decode roofline floor.

    The floor is the energy of one decode step at the roofline (the fp16 weights streamed from memory once,
    at the board's power limit) shared by the sequences actually in flight.

    Args:
        trials: the store's trial rows (``ResultStore.load_trials``).
        runs: the store's per-call rows (``ResultStore.load_runs``).
        facts: ``bandwidth_bytes_s`` and ``power_limit_w`` of the GPU (see `gpu_facts`).

    Returns:
        The report, or None when no trial finished.
    """
    ok = trials[(trials["status"] == "ok") & (trials["completion_tokens"] > 0)]
    if ok.empty:
        return None
    per_token = ok.assign(gpu_j_per_token=ok["energy_gpu_j"] / ok["completion_tokens"])
    per_config = per_token.groupby(["knob", "value"])["gpu_j_per_token"].agg(["mean", "std", "count"])
    knob, value = per_config["mean"].idxmin()
    value = value.item() if hasattr(value, "item") else value  # a numpy scalar would be written as text
    best = per_config.loc[(knob, value)]
    llm = runs[(runs["kind"] == "llm") & (runs["knob"] == knob) & (runs["value"] == value)]
    # Mean sequences in flight: the decode batch actually realised (call-seconds over wall seconds).
    in_flight = llm.groupby("key").apply(
        lambda r: (r["t_end"] - r["t_start"]).sum() / (r["t_end"].max() - r["t_start"].min()), include_groups=False)
    batch = float(in_flight.mean())
    step_s = LLAMA2_7B_SHAPE_PARAMS * 2 / facts["bandwidth_bytes_s"]  # fp16 weights read once per step
    floor = step_s * facts["power_limit_w"] / batch
    return {"best_config": {"knob": knob, "value": value}, "gpu_energy_per_token_j": float(best["mean"]),
            "gpu_energy_per_token_sd_j": float(best["std"]), "repeats": int(best["count"]),
            "mean_sequences_in_flight": batch, "weight_bytes": LLAMA2_7B_SHAPE_PARAMS * 2, "roofline_step_s": step_s,
            "floor_j_per_token": floor, "ratio": float(best["mean"]) / floor, "target": 2.0}


def roofline_part(out: Path) -> str:
    """The roofline report of each search store, and the best of them; writes roofline.json."""
    facts = gpu_facts()
    if facts is None:
        return "roofline: no GPU, skipped"
    reports = {}
    for part in SEARCH_PARTS:
        if (out / part / "sweep.json").exists():
            store = ResultStore(out / part)
            report = roofline(store.load_trials(), store.load_runs(), facts)
            if report is not None:
                reports[part] = report
    if not reports:
        return "roofline: no finished search trial here, skipped"
    best_part = min(reports, key=lambda part: reports[part]["gpu_energy_per_token_j"])
    best = reports[best_part]
    write_json_atomic(out / "roofline.json", {"gpu": facts, "best": best_part, **reports}, indent=2, default=str,
                      sort_keys=False)
    return (f"roofline: best {best_part} {best['best_config']['knob']}={best['best_config']['value']} "
            f"{best['gpu_energy_per_token_j']:.3f} GPU J/token, floor {best['floor_j_per_token']:.3f} J/token at "
            f"{best['mean_sequences_in_flight']:.1f} sequences in flight, ratio {best['ratio']:.2f}")


# -- report -----------------------------------------------------------------------------------------------

COLUMNS = ["workload", "knob", "value", "n", "status", "latency_s_mean", "latency_s_ci", "throughput_tok_s_mean",
           "energy_j_mean", "energy_j_ci", "energy_gpu_j_mean", "energy_cpu_j_mean", "energy_per_token_j_mean",
           "energy_per_token_j_ci", "cache_hit_rate_mean", "engine_cache_hit_rate_mean", "provenance"]


def write_summary(out: Path, lines: list[str]) -> Path:
    """summary.md: what ran, then each store's aggregate table, overhead and roofline."""
    from chains.harness.plots import render_all

    text = ["# Study results", "", *[f"- {line}" for line in lines], ""]
    for part in PART_WORKLOADS:
        if not (out / part / "sweep.json").exists():
            continue
        store = ResultStore(out / part)
        agg = store.aggregate()
        cols = [c for c in COLUMNS + list(store.spec().across) if c in agg.columns]
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
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of: {', '.join(PARTS)}")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no trial after this many seconds, nor an engine that cannot fit one; rerun to resume")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"error: unknown part(s) {unknown}; choose from {', '.join(PARTS)}", file=sys.stderr)
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
            line = overhead_part(size, out) if part == "overhead" else sweep_part(part, size, out, deadline)
            print(line, flush=True)
            lines.append(line)
        lines.append(roofline_part(out))
        print(f"wrote {write_summary(out, lines)}")
    except EnergyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
