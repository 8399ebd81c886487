"""Measure a multi-request LLM workload: ``python -m chains.run {summarize,search,agentic,composite}``.

Starts the embedded vLLM engine (or uses --base-url), runs the workload --repeats times with an energy
handler attached, prints a summary table and writes ``runs.csv``, ``summary.csv`` and
``metadata.json`` into --out. ``python -m chains.run sweep ...`` and ``python -m chains.run plot ...``
run the knob sweeps and the figures.

Example:
    python -m chains.run search --users 4 --output-len 48 --out results/search
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_energy.errors import EnergyError

WORKLOAD_HELP = {
    "summarize": "document chain summarization (refine over token chunks, 2-40 sequential calls per document)",
    "search": "LLM-powered search (sessions of 2-8 calls sharing a ~3,000-token system prompt)",
    "agentic": "multi-agent coding (architect, parallel engineers, review/revise rounds; 15-20 calls per task)",
    "composite": "summarization and search at once on one engine, each attributed separately",
}


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments, each knob explained in one line."""
    from chains.runner import WORKLOADS

    p = argparse.ArgumentParser(
        prog="python -m chains.run",
        description="Run a multi-request LLM workload and measure its latency and energy. "
        "Other commands: 'sweep' (knob sweeps) and 'plot' (figures); see 'python -m chains.run sweep --help'.",
        epilog="Workloads: " + "; ".join(f"{k}: {v}" for k, v in WORKLOAD_HELP.items()),
    )
    p.add_argument("workload", choices=WORKLOADS, metavar="workload", help="one of: " + ", ".join(WORKLOADS))
    g = p.add_argument_group("serving")
    g.add_argument("--backend", choices=("vllm", "openai", "parrot"), default="vllm",
                   help="vllm: the embedded/managed engine (or --base-url); openai: any vLLM URL; parrot: ServeCore")
    g.add_argument("--model", default="smollm2-135m",
                   help="model: smollm2-135m (embedded), llama2-7b-shape (dummy weights, GPU), a directory or hub name")
    g.add_argument("--base-url", default=None, help="use this running server instead of starting one (vLLM: ends in /v1)")
    g.add_argument("--batch-size", type=int, default=8, help="engine batch size, vLLM max_num_seqs (default 8)")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn the engine's prefix cache off")
    g.add_argument("--max-model-len", type=int, default=None, help="engine context window in tokens (default: the model's)")
    g.add_argument("--power-cap", type=float, default=None, metavar="WATTS",
                   help="GPU power cap in watts; recorded only (dry run) unless --apply-power-cap")
    g.add_argument("--apply-power-cap", action="store_true", help="really set the power cap (needs root); restored at exit")
    w = p.add_argument_group("workload size")
    w.add_argument("--preset", choices=("cpu", "study"), default="cpu",
                   help="defaults for unset knobs: cpu (a minute or two on 2 cores) or study (full sizes, for GPUs)")
    w.add_argument("--input-len", type=int, default=None, help="summarization chunk size in tokens (study: 500-2000)")
    w.add_argument("--max-input-tokens", type=int, default=None, help="cap on tokens read from each document")
    w.add_argument("--output-len", type=int, default=None, help="max tokens per answer (summary, search answer, code)")
    w.add_argument("--review-len", type=int, default=None, help="max tokens of the architect and reviewer (agentic)")
    w.add_argument("--fixed-output", action="store_true", help="ignore end-of-sequence: every call generates --output-len tokens")
    w.add_argument("--users", type=int, default=None, help="concurrent users: documents, sessions or tasks in flight")
    w.add_argument("--docs", default=None, metavar="PATH", help="summarize these documents (.txt, .md, .pdf file or directory)")
    w.add_argument("--dataset", default=None, help="summarize a Hugging Face dataset (hub name or save_to_disk directory)")
    w.add_argument("--dataset-split", default="test", help="dataset split (default test)")
    w.add_argument("--dataset-field", default=None, help="dataset text column (default: article, text, document, ...)")
    w.add_argument("--n-docs", type=int, default=None, help="number of documents to summarize")
    w.add_argument("--n-queries", type=int, default=None, help="number of search sessions (of 64 bundled queries)")
    w.add_argument("--max-follow-ups", type=int, default=None, help="cap on follow-up questions per search session")
    w.add_argument("--n-tasks", type=int, default=None, help="number of coding tasks (agentic)")
    w.add_argument("--task", action="append", default=None, help="coding task: snake, todo, calculator, weather or a brief")
    w.add_argument("--rounds", type=int, default=None, help="review/revise rounds per module (agentic)")
    o = p.add_argument_group("run")
    o.add_argument("--repeats", type=int, default=1, help="trials to run (prefix cache reset between them)")
    o.add_argument("--seed", type=int, default=0, help="sampling and engine seed (default 0)")
    o.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    o.add_argument("--idle-power", default=None, metavar="WATTS|measure|model",
                   help="idle baseline for active energy: watts, 'measure' (2 s now) or 'model' (the estimate's)")
    o.add_argument("--out", default=None, help="output directory (default results/<workload>-<time>)")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def settings_from_args(args: argparse.Namespace):
    """The `RunSettings` of parsed arguments (validated)."""
    from chains.runner import RunSettings, validate

    idle: Any = args.idle_power
    if idle is not None and idle not in ("measure", "model"):
        try:
            idle = float(idle)
        except ValueError:
            from langchain_energy.errors import ConfigError

            raise ConfigError(f"--idle-power must be watts, 'measure' or 'model', got {idle!r}") from None
    settings = RunSettings(
        workload=args.workload, backend=args.backend, model=args.model, base_url=args.base_url,
        input_len=args.input_len, max_input_tokens=args.max_input_tokens, output_len=args.output_len,
        review_len=args.review_len, batch_size=args.batch_size, users=args.users, power_cap_w=args.power_cap,
        apply_power_cap=args.apply_power_cap, seed=args.seed, preset=args.preset, docs=args.docs,
        dataset=args.dataset, dataset_split=args.dataset_split, dataset_field=args.dataset_field,
        n_docs=args.n_docs, n_queries=args.n_queries, n_tasks=args.n_tasks, max_follow_ups=args.max_follow_ups,
        tasks=tuple(args.task) if args.task else None, rounds=args.rounds, prefix_caching=not args.no_prefix_caching,
        ignore_eos=args.fixed_output, temperature=args.temperature, max_model_len=args.max_model_len, idle_power_w=idle,
    )
    validate(settings)
    if settings.backend in ("openai", "parrot") and not settings.base_url:
        from langchain_energy.errors import ConfigError

        raise ConfigError(f"backend {settings.backend!r} needs --base-url (the server's address)")
    if not isinstance(args.repeats, int) or args.repeats < 1:
        from langchain_energy.errors import ConfigError

        raise ConfigError(f"--repeats must be a positive integer, got {args.repeats!r}")
    return settings


