"""Run one measured trial of a workload: settings in, per-call records and per-workflow summary out.

`run_trial(settings, llm)` is what the CLI and the sweeps call. It fills unset knobs from a preset
(`chains.harness.settings`), prepares the inputs (`chains.harness.inputs`), attaches an
`EnergyCallbackHandler` through ``config`` and runs the workload. The workloads know nothing about meters.

Example:
    >>> from langchain_energy.llms import ServingLLM  # doctest: +SKIP
    >>> result = run_trial(RunSettings(workload="search"), ServingLLM(max_tokens=48))  # doctest: +SKIP
    >>> result.summary[["workflow", "llm_calls", "energy_j", "provenance"]]  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseLanguageModel
from langchain_core.runnables import Runnable

from chains.harness.inputs import Inputs, prepare_inputs
from chains.harness.knobs import sampling_fields
from chains.harness.settings import RunSettings, filled_in, resolve, validate
from chains.workloads import agentic, agentic_parrot, search, summarize, summarize_parrot
from langchain_energy.errors import ConfigError

@dataclass
class TrialResult:
    """One trial's outcome.

    Attributes:
        runs: one row per run (LLM calls, graph nodes, chains), the handler's columns.
        summary: one row per workflow (root run).
        meta: resolved settings, input description, wall time, expected and recorded calls, meter.
        outputs: each workflow's output (summaries, answers, task states), by workflow name.
    """

    runs: pd.DataFrame
    summary: pd.DataFrame
    meta: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)


def _parrot_summarize(settings: RunSettings, llm: BaseLanguageModel) -> Runnable:
    """The semantic-variable summarization that Parrot's ServeCore runs as one program."""
    return summarize_parrot.summarize_parrot_workload(
        settings.base_url or getattr(llm, "base_url", None), getattr(llm, "model", settings.model), tokenizer=getattr(llm, "tokenizer", None),
        summary_tokens=settings.output_len, max_calls=settings.max_calls, users=settings.users,
        temperature=settings.temperature, ignore_eos=settings.ignore_eos,
    )


def _parrot_agentic(settings: RunSettings, llm: BaseLanguageModel) -> Runnable:
    """The semantic-variable coding workload that Parrot's ServeCore runs as one program."""
    return agentic_parrot.agentic_parrot_workload(
        settings.base_url or getattr(llm, "base_url", None), getattr(llm, "model", settings.model), tokenizer=getattr(llm, "tokenizer", None),
        rounds=settings.rounds, code_tokens=settings.output_len, review_tokens=settings.review_len,
        users=settings.users, temperature=settings.temperature,
    )


def build_workloads(settings: RunSettings, llm: BaseLanguageModel, inputs: Inputs) -> list[tuple[str, Any, Any]]:
    """(name, runnable, input) for each workflow of the trial; the composite has two."""
    jobs = []
    if inputs.documents:
        s = resolve(settings, "summarize")
        if s.backend == "parrot":
            wl = _parrot_summarize(s, llm)
        else:
            wl = summarize.summarize_workload(llm, summary_tokens=s.output_len, max_calls=s.max_calls, users=s.users)
        jobs.append(("summarize", wl, inputs.documents))
    if inputs.queries:
        s = resolve(settings, "search")
        jobs.append(("search", search.search_workload(llm, answer_tokens=s.output_len, users=s.users), inputs.queries))
    if inputs.tasks:
        s = resolve(settings, "agentic")
        if s.backend == "parrot":
            wl = _parrot_agentic(s, llm)
        else:
            wl = agentic.agentic_workload(llm, rounds=s.rounds, code_tokens=s.output_len, review_tokens=s.review_len,
                                          users=s.users)
        jobs.append(("agentic", wl, inputs.tasks))
    return jobs


def _sampling_llm(settings: RunSettings, llm: BaseLanguageModel) -> BaseLanguageModel:
    """Apply the trial's sampling knobs to a ServingLLM (other models are used as given)."""
    fields = getattr(type(llm), "model_fields", {})
    wanted = {"seed": settings.seed, **sampling_fields(settings.to_dict())}
    updates = {k: v for k, v in wanted.items() if k in fields and getattr(llm, k) != v}
    return llm.model_copy(update=updates) if updates else llm


def workflow_scheduler(settings: RunSettings, llm: BaseLanguageModel) -> Any:
    """The trial's `WorkflowScheduler` (None under fcfs or without the knob): its gate admits batch-size calls
    at a time, and each document, session or task (a child of the workload's root run) is a workflow."""
    if settings.scheduling in (None, "fcfs"):
        return None
    from langchain_energy.scheduling import WorkflowScheduler

    if "scheduler" not in getattr(type(llm), "model_fields", {}):
        raise ConfigError(f"--scheduling needs this package's models (ServingLLM, ChatServing), not {type(llm).__name__}")
    return WorkflowScheduler(settings.scheduling, max_in_flight=settings.batch_size, workflow_depth=1)


def _close_copy(original: BaseLanguageModel, used: BaseLanguageModel) -> None:
    """Close the HTTP client of an LLM copy made for this trial (the caller's LLM stays open)."""
    backend = getattr(used, "_backend", None)
    if used is not original and backend is not None and backend is not getattr(original, "_backend", None):
        _run_coroutine(backend.aclose())


