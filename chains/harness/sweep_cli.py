"""``python -m chains.run sweep``: knob sweeps from the command line into a resumable results store.

``python -m chains.run sweep --workload search --knob batch-size=1,2,4,8,16 --repeats 10 --out DIR``

Each ``--knob`` is swept one at a time with the other knobs at their defaults; ``--across`` crosses a knob
with every swept configuration (``--across backend=vllm,parrot``). Rerunning the same command resumes.
``--ray [ADDRESS]`` runs the configurations side by side on a Ray cluster (`chains.harness.ray_executor`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from chains.harness.engine_runner import EngineTrialRunner
from chains.harness.knobs import KNOB_FIELDS, KNOBS, knob, parse_knob
from chains.harness.store import ResultStore, SweepSpec
from chains.harness.sweep import TrialRunner, run_sweep
from chains.harness.target import locate_target
from chains.harness.user_inputs import load_inputs
from langchain_energy.errors import ConfigError, EnergyError
from langchain_energy.power import POWER_CAP_MODE_HELP, POWER_CAP_MODES, PowerCap


def _split_multi(values: Iterable[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _parse_fixed(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, values = parse_knob(item)
        if len(values) != 1:
            raise ConfigError(f"--set {item!r} must give exactly one value")
        out[knob(name).field] = values[0]
    return out


def _parse_engine_args(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--engine-arg {item!r} is malformed; write FIELD=VALUE (e.g. cpu_kvcache_gib=2)")
        value: Any = text.strip()
        for cast in (int, float):
            try:
                value = cast(text)
                break
            except ValueError:
                continue
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        out[name.strip()] = value
    return out


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments that ``sweep`` and ``tune`` share: what runs, what is held fixed, and where results go."""
    p.add_argument("--workload", action="append", required=True,
                   help="workload(s) to sweep; repeat the flag or give a comma list. With --inputs, also your own "
                   "target: pkg.module:graph, ./file.py:graph or a langgraph.json graph name")
    p.add_argument("--inputs", default=None, help="inputs of your own target: JSONL (one JSON value a line) or .csv")
    p.add_argument("--column", default=None, help="the CSV column that holds the inputs")
    p.add_argument("--config", default=None, help="the langgraph.json for graph names (default: ./langgraph.json)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=V", dest="fixed",
                   help="hold a knob at one value for the whole sweep (e.g. output-len=32)")
    p.add_argument("--setting", action="append", default=[], metavar="FIELD=V",
                   help="a run-settings field held fixed (e.g. n_queries=2, preset=cpu)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="FIELD=V",
                   help="EngineConfig field held fixed (e.g. max_model_len=4096, cpu_kvcache_gib=2)")
    p.add_argument("--repeats", type=int, default=10, help="trials per configuration (default 10)")
    p.add_argument("--out", required=True, help="results directory (resumed when it holds this same sweep)")
    p.add_argument("--model", default=None,
                   help="model name or directory, served and used to count tokens (default: the embedded model)")
    p.add_argument("--power-cap-mode", choices=POWER_CAP_MODES, default="dry-run", help=POWER_CAP_MODE_HELP)
    p.add_argument("--parrot-url", default=None, help="ServeCore address for backend=parrot")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no trial after this many seconds, nor an engine whose start and shortest trial "
                   "so far would not fit; rerun the same command to resume")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the configurations in parallel on a Ray cluster, one worker per engine on its own GPUs "
                   "(HOST:PORT, ray://HOST:PORT or auto; no address: a local Ray). Needs the ray extra")
    p.add_argument("--zeusd", default=None, metavar="URL",
                   help="meter the engine's GPUs through the zeusd of its node (e.g. http://127.0.0.1:4938: with "
                   "--ray, each worker's own node)")


