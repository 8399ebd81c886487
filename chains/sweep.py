"""Knob sweeps: run workloads over knob values, repeats each, into a resumable results store.

``python -m chains.run sweep --workload search --knob batch-size=1,2,4,8,16 --repeats 10 --out DIR``

Each ``--knob`` is swept one at a time with the other knobs at their defaults (the study's design);
``--across`` crosses a knob with every swept configuration (``--across backend=vllm,parrot`` compares
serving systems at every point). Engine knobs (batch size, prefix caching) get one engine per value, started
once and restarted when the value changes; the prefix cache is reset before every trial. Each trial is
written to the store as soon as it finishes; rerunning the same command skips finished trials. A configuration
whose engine cannot start for lack of memory is recorded as infeasible with the reason and the sweep goes on.

Example:
    >>> spec = SweepSpec(workloads=["search"], knobs={"batch-size": [1, 2]}, repeats=2)
    >>> [(c.knob, c.value, c.settings["batch_size"]) for c in plan(spec, {"batch_size": 8})]
    [('batch-size', 1, 1), ('batch-size', 2, 2)]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Protocol

import pandas as pd
from tqdm import tqdm

from langchain_energy.errors import ConfigError, EnergyError, InfeasibleConfigError
from langchain_energy.knobs import KNOBS, PowerCap, SimulatedGPU, knob, parse_knob
from langchain_energy.results import (
    STATUS_INFEASIBLE,
    ResultStore,
    SweepSpec,
    TrialRecord,
    frame_records,
    trial_key,
)


@dataclass
class SweepConfig:
    """One configuration of a sweep: a workload with every knob it sets.

    Attributes:
        workload: workload name.
        knob: the swept knob; ``value`` its value here.
        assign: every knob set by the sweep for this configuration (swept and crossed).
        settings: run-settings fields (defaults, then the sweep's fixed settings, then ``assign``).
    """

    workload: str
    knob: str
    value: Any
    assign: dict[str, Any]
    settings: dict[str, Any]

    def key(self, repeat: int) -> str:
        """The store key of this configuration's ``repeat``-th trial."""
        return trial_key(self.workload, self.assign, repeat)

    def engine_key(self) -> tuple[tuple[str, Any], ...]:
        """What needs the same engine: the backend and every engine knob's value."""
        fields = [KNOBS[n].field for n in KNOBS if KNOBS[n].is_engine_knob]
        return (("backend", self.settings.get("backend")), *((f, self.settings.get(f)) for f in fields))


def plan(spec: SweepSpec, defaults: Mapping[str, Any]) -> list[SweepConfig]:
    """Every configuration of ``spec``, grouped so each engine starts once per value.

    Args:
        spec: the sweep.
        defaults: run-settings defaults (field name -> value) for the knobs not swept.
    """
    fixed = dict(spec.fixed.get("settings", {}))
    across_names = list(spec.across)
    configs = []
    for workload in spec.workloads:
        for combo in product(*(spec.across[n] for n in across_names)):
            crossed = dict(zip(across_names, combo))
            for name, values in spec.knobs.items():
                for value in values:
                    assign = {**crossed, name: value}
                    settings = {**defaults, **fixed, "workload": workload}
                    settings.update({knob(k).field: v for k, v in assign.items()})
                    configs.append(SweepConfig(workload, name, value, assign, settings))
    # Stable sort by engine identity: fewer restarts, same order of trials within an engine.
    order: dict[tuple, int] = {}
    for c in configs:
        order.setdefault(c.engine_key(), len(order))
    return sorted(configs, key=lambda c: order[c.engine_key()])


class TrialRunner(Protocol):
    """What the sweep loop needs from whoever runs trials."""

    def prepare(self, config: SweepConfig) -> None:
        """Make the engine for ``config`` ready (restart when its engine knobs changed).

        Raises InfeasibleConfigError when the engine cannot start for lack of memory."""

    def run(self, config: SweepConfig, repeat: int) -> Any:
        """Run one trial; returns an object with ``summary`` and ``runs`` DataFrames and a ``meta`` dict."""

    def close(self) -> None:
        """Stop whatever :meth:`prepare` started."""


@dataclass
class SweepOutcome:
    """What a sweep call did: trials run now, skipped as already stored, and infeasible configurations."""

    ran: int = 0
    skipped: int = 0
    infeasible: list[str] = field(default_factory=list)


@dataclass
class _Pace:
    """How long this call's engine starts and trials took, to tell whether another configuration fits."""

    longest_prepare_s: float = 0.0
    shortest_trial_s: float | None = None

    def fits(self, deadline: float | None) -> bool:
        """Whether an engine start plus the shortest trial seen so far ends before ``deadline``."""
        if deadline is None:
            return True
        needed = self.longest_prepare_s + (self.shortest_trial_s or 0.0)
        return time.monotonic() + needed < deadline


def _record(config: SweepConfig, repeat: int, result: Any, extra_meta: Mapping[str, Any]) -> TrialRecord:
    meta = dict(getattr(result, "meta", {}) or {})
    timeline = getattr(result, "timeline", None)
    if timeline is None:
        timeline = meta.pop("timeline", None)
    meta.update(extra_meta)
    return TrialRecord(
        key=config.key(repeat),
        workload=config.workload,
        knob=config.knob,
        value=config.value,
        repeat=repeat,
        assign=config.assign,
        settings=config.settings,
        summary=frame_records(getattr(result, "summary", None)),
        runs=frame_records(getattr(result, "runs", None)),
        timeline=frame_records(pd.DataFrame(timeline)) if timeline is not None else [],
        meta=meta,
    )


def run_sweep(
    spec: SweepSpec,
    store: ResultStore,
    runner: TrialRunner,
    defaults: Mapping[str, Any] | None = None,
    power_cap: PowerCap | None = None,
    progress: bool = True,
    deadline: float | None = None,
) -> SweepOutcome:
    """Run every trial of ``spec`` not already in ``store``.

    The power caps are checked (range, privilege) before any trial runs, and the original limit is
    restored at the end whatever happens. With a ``deadline`` (a ``time.monotonic()`` instant) no trial
    starts after it, and no configuration starts whose engine start plus the shortest trial seen so far
    would end after it; the next call with the same store resumes there.

    Raises:
        SweepMismatchError: the store holds a different sweep.
        PowerCapError / PowerCapPermissionError: a power cap cannot be applied.
    """
    configs = plan(spec, defaults or {})
    caps = sorted({c.settings["power_cap_w"] for c in configs if c.settings.get("power_cap_w") is not None})
    power_cap = power_cap or PowerCap(dry_run=True)
    power_cap.preflight(caps)  # before the store is created: a sweep that cannot run leaves nothing behind
    if hasattr(runner, "check"):
        runner.check(configs)
    store.init(spec)
    done = store.done_keys()
    total = len(configs) * spec.repeats
    outcome = SweepOutcome(skipped=sum(c.key(r) in done for c in configs for r in range(spec.repeats)))
    bar = tqdm(total=total, initial=outcome.skipped, desc="trials", unit="trial", disable=not progress)
    pace = _Pace()
    try:
        with power_cap:
            for config in configs:
                pending = [r for r in range(spec.repeats) if config.key(r) not in done]
                if pending and pace.fits(deadline):
                    _run_config(config, pending, store, runner, power_cap, outcome, bar, deadline, pace)
    finally:
        bar.close()
        runner.close()
    return outcome


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _run_config(config, pending, store, runner, power_cap, outcome, bar, deadline, pace) -> None:
    bar.set_postfix_str(f"{config.workload} {config.knob}={config.value}")
    cap = config.settings.get("power_cap_w")
    try:
        started = time.monotonic()
        runner.prepare(config)
        pace.longest_prepare_s = max(pace.longest_prepare_s, time.monotonic() - started)
        if cap is not None:
            power_cap.set(cap)
        else:
            power_cap.unset()  # configurations without a cap run at the device's original limit
        for repeat in pending:
            if _past(deadline):
                return
            t0 = time.monotonic()
            result = runner.run(config, repeat)
            wall = time.monotonic() - t0
            pace.shortest_trial_s = wall if pace.shortest_trial_s is None else min(wall, pace.shortest_trial_s)
            meta = {"power_cap_w": cap, "power_cap_mode": "dry-run" if power_cap.dry_run else "applied",
                    "trial_wall_s": wall} if cap is not None else {"trial_wall_s": wall}
            store.append(_record(config, repeat, result, meta))
            outcome.ran += 1
            bar.update(1)
    except InfeasibleConfigError as exc:
        # Recorded per remaining repeat, so a resumed sweep sees the configuration as finished.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for repeat in pending:
            if config.key(repeat) not in store.done_keys():
                store.append(TrialRecord(key=config.key(repeat), workload=config.workload, knob=config.knob,
                                         value=config.value, repeat=repeat, status=STATUS_INFEASIBLE,
                                         reason=reason, assign=config.assign, settings=config.settings))
                bar.update(1)
        outcome.infeasible.append(f"{config.workload} {config.knob}={config.value}: {reason}")
        tqdm.write(f"infeasible: {config.workload} {config.knob}={config.value}: {reason}", file=sys.stderr)


# -- the real runner: managed vLLM engine + the workloads' run_trial ---------------------------------

def _warm_up(server: Any, batch: int) -> None:
    """A batch of short requests right after an engine starts, so that its first trial does not pay for
    kernel selection and allocations that later trials skip (they are not recorded)."""
    from langchain_energy.llms import ServingLLM

    llm = ServingLLM.from_server(server, max_tokens=16, ignore_eos=True)
    llm.batch([f"Warm-up request {i}: " + "energy " * 300 for i in range(min(batch, 16))])
    server.reset_prefix_cache()


class EngineTrialRunner:
    """Runs trials with ``chains.runner.run_trial`` against a managed vLLM engine (or a Parrot URL).

    Args:
        engine_args: EngineConfig fields held fixed for the sweep (model, max_model_len, cpu_kvcache_gib, ...).
        parrot_url: ServeCore address for configurations with backend ``parrot``. Without one, and with a
            ParrotServe source tree in ``$PARROT_SRC``, the runner starts Parrot's ServeCore and engine in
            front of its own vLLM engine (restarted with it), so both backends share one engine.
        server: an already running ``VLLMServer`` to use; it is restarted when engine knobs change and
            put back to its own configuration at :meth:`close` instead of being stopped.
        log_dir: where engine logs go when this runner starts its own engine.

    Example:
        >>> EngineTrialRunner(engine_args={"max_model_len": 4096}).engine_args
        {'max_model_len': 4096}
    """

    def __init__(self, engine_args: Mapping[str, Any] | None = None, parrot_url: str | None = None,
                 server: Any = None, log_dir: str | None = None) -> None:
        self.parrot_url = parrot_url
        self._stack: Any = None  # a managed Parrot stack in front of self.server
        self.log_dir = log_dir
        self.server = server
        self._borrowed = server is not None
        self._original = server.config if server is not None else None
        base = dict(server.config.to_dict()) if server is not None else {}
        base.update(engine_args or {})
        if isinstance(base.get("extra_args"), list):
            base["extra_args"] = tuple(base["extra_args"])
        self.engine_args = base
        self._engine = server.config if server is not None else None

    @staticmethod
    def defaults() -> dict[str, Any]:
        """Run-settings defaults of the workloads' RunSettings."""
        from chains.runner import RunSettings

        out = {}
        for f in dataclasses.fields(RunSettings):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out

    def engine_config(self, config: SweepConfig) -> Any:
        """The EngineConfig of ``config``: the fixed engine arguments plus its engine knobs."""
        from langchain_energy.backends.vllm_server import EngineConfig

        knobs = {KNOBS[n].engine_field: config.settings.get(KNOBS[n].field)
                 for n in KNOBS if KNOBS[n].is_engine_knob and config.settings.get(KNOBS[n].field) is not None}
        try:
            return EngineConfig(**{**self.engine_args, **knobs})
        except TypeError as exc:
            raise ConfigError(f"bad --engine-arg: {exc}") from None

    def prepare(self, config: SweepConfig) -> None:
        """Start or restart the engine when the configuration's engine differs from the running one."""
        parrot = config.settings.get("backend", "vllm") == "parrot"
        if parrot and self.parrot_url:
            return  # the user's own Parrot stack: its engine is theirs to configure
        if parrot and not os.environ.get("PARROT_SRC"):
            raise ConfigError("backend=parrot needs --parrot-url (a running ServeCore) or PARROT_SRC "
                              "(a ParrotServe source tree, to start one in front of the sweep's engine)")
        engine = self.engine_config(config)
        if self.server is None or engine != self._engine or not self.server.running:
            from langchain_energy.backends.vllm_server import VLLMServer

            self._stop_stack()  # it forwards to the engine being replaced
            self._engine = None
            if self.server is None:
                self.server = VLLMServer(engine, **({"log_dir": self.log_dir} if self.log_dir else {}))
                self.server.start()  # InfeasibleConfigError when the engine cannot start for lack of memory
            else:
                self.server.restart(engine)
            _warm_up(self.server, engine.max_num_seqs)
            self._engine = engine
        if parrot and self._stack is None:
            from langchain_energy.parrot_stack import ParrotStack

            self._stack = ParrotStack(self.server.base_url, self.server.served_model_name,
                                      tokenizer=self.server.spec.path).start()

    def _parrot_base_url(self) -> str | None:
        return self.parrot_url or (self._stack.base_url if self._stack is not None else None)

    def _stop_stack(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.stop()

    def _settings(self, config: SweepConfig, repeat: int) -> Any:
        from chains.runner import RunSettings

        names = {f.name for f in dataclasses.fields(RunSettings)}
        unknown = sorted(set(config.settings) - names - {"workload"})
        if unknown:
            raise ConfigError(f"unknown run setting(s) {unknown}; known: {', '.join(sorted(names))}")
        fields = dict(config.settings)
        parrot = fields.get("backend", "vllm") == "parrot"
        fields["apply_power_cap"] = False  # the sweep applies (and restores) the cap itself
        fields["base_url"] = self._parrot_base_url() if parrot else (self.server.base_url if self.server else None)
        if isinstance(fields.get("seed"), int):
            fields["seed"] = fields["seed"] + repeat  # a different sample per repeat, reproducible
        if isinstance(fields.get("tasks"), list):
            fields["tasks"] = tuple(fields["tasks"])
        return RunSettings(**fields)

    def check(self, configs: Sequence[SweepConfig]) -> None:
        """Validate every configuration's settings and engine before anything starts.

        Raises:
            ConfigError: an unknown setting, a value the workload refuses, or a bad engine argument.
        """
        from chains.runner import validate

        for config in configs:
            settings = self._settings(config, 0)
            if settings.backend == "parrot" and not self.parrot_url:
                if not os.environ.get("PARROT_SRC"):
                    raise ConfigError("backend=parrot needs --parrot-url (a running ServeCore) or PARROT_SRC "
                                      "(a ParrotServe source tree, to start one in front of the sweep's engine)")
                settings = dataclasses.replace(settings, base_url="http://127.0.0.1")  # started later
            validate(settings)
            if not self.parrot_url or settings.backend != "parrot":
                self.engine_config(config)

    def _llm(self, config: SweepConfig) -> Any:
        from langchain_energy.llms import ServingLLM

        if config.settings.get("backend", "vllm") == "parrot":
            return ServingLLM(backend="parrot", base_url=self._parrot_base_url(),
                              model=self.server.served_model_name if self._stack else
                              self.engine_args.get("model", "smollm2-135m"))
        return ServingLLM.from_server(self.server)

    def run(self, config: SweepConfig, repeat: int) -> Any:
        """Reset the prefix cache (independent trials), then run one trial with an energy handler."""
        from chains.runner import run_trial
        from langchain_energy.callbacks import EnergyCallbackHandler
        from langchain_energy.results import timeline_frame

        parrot = config.settings.get("backend", "vllm") == "parrot"
        if self.server is not None and (not parrot or self._stack is not None):
            self.server.reset_prefix_cache()
        settings = self._settings(config, repeat)
        handler = EnergyCallbackHandler(idle_power_w=settings.idle_power_w)
        before = self._engine_metrics()
        with handler:
            result = run_trial(settings, self._llm(config), handler=handler,
                               extra_meta={"repeat": repeat,
                                           "engine": self._engine.to_dict() if self._engine else None})
            runs = result.runs
            if not runs.empty and {"t_start", "t_end"} <= set(runs.columns):
                prov = ";".join(result.meta.get("provenance") or [])
                result.timeline = timeline_frame(handler.timeline.snapshot(), float(runs["t_start"].min()),
                                                 float(runs["t_end"].max()), prov)
        after = self._engine_metrics()
        if before is not None and after is not None:
            # The engine's own counters: the same for both backends, where Parrot's calls report no usage.
            result.meta["engine_metrics"] = (after - before).to_dict()
        return result

    def _engine_metrics(self) -> Any:
        """The managed engine's /metrics counters now, or None without one (or when it does not answer)."""
        if self.server is None:
            return None
        try:
            return self.server.metrics()
        except EnergyError:
            return None

    def close(self) -> None:
        """Stop the engine, or give a borrowed one back in its own configuration."""
        self._stop_stack()
        if self.server is None:
            return
        if self._borrowed:
            if self._engine != self._original or not self.server.running:
                self.server.restart(self._original)
        else:
            self.server.stop()
            self.server = None


# -- command line --------------------------------------------------------------------------------------

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


def build_parser() -> argparse.ArgumentParser:
    """The ``sweep`` command's arguments."""
    p = argparse.ArgumentParser(prog="python -m chains.run sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", action="append", required=True,
                   help="workload(s) to sweep; repeat the flag or give a comma list")
    p.add_argument("--knob", action="append", required=True, metavar="NAME=V1,V2",
                   help=f"knob swept one at a time; known: {', '.join(KNOBS)}")
    p.add_argument("--across", action="append", default=[], metavar="NAME=V1,V2",
                   help="knob crossed with every configuration (e.g. backend=vllm,parrot)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=V", dest="fixed",
                   help="hold a knob at one value for the whole sweep (e.g. output-len=32)")
    p.add_argument("--setting", action="append", default=[], metavar="FIELD=V",
                   help="a run-settings field held fixed (e.g. n_queries=2, preset=cpu)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="FIELD=V",
                   help="EngineConfig field held fixed (e.g. max_model_len=4096, cpu_kvcache_gib=2)")
    p.add_argument("--repeats", type=int, default=10, help="trials per configuration (default 10)")
    p.add_argument("--out", required=True, help="results directory (resumed when it holds this same sweep)")
    p.add_argument("--model", default=None, help="model name or directory (default: the embedded model)")
    p.add_argument("--power-cap-mode", choices=("apply", "dry-run", "simulate"), default="dry-run",
                   help="dry-run (default) only records caps; apply sets them through Zeus (needs root); "
                   "simulate uses a simulated GPU")
    p.add_argument("--parrot-url", default=None, help="ServeCore address for backend=parrot")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no trial after this many seconds, nor an engine whose start and shortest trial "
                   "so far would not fit; rerun the same command to resume")
    return p


def spec_from_args(args: argparse.Namespace, known_workloads: Sequence[str] | None = None) -> SweepSpec:
    """Validate the arguments into a :class:`SweepSpec` (every error before anything runs)."""
    workloads = _split_multi(args.workload)
    if known_workloads is not None:
        unknown = [w for w in workloads if w not in known_workloads]
        if unknown:
            raise ConfigError(f"unknown workload(s) {unknown}; known: {', '.join(known_workloads)}")
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
    engine = _parse_engine_args(args.engine_arg)
    if args.model:
        engine["model"] = args.model
    settings = _parse_engine_args(args.setting)  # same FIELD=VALUE syntax
    overlap = set(settings) & {KNOBS[n].field for n in KNOBS}
    if overlap:
        raise ConfigError(f"--setting {sorted(overlap)} names a knob; use --set or --knob for knobs")
    fixed = {"settings": {**settings, **_parse_fixed(args.fixed)}, "engine": engine}
    return SweepSpec(workloads=list(dict.fromkeys(workloads)), knobs=knobs, repeats=args.repeats,
                     across=across, fixed=fixed)


def _known_workloads() -> Sequence[str] | None:
    try:
        from chains import runner
    except ImportError:
        return None
    return getattr(runner, "WORKLOADS", None)


def main(argv: Sequence[str] | None = None, runner_factory: Callable[..., TrialRunner] | None = None) -> int:
    """Entry point of ``python -m chains.run sweep``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args, _known_workloads())
        store = ResultStore(args.out)
        if args.power_cap_mode == "simulate":
            cap = PowerCap(SimulatedGPU())
        else:
            cap = PowerCap(dry_run=args.power_cap_mode == "dry-run")
        if runner_factory is None:
            runner: Any = EngineTrialRunner(spec.fixed["engine"], parrot_url=args.parrot_url)
        else:
            runner = runner_factory(spec)
        defaults = runner.defaults() if hasattr(runner, "defaults") else {}
        deadline = time.monotonic() + args.time_budget if args.time_budget else None
        outcome = run_sweep(spec, store, runner, defaults=defaults, power_cap=cap, progress=not args.no_progress,
                            deadline=deadline)
    except EnergyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{outcome.ran} trial(s) run, {outcome.skipped} already in {args.out}, "
          f"{len(outcome.infeasible)} infeasible configuration(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
