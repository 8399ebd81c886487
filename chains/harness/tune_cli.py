"""``python -m chains.run tune``: search the knobs for the least energy that meets a latency SLO.

``python -m chains.run tune --workload search --objective energy --slo 'p90_latency_s<=20' --trials 30 --out DIR``

Writes into DIR the study (``tune.db``, SQLite: rerun the same command to resume), the trials (the sweep
store format: ``sweep.json``, ``trials/``), ``configs.csv``, ``pareto.csv``, ``pareto.png`` and
``recommendation.json``, and prints the Pareto front, the recommended configuration, its saving against the
default configuration (95% CIs) and the command that measures it again. ``--oracle STORE`` searches the
trials of committed sweep stores instead of running an engine. With ``--time-budget`` the search stops
starting configurations when the time is spent and reports what it measured; rerunning resumes it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from chains.harness.knobs import KNOBS, TUNE_OPT_IN, knob, parse_knob
from chains.harness.sweep_cli import add_common_arguments, fixed_from_args
from chains.harness.tuner import OBJECTIVES, EngineObjective, Objective, RecordedObjective, parse_slo, report, \
    search_space, tune, write_outputs
from langchain_energy.errors import ConfigError, EnergyError
from langchain_energy.power import PowerCap


def build_parser() -> argparse.ArgumentParser:
    """The ``tune`` command's arguments (the shared ones are the ``sweep`` command's)."""
    p = argparse.ArgumentParser(prog="python -m chains.run tune", description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    p.set_defaults(repeats=3)
    p.add_argument("--objective", choices=tuple(OBJECTIVES), default="energy",
                   help="what to minimise: energy per trial (J) or energy per generated token (J/token)")
    p.add_argument("--slo", default=None, metavar="METRIC<=X",
                   help="what the recommended configuration must meet, e.g. 'p90_latency_s<=20', or "
                   "'p90_latency_s<=default': no worse than the default configuration, measured first "
                   "(pNN_latency_s: workflows; pNN_call_latency_s: LLM calls; or a mean such as latency_s)")
    p.add_argument("--trials", type=int, default=30, help="configurations to measure, each with --repeats trials")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    p.add_argument("--knob", action="append", default=[], metavar="NAME=V1,V2",
                   help=f"search these values of a knob instead of the default range; known: {', '.join(KNOBS)}")
    p.add_argument("--allow", action="append", default=[], choices=sorted(TUNE_OPT_IN),
                   help="also search a knob that changes what the user gets (users, output-len)")
    p.add_argument("--oracle", action="append", default=[], metavar="STORE",
                   help="search the trials of these committed sweep stores instead of running an engine")
    return p


def objective_from_args(args: argparse.Namespace) -> Objective:
    """The objective the arguments describe, validated before anything runs.

    Raises:
        ConfigError: bad workload, inputs, knob range, settings or SLO (one line, naming the problem).
    """
    from chains.harness.settings import WORKLOADS

    workloads, fixed = fixed_from_args(args, WORKLOADS)
    if len(workloads) != 1:
        raise ConfigError(f"tune one workload at a time, got {workloads}")
    overrides = [parse_knob(item) for item in args.knob]
    held = {name for name in (parse_knob(i)[0] for i in args.fixed)}
    if args.oracle:
        where = {knob(n).name: v[0] for n, v in (parse_knob(i) for i in args.fixed)}
        space = dict(overrides) if overrides else None
        return RecordedObjective(args.oracle, workloads[0], args.out, where=where, space=space,
                                 repeats=args.repeats if args.repeats != 3 else None,
                                 progress=not args.no_progress)
    space = search_space(overrides, args.allow, held, power_cap=args.power_cap_mode == "apply",
                         parrot=bool(args.parrot_url or os.environ.get("PARROT_SRC")))
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    return EngineObjective(args.out, workloads[0], space, args.repeats, fixed=fixed, parrot_url=args.parrot_url,
                           power_cap=PowerCap.for_mode(args.power_cap_mode), progress=not args.no_progress,
                           deadline=deadline)


def main(argv: Sequence[str] | None = None, objective_factory: Callable[[argparse.Namespace], Any] | None = None) -> int:
    """Entry point of ``python -m chains.run tune``; returns the exit status (2 for bad input, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        slo = parse_slo(args.slo) if args.slo is not None else None
        if args.trials < 1:
            raise ConfigError(f"--trials must be a positive integer, got {args.trials}")
        if args.repeats < 1:
            raise ConfigError(f"--repeats must be a positive integer, got {args.repeats}")
        objective = (objective_factory or objective_from_args)(args)
        if args.ray is not None and not args.oracle:  # each configuration on a Ray worker, as `sweep --ray`
            from chains.harness.sweep_cli import engine_runner_maker, executor_from_args

            fixed = getattr(objective, "fixed", {}) or {}
            objective.executor = executor_from_args(args, engine_runner_maker(
                fixed.get("engine", {}), args.parrot_url, fixed.get("target"), args.zeusd))
        result = tune(objective, args.out, args.objective, slo, args.trials, args.seed)
        paths = write_outputs(result, args.out)
    except EnergyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"time budget spent; rerun the same command to resume the tune in {args.out}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to resume the tune in {args.out}", file=sys.stderr)
        return 130
    print(report(result))
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