def _tokenizer_and_context(settings) -> tuple[Any, int]:
    """Token counter and context length of the served model, without starting an engine."""
    from chains.summarize import hf_token_counter
    from langchain_energy.models import load_tokenizer, resolve_model

    spec = resolve_model(settings.model)
    path = spec.path
    if spec.max_model_len == 0 and not Path(path).is_dir():
        from langchain_energy.errors import ModelNotFoundError

        raise ModelNotFoundError(f"cannot count tokens for hub model {settings.model!r} offline; pass a local directory")
    context = spec.max_model_len
    if settings.max_model_len:
        context = min(context, settings.max_model_len) if context else settings.max_model_len
    return hf_token_counter(load_tokenizer(path)), context


SUMMARY_COLUMNS = [
    ("workflow", "workflow"), ("repeat", "rep"), ("llm_calls", "calls"), ("latency_s", "latency_s"),
    ("throughput_tok_s", "tok/s"), ("energy_j", "energy_J"), ("energy_cpu_j", "cpu_J"), ("energy_gpu_j", "gpu_J"),
    ("energy_dram_j", "dram_J"), ("energy_per_token_j", "J/token"), ("cache_hit_rate", "cache_hit"),
]


def format_summary(summary) -> str:
    """The summary table the CLI prints, plus the provenance line(s)."""
    cols = [(c, h) for c, h in SUMMARY_COLUMNS if c in summary.columns]
    table = summary[[c for c, _ in cols]].rename(columns=dict(cols))
    text = table.to_string(index=False, float_format=lambda x: "nan" if math.isnan(x) else f"{x:.4g}")
    provs = sorted(set(summary["provenance"])) if "provenance" in summary.columns else []
    return text + "".join(f"\nprovenance: {p}" for p in provs)


