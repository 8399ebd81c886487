"""``python -m chains.run measure TARGET --inputs FILE``: meter the user's own runnable or graph.

The target (see `chains.harness.target`) runs over every input, ``--users`` at a time, under one root run, on
the managed engine (or ``--base-url``), with the same tables, files and power-cap handling as the built-in
workloads. The user's code does not change:

- a target that is a factory (a function, not a runnable) is called with the chat model bound to the trial's
  engine (`ChatServing`);
- a target that builds its own OpenAI-compatible client is pointed at the engine through the environment,
  set before the target is imported: ``OPENAI_BASE_URL`` (and ``OPENAI_API_KEY`` when unset), which
  ChatOpenAI and friends read, and ``LANGCHAIN_ENERGY_BASE_URL``/``_MODEL``/``_BACKEND``, which this
  project's Studio graphs read. Such a client must name the served model: read it from
  ``LANGCHAIN_ENERGY_MODEL``.

Example:
    python -m chains.run measure ./app/graph.py:graph --inputs questions.jsonl --users 4 --out results/app
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda

from chains.harness.knobs import KNOBS, add_knob_flags, engine_fields, sampling_fields
from chains.harness.target import as_runnable, first_line, load_target, locate_target
from chains.harness.user_inputs import load_inputs
from chains.workloads.llm_utils import ainvoke_many
from langchain_energy.errors import ConfigError, DataError, EnergyError
from langchain_energy.power import POWER_CAP_MODE_HELP, POWER_CAP_MODES, PowerCap

#: The knobs that mean something for a user's workflow (workload sizes are the user's own).
MEASURE_KNOBS = tuple(k for k in KNOBS.values() if k.target in ("engine", "sampling", "power")) + (
    KNOBS["output-len"],
)


def build_parser() -> argparse.ArgumentParser:
    """The ``measure`` command's arguments."""
    p = argparse.ArgumentParser(prog="python -m chains.run measure", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="pkg.module:graph, ./file.py:graph, or a graph name of a langgraph.json")
    p.add_argument("--inputs", required=True, help="inputs: JSONL (one JSON value a line) or a .csv file")
    p.add_argument("--column", default=None, help="the CSV column that holds the inputs")
    p.add_argument("--config", default=None, help="the langgraph.json for graph names (default: ./langgraph.json)")
    p.add_argument("--users", type=int, default=4, help="inputs in flight at once (default 4)")
    p.add_argument("--model", default="smollm2-135m", help="the engine's model (registry name, directory or hub)")
    p.add_argument("--base-url", default=None, help="use this running vLLM server (ends in /v1) instead of one")
    p.add_argument("--max-model-len", type=int, default=None, help="engine context window in tokens")
    k = p.add_argument_group("knobs")
    add_knob_flags(k, MEASURE_KNOBS, {"output-len": "max tokens per call of the chat model given to a factory"})
    k.add_argument("--power-cap-mode", choices=POWER_CAP_MODES, default="dry-run", help=POWER_CAP_MODE_HELP)
    p.add_argument("--repeats", type=int, default=1, help="trials to run (prefix cache reset between them)")
    p.add_argument("--seed", type=int, default=0, help="sampling and engine seed (default 0)")
    p.add_argument("--out", default=None, help="output directory (default results/measure-<time>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def knob_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The knobs given on the command line, typed by the registry (by settings field)."""
    return {k.field: k.coerce(getattr(args, k.field)) for k in MEASURE_KNOBS if getattr(args, k.field) is not None}


def workflow(runnable: Runnable, users: int, name: str) -> Runnable:
    """Every input through ``runnable``, ``users`` at a time, under one root run called ``name``."""

    async def run(inputs: list[Any], config: RunnableConfig) -> list[Any]:
        return await ainvoke_many(runnable, inputs, config, users)

    return RunnableLambda(run, name=name)


def point_clients_at(base_url: str, model: str) -> dict[str, str | None]:
    """Set the environment that OpenAI-compatible clients read; returns the old values, to put back."""
    values = {"OPENAI_BASE_URL": base_url, "LANGCHAIN_ENERGY_BASE_URL": base_url, "LANGCHAIN_ENERGY_MODEL": model,
              "LANGCHAIN_ENERGY_BACKEND": "openai"}
    if not os.environ.get("OPENAI_API_KEY"):
        values["OPENAI_API_KEY"] = "EMPTY"  # vLLM without --api-key accepts any; the clients want one set
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    return old


def restore_env(old: dict[str, str | None]) -> None:
    """Put back what :func:`point_clients_at` changed."""
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class UserWorkflow:
    """The user's target over its inputs, bound to one engine at a time (the measure command's and a sweep's).

    Args:
        target: the target (see `chains.harness.target`).
        inputs: the inputs, one per workflow invocation.
        config: the ``langgraph.json`` for graph names.

    Raises:
        ConfigError: the target cannot be found (checked at once, without importing it).
    """

    def __init__(self, target: str, inputs: list[Any], config: str | None = None) -> None:
        self.target, self.inputs, self.config = target, inputs, config
        self.name = target.rsplit(":", 1)[-1].rsplit("/", 1)[-1] or "target"
        locate_target(target, config)  # a typo costs no engine start
        self.served_by: dict[str, str] = {}
        self._runnable: Runnable | None = None
        self._env: dict[str, str | None] | None = None

    def bind(self, base_url: str, model: str, chat_model: Callable[[], Any]) -> None:
        """Point the user's clients at this engine and (re)load the target against it.

        The environment is set before the import (clients read it then) and kept until :meth:`unbind`
        (clients made inside a node read it at call time). A factory is called with ``chat_model()``.
        """
        old = point_clients_at(base_url, model)
        if self._env is None:
            self._env = old  # the user's own environment, to put back at the end
        self.served_by = {"base_url": base_url, "model": model}
        self._runnable = as_runnable(load_target(self.target, self.config), chat_model, self.target)

    def unbind(self) -> None:
        """Put the environment back as it was before the first :meth:`bind`."""
        if self._env is not None:
            restore_env(self._env)
            self._env = None

    def run(self, users: int, *, handler: Any = None, callbacks: Sequence[Any] = (),
            idle_power_w: Any = None) -> Any:
        """One metered trial: every input, ``users`` at a time, under one root run.

        Raises:
            DataError: the user's workflow failed (the first line of its error).
        """
        from chains.harness.trial import run_jobs

        if self._runnable is None:
            raise ConfigError("bind the workflow to an engine before running it")
        job = (self.name, workflow(self._runnable, users, self.name), self.inputs)
        try:
            result = run_jobs([job], handler=handler, callbacks=callbacks, idle_power_w=idle_power_w)
        except EnergyError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's workflow failed: say so in one line
            raise DataError(f"target {self.target!r} failed on its inputs: {first_line(exc)}") from None
        result.meta.update(inputs=len(self.inputs), target=self.target, served_by=dict(self.served_by))
        return result


def measure_command(args: argparse.Namespace) -> int:
    """Validate, start the engine, load the target against it, run the trials, write the results.

    Everything that can be checked without the engine is, before the output directory is made; a target that
    fails later (while it loads against the engine, or on its inputs) removes the directory this made.
    """
    from chains.harness.session import output_dir

    # Everything that can fail on bad input, before any engine starts.
    if args.users < 1 or args.repeats < 1:
        raise ConfigError(f"--users and --repeats must be positive integers, got {args.users} and {args.repeats}")
    knobs = knob_settings(args)
    user = UserWorkflow(args.target, load_inputs(args.inputs, args.column), args.config)
    power_cap = PowerCap.for_mode(args.power_cap_mode)
    cap_w = knobs.get("power_cap_w")
    power_cap.preflight([cap_w] if cap_w is not None else [])
    made = args.out is None or not Path(args.out).exists()
    out = output_dir(args.out, "measure")
    try:
        return _measure(args, user, knobs, power_cap, cap_w, out)
    except ConfigError:
        # The target failed to load or to run (the engine's own failures keep their log): leave nothing behind.
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _measure(args: argparse.Namespace, user: UserWorkflow, knobs: dict[str, Any], power_cap: PowerCap,
             cap_w: Any, out: Path) -> int:
    """Start the engine (or use ``--base-url``), run the trials with the target bound to it, write the results."""
    from chains.harness.session import print_session, run_session, write_session
    from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer

    server = None
    if args.base_url is None:
        server = VLLMServer(EngineConfig(model=args.model, max_model_len=args.max_model_len, seed=args.seed,
                                         **engine_fields(knobs)), log_dir=out)
    chat = chat_model_kwargs(knobs, args.seed)

    def bind(srv: Any) -> UserWorkflow:
        if srv is not None:
            user.bind(srv.base_url, srv.served_model_name, lambda: chat_model_for(srv, None, None, chat))
        else:
            user.bind(args.base_url, args.model, lambda: chat_model_for(None, args.base_url, args.model, chat))
        return user

    def trial(bound: UserWorkflow, repeat: int, progress: Any) -> Any:
        result = bound.run(args.users, callbacks=[progress])
        result.meta["repeat"] = repeat
        return result

    try:
        session = run_session(trial, bind, server=server, power_cap=power_cap, power_cap_w=cap_w,
                              repeats=args.repeats, expected_calls=None, show_progress=not args.no_progress)
    finally:
        user.unbind()
    write_session(out, session, {
        "command": "chains.run measure", "target": args.target, "inputs": str(args.inputs), "users": args.users,
        "knobs": {k.name: knobs.get(k.field) for k in MEASURE_KNOBS}, "repeats": args.repeats,
        "engine": session.engine or {"base_url": args.base_url},
    })
    print_session(out, session)
    return 0


def chat_model_kwargs(knobs: dict[str, Any], seed: int | None) -> dict[str, Any]:
    """The chat model's sampling parameters from the knobs (``output-len`` caps its tokens per call)."""
    return {"seed": seed, "max_tokens": knobs.get("output_len") or 256, **sampling_fields(knobs)}


def chat_model_for(server: Any, base_url: str | None, model: str | None, kwargs: dict[str, Any]) -> Any:
    """The chat model a factory target receives: on the managed ``server``, or at ``base_url``."""
    from langchain_energy.chat_models import ChatServing

    if server is not None:
        return ChatServing.from_server(server, **kwargs)
    return ChatServing(backend="openai", base_url=base_url, model=model, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m chains.run measure``; returns the exit status (2 for bad input)."""
    from chains.harness.cli import run_guarded  # the CLI imports this module only when asked: no cycle

    return run_guarded(measure_command, build_parser().parse_args(argv))
