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
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chains.harness.knobs import KNOBS, add_knob_flags, engine_fields, sampling_fields
from langchain_energy.errors import ConfigError, EnergyError
from langchain_energy.power import POWER_CAP_MODE_HELP, POWER_CAP_MODES, PowerCap

if TYPE_CHECKING:
    from chains.harness.settings import RunSettings

WORKLOAD_HELP = {
    "summarize": "document chain summarization (refine over token chunks, 2-40 sequential calls per document)",
    "search": "LLM-powered search (sessions of 2-8 calls sharing a ~3,000-token system prompt)",
    "agentic": "multi-agent coding (architect, parallel engineers, review/revise rounds; 15-20 calls per task)",
    "composite": "summarization and search at once on one engine, each attributed separately",
}


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments, each knob explained in one line."""
    from chains.harness.settings import WORKLOADS

    p = argparse.ArgumentParser(
        prog="python -m chains.run",
        description="Run a multi-request LLM workload and measure its latency and energy. "
        "Other commands: 'measure' (your own runnable or graph), 'sweep' (knob sweeps), 'tune' (search the knobs for "
        "the least energy under a latency SLO) and 'plot' (figures); "
        "see 'python -m chains.run measure --help'.",
        epilog="Workloads: " + "; ".join(f"{k}: {v}" for k, v in WORKLOAD_HELP.items()),
    )
    p.add_argument("workload", choices=WORKLOADS, metavar="workload", help="one of: " + ", ".join(WORKLOADS))
    k = p.add_argument_group("knobs (each also sweepable: python -m chains.run sweep --knob NAME=V1,V2)")
    add_knob_flags(k, KNOBS.values())
    k.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_const", const="off",
                   help="the same as --prefix-caching off")
    g = p.add_argument_group("serving")
    g.add_argument("--model", default="smollm2-135m",
                   help="model: smollm2-135m (embedded), llama2-7b-shape (dummy weights, GPU), a directory or hub name")
    g.add_argument("--base-url", default=None, help="use this running server instead of starting one (vLLM: ends in /v1)")
    g.add_argument("--api-key-env", default=None, metavar="NAME",
                   help="environment variable holding the --base-url server's API key (default: OPENAI_API_KEY)")
    g.add_argument("--max-model-len", type=int, default=None, help="engine context window in tokens (default: the model's)")
    g.add_argument("--zeusd", default=None, metavar="URL",
                   help="meter the engine's GPUs through the zeusd on its node (http://host:4938), for a --base-url "
                        "server on another machine; this machine's counters otherwise")
    g.add_argument("--power-cap-mode", choices=POWER_CAP_MODES, default="dry-run", help=POWER_CAP_MODE_HELP)
    g.add_argument("--apply-power-cap", dest="power_cap_mode", action="store_const", const="apply",
                   help="the same as --power-cap-mode apply")
    w = p.add_argument_group("workload size")
    w.add_argument("--preset", choices=("cpu", "study"), default="cpu",
                   help="defaults for unset knobs: cpu (a minute or two on 2 cores) or study (full sizes, for GPUs)")
    w.add_argument("--max-input-tokens", type=int, default=None, help="cap on tokens read from each document")
    w.add_argument("--review-len", type=int, default=None, help="max tokens of the architect and reviewer (agentic)")
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
    o.add_argument("--idle-power", default=None, metavar="WATTS|measure|model",
                   help="idle baseline for active energy: watts, 'measure' (2 s now) or 'model' (the estimate's)")
    o.add_argument("--out", default=None, help="output directory (default results/<workload>-<time>)")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The `RunSettings` of parsed arguments (validated); each knob typed by the registry.

    Raises:
        ConfigError: a value a knob or a setting refuses, or a backend without the URL it needs.
    """
    from chains.harness.settings import RunSettings, validate

    idle: Any = args.idle_power
    if idle is not None and idle not in ("measure", "model"):
        try:
            idle = float(idle)
        except ValueError:
            raise ConfigError(f"--idle-power must be watts, 'measure' or 'model', got {idle!r}") from None
    # Unset knobs keep RunSettings' defaults (or the preset's, where those are None).
    knobs = {k.field: k.coerce(getattr(args, k.field)) for k in KNOBS.values() if getattr(args, k.field) is not None}
    settings = RunSettings(
        workload=args.workload, model=args.model, base_url=args.base_url, max_input_tokens=args.max_input_tokens,
        review_len=args.review_len, seed=args.seed, preset=args.preset, docs=args.docs, dataset=args.dataset,
        dataset_split=args.dataset_split, dataset_field=args.dataset_field, n_docs=args.n_docs,
        n_queries=args.n_queries, n_tasks=args.n_tasks, max_follow_ups=args.max_follow_ups,
        tasks=tuple(args.task) if args.task else None, rounds=args.rounds, max_model_len=args.max_model_len,
        idle_power_w=idle, **knobs,
    )
    validate(settings)
    if settings.backend in ("openai", "parrot") and not settings.base_url:
        raise ConfigError(f"backend {settings.backend!r} needs --base-url (the server's address)")
    if settings.scheduling not in (None, "fcfs") and settings.base_url:
        # A URL server's batch size (the gate's width) and scheduling policy cannot be known from here.
        raise ConfigError("--scheduling needs the managed engine (its batch size and priority scheduling are set "
                          "here); drop --base-url")
    if not isinstance(args.repeats, int) or args.repeats < 1:
        raise ConfigError(f"--repeats must be a positive integer, got {args.repeats!r}")
    return settings