def run_trial(
    settings: RunSettings,
    llm: BaseLanguageModel,
    *,
    inputs: Inputs | None = None,
    callbacks: Sequence[BaseCallbackHandler] = (),
    handler: Any = None,
    extra_meta: dict[str, Any] | None = None,
) -> TrialResult:
    """Run one trial of ``settings.workload`` on ``llm`` with an energy handler attached.

    Each workflow (the composite's summarize and search sides) is its own root run, started together,
    so the handler attributes their energy separately.

    Args:
        settings: the knobs; unset ones come from the preset.
        llm: any LangChain language model (a `ServingLLM` for measurements).
        inputs: prepared inputs (default: `prepare_inputs` with ``llm.get_num_tokens``).
        callbacks: more handlers for the same runs (a progress bar, a tracer).
        handler: an `EnergyCallbackHandler` to use (default: a new one; it is closed at the end).
        extra_meta: merged into the result's meta (engine flags, power cap, repeat index).

    Returns:
        The trial's `TrialResult`.
    """
    validate(settings)
    if inputs is None:
        inputs = prepare_inputs(settings, llm.get_num_tokens)
    caller_llm, llm = llm, _sampling_llm(settings, llm)
    scheduler = workflow_scheduler(settings, llm)
    if scheduler is not None:
        llm, callbacks = llm.model_copy(update={"scheduler": scheduler}), [*callbacks, scheduler]
    jobs = build_workloads(settings, llm, inputs)
    try:
        metered = run_jobs(jobs, handler=handler, callbacks=callbacks, idle_power_w=settings.idle_power_w)
    finally:
        _close_copy(caller_llm, llm)
    runs, summary = metered.runs, metered.summary
    meta = {
        # Only what the preset filled in: the settings themselves are the caller's to record, once.
        "preset_values": {name: filled_in(settings, name) for name, _, _ in jobs},
        "inputs": {
            "documents": len(inputs.documents),
            "chunks_per_document": [len(c) for c in inputs.documents],
            "sources": inputs.sources,
            "queries": len(inputs.queries),
            "tasks": inputs.tasks,
        },
        "expected_llm_calls": inputs.expected_calls(settings),
        **metered.meta,
        "llm": describe_llm(llm),
        **(extra_meta or {}),
    }
    if scheduler is not None:
        meta["scheduler"] = {"policy": scheduler.policy, "gate": scheduler.max_in_flight, **scheduler.slot_stats()}
    return TrialResult(runs=runs, summary=summary, meta=meta, outputs=metered.outputs)


def describe_llm(llm: Any) -> dict[str, Any]:
    """What a trial's metadata says of the model that served it."""
    return {"type": type(llm).__name__,
            **{k: getattr(llm, k) for k in ("backend", "model", "base_url", "max_tokens") if hasattr(llm, k)}}


def run_jobs(
    jobs: Sequence[tuple[str, Any, Any]],
    *,
    handler: Any = None,
    callbacks: Sequence[BaseCallbackHandler] = (),
    idle_power_w: Any = None,
) -> TrialResult:
    """Run workflows together, each ``(name, runnable, input)`` its own root run, metered by one handler.

    Args:
        jobs: the workflows; they start together, so concurrent ones are attributed separately.
        handler: an `EnergyCallbackHandler` to use (default: a new one, closed at the end).
        callbacks: more handlers for the same runs (a progress bar, a tracer).
        idle_power_w: the new handler's idle baseline (watts, "measure", "model" or None).

    Returns:
        Runs, per-workflow summary, outputs by name, and meta (wall time, calls recorded, provenance, meter).
    """
    from langchain_energy.callbacks import EnergyCallbackHandler
    from langchain_energy.ledger import CALL_KINDS  # a completion LLM's and a chat model's calls

    own_handler = handler is None
    if own_handler:
        handler = EnergyCallbackHandler(idle_power_w=idle_power_w)
    config = {"callbacks": [handler, *callbacks]}

    async def go():
        return await asyncio.gather(*(wl.ainvoke(data, config={**config, "run_name": name}) for name, wl, data in jobs))

    t0 = time.time()
    try:
        with handler if own_handler else contextlib.nullcontext():
            outputs = _run_coroutine(go())
    finally:
        wall = time.time() - t0
    runs = handler.to_dataframe()
    summary = handler.summary()
    meter = getattr(getattr(handler, "timeline", None), "meter", None)
    meta = {
        "wall_s": wall,
        "recorded_llm_calls": int(runs["kind"].isin(CALL_KINDS).sum()) if not runs.empty else 0,
        "provenance": sorted(set(summary["provenance"])) if not summary.empty else [],
        "meter": meter.describe() if meter is not None and hasattr(meter, "describe") else None,
    }
    return TrialResult(runs=runs, summary=summary, meta=meta,
                       outputs={name: out for (name, _, _), out in zip(jobs, outputs)})


def _run_coroutine(coro):
    """Run a coroutine on the package's background loop, where the LLM's HTTP clients live.

    One loop for every trial keeps async clients valid across trials, and works from Jupyter too.
    """
    from langchain_energy._loop import run_sync

    return run_sync(coro)