def _engine_context(settings, log_dir: Path):
    """The managed engine for a run (None when --base-url or Parrot)."""
    if settings.base_url or settings.backend != "vllm":
        return None
    from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer

    config = EngineConfig(model=settings.model, max_num_seqs=settings.batch_size,
                          enable_prefix_caching=settings.prefix_caching, max_model_len=settings.max_model_len,
                          seed=settings.seed or 0)
    return VLLMServer(config, log_dir=log_dir)


def _make_llm(settings, server):
    from langchain_energy.llms import ServingLLM

    common = {"max_tokens": 256, "seed": settings.seed, "temperature": settings.temperature,
              "ignore_eos": settings.ignore_eos}
    if server is not None:
        return ServingLLM.from_server(server, **common)
    backend = "openai" if settings.backend == "vllm" else settings.backend
    return ServingLLM(backend=backend, base_url=settings.base_url, model=settings.model, **common)


def run_command(args: argparse.Namespace) -> int:
    """Validate, prepare inputs, start the engine, run the trials, write the results."""
    import pandas as pd

    from chains import metadata
    from chains.progress import CallProgress
    from chains.runner import describe_inputs, prepare_inputs, run_trial

    settings = settings_from_args(args)
    # Everything that can fail on bad input happens here, before any engine starts.
    count_tokens, context = _tokenizer_and_context(settings)
    inputs = prepare_inputs(settings, count_tokens, context)
    out = Path(args.out or f"results/{settings.workload}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"{settings.workload}: {describe_inputs(inputs)}; {inputs.expected_calls(settings)} LLM calls per trial",
          file=sys.stderr)

    from langchain_energy.knobs import PowerCap

    all_runs, all_summaries, trials = [], [], []
    server = _engine_context(settings, out)
    with PowerCap(dry_run=not settings.apply_power_cap) as cap:
        if settings.power_cap_w is not None:
            cap.set(settings.power_cap_w)
        try:
            if server is not None:
                print("starting the engine ...", file=sys.stderr)
                server.start()
            llm = _make_llm(settings, server)
            for repeat in range(args.repeats):
                if server is not None and repeat:
                    server.reset_prefix_cache()  # independent trials: no cache carried over
                before = server.metrics() if server is not None else None
                progress = CallProgress(total=inputs.expected_calls(settings), desc=f"trial {repeat + 1}/{args.repeats}",
                                        disable=args.no_progress)
                try:
                    result = run_trial(settings, llm, inputs=inputs, callbacks=[progress], extra_meta={"repeat": repeat})
                finally:
                    progress.close()
                if server is not None:
                    result.meta["engine_metrics"] = (server.metrics() - before).to_dict()
                all_runs.append(result.runs.assign(repeat=repeat))
                all_summaries.append(result.summary.assign(repeat=repeat))
                trials.append(result.meta)
        finally:
            if server is not None:
                server.stop()
        power = {"requested_w": settings.power_cap_w, "mode": "applied" if settings.apply_power_cap else "dry-run",
                 "events": [vars(e) for e in cap.events]}

    runs = pd.concat(all_runs, ignore_index=True)
    summary = pd.concat(all_summaries, ignore_index=True)
    runs.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    meta = {
        "command": "chains.run",
        "workload": settings.workload,
        "settings": settings.to_dict(),
        "repeats": args.repeats,
        "versions": metadata.versions(),
        "hardware": metadata.hardware(),
        "engine": server.config.to_dict() if server is not None else {"base_url": settings.base_url,
                                                                        "backend": settings.backend},
        "engine_log": str(server.log_path) if server is not None and server.log_path else None,
        "power_cap": power,
        "provenance": sorted(set(summary["provenance"])) if "provenance" in summary.columns else [],
        "trials": trials,
        "files": {"runs": "runs.csv", "summary": "summary.csv"},
    }
    (out / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    print(format_summary(summary))
    print(f"wrote {out / 'runs.csv'}, {out / 'summary.csv'}, {out / 'metadata.json'}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, 130 on Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("sweep", "plot"):
        # Imported lazily: each command's module pulls in only what it needs.
        if argv[0] == "sweep":
            from chains.sweep import main as sub_main
        else:
            from chains.plots_cli import main as sub_main
        return int(sub_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except EnergyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