def _tokenizer_and_context(settings) -> tuple[Any, int]:
    """Token counter and context length of the served model, without starting an engine."""
    from chains.workloads.summarize import hf_token_counter
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


def _engine_context(settings, log_dir: Path):
    """The managed engine for a run (None when --base-url or Parrot)."""
    if settings.base_url or settings.backend != "vllm":
        return None
    from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer

    config = EngineConfig(model=settings.model, max_model_len=settings.max_model_len, seed=settings.seed or 0,
                          **engine_fields(settings.to_dict()))
    return VLLMServer(config, log_dir=log_dir)


def _make_llm(settings, server, api_key: Any = None):
    """The trial's model: the chat model (the workloads are chat-style), on vLLM or Parrot."""
    from langchain_energy.chat_models import ChatServing

    common = {"max_tokens": 256, "seed": settings.seed, **sampling_fields(settings.to_dict())}
    if settings.backend == "parrot":
        return ChatServing(backend="parrot", base_url=settings.base_url, model=settings.model, **common)
    if api_key is not None:
        common["api_key"] = api_key
    if server is not None:
        return ChatServing.from_server(server, **common)
    return ChatServing(backend="openai", base_url=settings.base_url, model=settings.model, **common)


def api_key_from_env(name: str | None) -> Any:
    """The server's API key from the environment variable ``name`` (a `SecretStr`); None: the model's default
    (``OPENAI_API_KEY``). Never from the command line, where it would land in shell history and metadata.

    Raises:
        ConfigError: the variable is not set.
    """
    import os

    from pydantic import SecretStr

    if name is None:
        return None
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"--api-key-env {name}: that environment variable is not set (or empty)")
    return SecretStr(value)


def run_command(args: argparse.Namespace) -> int:
    """Validate, prepare inputs, start the engine, run the trials, write the results."""
    from chains.harness.session import output_dir, print_session, run_session, write_session
    from chains.harness.inputs import describe_inputs, prepare_inputs
    from chains.harness.engine_runner import zeusd_meter
    from chains.harness.trial import run_trial
    from langchain_energy.callbacks import EnergyCallbackHandler

    settings = settings_from_args(args)
    # Everything that can fail on bad input happens here, before any engine starts.
    power_cap = PowerCap.for_mode(args.power_cap_mode)
    power_cap.preflight([settings.power_cap_w] if settings.power_cap_w is not None else [])
    api_key = api_key_from_env(args.api_key_env)
    meter = zeusd_meter(args.zeusd) if args.zeusd else None   # None: this machine's own counters
    count_tokens, context = _tokenizer_and_context(settings)
    inputs = prepare_inputs(settings, count_tokens, context)
    out = output_dir(args.out, settings.workload)
    calls = inputs.expected_calls(settings)
    print(f"{settings.workload}: {describe_inputs(inputs)}; {calls} LLM calls per trial", file=sys.stderr)


    def trial(llm: Any, repeat: int, progress: Any) -> Any:
        if meter is None:
            return run_trial(settings, llm, inputs=inputs, callbacks=[progress], extra_meta={"repeat": repeat})
        with EnergyCallbackHandler(meter=meter, idle_power_w=settings.idle_power_w) as handler:
            return run_trial(settings, llm, inputs=inputs, handler=handler, callbacks=[progress],
                             extra_meta={"repeat": repeat})

    server = _engine_context(settings, out)
    session = run_session(trial, lambda srv: _make_llm(settings, srv, api_key), server=server, power_cap=power_cap,
                          power_cap_w=settings.power_cap_w, repeats=args.repeats, expected_calls=calls,
                          show_progress=not args.no_progress)
    write_session(out, session, {
        "command": "chains.run",
        "workload": settings.workload,
        "settings": settings.to_dict(),
        "repeats": args.repeats,
        "engine": session.engine or {"base_url": settings.base_url, "backend": settings.backend},
        "engine_log": str(server.log_path) if server is not None and server.log_path else None,
    })
    print_session(out, session)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, 130 on Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("sweep", "tune", "plot", "measure"):
        # Imported lazily: each command's module pulls in only what it needs.
        if argv[0] == "sweep":
            from chains.harness.sweep_cli import main as sub_main
        elif argv[0] == "tune":
            from chains.harness.tune_cli import main as sub_main
        elif argv[0] == "measure":
            from chains.harness.measure import main as sub_main
        else:
            from chains.harness.plot_cli import main as sub_main
        return int(sub_main(argv[1:]) or 0)
    parser = build_parser()
    return run_guarded(run_command, parser.parse_args(argv))


def run_guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand: bad input is one line on stderr and exit 2, Ctrl-C exit 130, never a traceback."""
    try:
        return command(args)
    except EnergyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