def build_parser() -> argparse.ArgumentParser:
    """The ``sweep`` command's arguments."""
    p = argparse.ArgumentParser(prog="python -m chains.run sweep", description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    p.add_argument("--knob", action="append", required=True, metavar="NAME=V1,V2",
                   help=f"knob swept one at a time; known: {', '.join(KNOBS)}")
    p.add_argument("--across", action="append", default=[], metavar="NAME=V1,V2",
                   help="knob crossed with every configuration (e.g. backend=vllm,parrot)")
    return p


def fixed_from_args(args: argparse.Namespace, known_workloads: Sequence[str] | None = None
                    ) -> tuple[list[str], dict[str, Any]]:
    """The workloads and the fixed part of a sweep (settings, engine, target) from the shared arguments.

    Raises:
        ConfigError: an unknown workload without --inputs, a missing/empty/bad inputs file, a malformed
            --set/--setting/--engine-arg, or a --setting that names a knob.
    """
    workloads = _split_multi(args.workload)
    targets = [w for w in workloads if known_workloads is not None and w not in known_workloads]
    if targets and not args.inputs:
        raise ConfigError(f"unknown workload(s) {targets}; known: {', '.join(known_workloads or ())} "
                          "(or give --inputs FILE to sweep your own target)")
    for target in targets:
        locate_target(target, args.config)  # found without importing it: that waits for the engine
    if args.inputs:
        load_inputs(args.inputs, args.column)  # missing, empty or not JSON: refused before anything starts
    engine = _parse_engine_args(args.engine_arg)
    settings = _parse_engine_args(args.setting)  # same FIELD=VALUE syntax
    if args.model:
        # The engine serves it and the workload counts its tokens with its tokenizer: one flag sets both.
        if settings.get("model", args.model) != args.model or engine.get("model", args.model) != args.model:
            raise ConfigError(f"--model {args.model} disagrees with a model named by --setting or --engine-arg")
        engine["model"] = settings["model"] = args.model
    overlap = set(settings) & set(KNOB_FIELDS)
    if overlap:
        raise ConfigError(f"--setting {sorted(overlap)} names a knob; use --set or --knob for knobs")
    fixed: dict[str, Any] = {"settings": {**settings, **_parse_fixed(args.fixed)}, "engine": engine}
    if targets:
        fixed["target"] = {"inputs": str(args.inputs), "column": args.column, "config": args.config}
    return list(dict.fromkeys(workloads)), fixed


def spec_from_args(args: argparse.Namespace, known_workloads: Sequence[str] | None = None) -> SweepSpec:
    """Validate the arguments into a :class:`SweepSpec` (every error before anything runs)."""
    workloads, fixed = fixed_from_args(args, known_workloads)
    knobs: dict[str, list[Any]] = {}
    for item in args.knob:
        name, values = parse_knob(item)
        if name in knobs:
            raise ConfigError(f"knob {name!r} given twice")
        knobs[name] = values
    across: dict[str, list[Any]] = {}
    for item in args.across:
        name, values = parse_knob(item)
        if name in knobs or name in across:
            raise ConfigError(f"knob {name!r} is both swept and crossed, or crossed twice")
        across[name] = values
    return SweepSpec(workloads=workloads, knobs=knobs, repeats=args.repeats, across=across, fixed=fixed)


def executor_from_args(args: argparse.Namespace, make_runner: Callable[[Any], TrialRunner]) -> Any:
    """The `RayExecutor` of ``--ray`` (None without it: the sweep runs here, one configuration at a time)."""
    if args.ray is None:
        return None
    from chains.harness.ray_executor import RayExecutor, import_ray

    import_ray()  # no ray: a one-line error naming the extra, before anything is written
    return RayExecutor(make_runner=make_runner, address=None if args.ray == "local" else args.ray,
                       power_cap_mode=args.power_cap_mode, progress=not args.no_progress)


def engine_runner_maker(engine: dict[str, Any], parrot_url: str | None, target: dict[str, Any] | None,
                        zeusd: str | None) -> Callable[[Any], TrialRunner]:
    """What a Ray worker calls to build its `EngineTrialRunner`, given where it runs (its node's GPU indices)."""

    def make(where: Any) -> TrialRunner:
        return EngineTrialRunner(engine, parrot_url=parrot_url, target=target, zeusd=zeusd,
                                 gpu_ids=(where or {}).get("gpus") or None)

    return make


def main(argv: Sequence[str] | None = None, runner_factory: Callable[..., TrialRunner] | None = None) -> int:
    """Entry point of ``python -m chains.run sweep``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        from chains.harness.settings import WORKLOADS

        spec = spec_from_args(args, WORKLOADS)
        store = ResultStore(args.out)
        cap = PowerCap.for_mode(args.power_cap_mode)
        if runner_factory is None:
            make = engine_runner_maker(spec.fixed["engine"], args.parrot_url, spec.fixed.get("target"), args.zeusd)
        else:
            make = _factory_maker(runner_factory, spec)
        runner: Any = make(None)
        executor = executor_from_args(args, make)
        defaults = runner.defaults() if hasattr(runner, "defaults") else {}
        deadline = time.monotonic() + args.time_budget if args.time_budget else None
        outcome = run_sweep(spec, store, runner, defaults=defaults, power_cap=cap, progress=not args.no_progress,
                            deadline=deadline, executor=executor)
    except EnergyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = f", {len(outcome.failed)} failed configuration(s)" if outcome.failed else ""
    print(f"{outcome.ran} trial(s) run, {outcome.skipped} already in {args.out}, "
          f"{len(outcome.infeasible)} infeasible configuration(s){failed}")
    if any(k == "power-cap" for k in (*spec.knobs, *spec.across)) and cap.mode != "applied":
        print(f"power caps: {cap.mode}, NOT applied to a real GPU (the store records them so)")
    return 0


def _factory_maker(runner_factory: Callable[..., TrialRunner], spec: SweepSpec) -> Callable[[Any], TrialRunner]:
    def make(where: Any) -> TrialRunner:
        return runner_factory(spec)

    return make


if __name__ == "__main__":
    raise SystemExit(main())
