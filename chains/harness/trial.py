"""Run one measured trial of a workload: settings in, per-call records and per-workflow summary out.

`run_trial(settings, llm)` is what the CLI and the sweeps call. It fills unset knobs from a preset
(``cpu``: a minute or two on a 2-core machine with the embedded model; ``study``: the study's sizes,
for GPUs), prepares the inputs, attaches an `EnergyCallbackHandler` through ``config`` and runs the
workload. The workloads themselves know nothing about meters.

Example:
    >>> from langchain_energy.llms import ServingLLM  # doctest: +SKIP
    >>> result = run_trial(RunSettings(workload="search"), ServingLLM(max_tokens=48))  # doctest: +SKIP
    >>> result.summary[["workflow", "llm_calls", "energy_j", "provenance"]]  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseLanguageModel
from langchain_core.runnables import Runnable

from chains.workloads import agentic, agentic_parrot, search, summarize, summarize_parrot
from chains.harness.knobs import KNOBS, sampling_fields
from chains.workloads.corpus import embedded_corpus, load_hf_dataset, load_user_documents
from langchain_energy.errors import ConfigError, DataError

WORKLOADS = ("summarize", "search", "agentic", "composite")
PRESETS = ("cpu", "study")

# Unset knobs take these values. "cpu" keeps every workload to about a minute or two with SmolLM2-135M on
# two cores (~85 tok/s at batch 8); "study" is the study's full size for GPU runs.
PRESET_VALUES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "summarize": {"n_docs": 4, "input_len": 512, "max_input_tokens": 2048, "output_len": 64, "users": 4},
        "search": {"n_queries": 8, "max_follow_ups": 1, "output_len": 48, "users": 4},
        "agentic": {"n_tasks": 1, "rounds": 2, "output_len": 96, "review_len": 48, "users": 1},
    },
    "study": {
        "summarize": {"n_docs": 10, "input_len": 1000, "max_input_tokens": 36000, "output_len": 256, "users": 16},
        "search": {"n_queries": 64, "max_follow_ups": 6, "output_len": 800, "users": 16},
        "agentic": {"n_tasks": 4, "rounds": 2, "output_len": 1000, "review_len": 500, "users": 16},
    },
}
# The composite runs a smaller summarization and search side by side.
COMPOSITE_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {"summarize": {"n_docs": 1}, "search": {"n_queries": 4}},
    "study": {"summarize": {}, "search": {}},
}


@dataclass
class RunSettings:
    """Every setting of one trial. ``None`` means "the preset's value for this workload" (or the engine's).

    The fields from ``backend`` to ``temperature`` hold the knobs: what each one sets (an engine field, a
    sampling parameter, the workload's size, the power cap) is said once, in `chains.harness.knobs.KNOBS`.

    Attributes:
        workload: summarize, search, agentic or composite.
        backend: vllm (managed or by base_url), openai (any vLLM URL) or parrot.
        batch_size: the engine's max_num_seqs.
        max_batched_tokens: the engine's token budget per step (None: vLLM's default).
        enforce_eager: run the engine eager (True) or with CUDA graphs (False); None: the engine's default.
        prefix_caching: the engine's prefix caching.
        output_len: max tokens per answer (summary budget, search answer, engineer code).
        input_len: summarization chunk size in tokens of the served model's tokenizer.
        users: concurrent documents / sessions / tasks.
        power_cap_w: GPU power cap in watts (the caller sets it, or records it as not applied).
        ignore_eos: generate exactly output_len tokens per call.
        temperature: sampling temperature.
        model: registry name (smollm2-135m, llama2-7b-shape), model directory or hub name.
        base_url: an already running server; None starts the embedded engine (CLI).
        max_input_tokens: cap on tokens read from each document.
        review_len: max tokens of the architect and reviewer (agentic).
        seed: sampling seed (None: unseeded).
        preset: cpu or study.
        docs: a file or directory of documents (summarize); None uses the embedded corpus.
        dataset: a Hugging Face dataset name or saved directory (summarize).
        dataset_split, dataset_field: which split and column of the dataset.
        n_docs, n_queries, n_tasks: workload sizes.
        max_follow_ups: cap on follow-ups per search session (2 + follow-ups calls).
        tasks: coding tasks (names or briefs); None cycles through the bundled ones.
        rounds: review/revise rounds per module (agentic).
        max_calls: bound on LLM calls per document (summarize, default 40).
        max_model_len: the model's context, for input checks (None: the registry's value).
        idle_power_w: idle baseline for the handler (watts, "measure", "model" or None).
    """

    workload: str = "search"
    # -- knobs (chains.harness.knobs) --
    backend: str = "vllm"
    batch_size: int = 8
    max_batched_tokens: int | None = None
    enforce_eager: bool | None = None
    prefix_caching: bool = True
    output_len: int | None = None
    input_len: int | None = None
    users: int | None = None
    power_cap_w: float | None = None
    ignore_eos: bool = False
    temperature: float = 0.7
    # -- the rest --
    model: str = "smollm2-135m"
    base_url: str | None = None
    max_input_tokens: int | None = None
    review_len: int | None = None
    seed: int | None = 0
    preset: str = "cpu"
    docs: str | None = None
    dataset: str | None = None
    dataset_split: str = "test"
    dataset_field: str | None = None
    n_docs: int | None = None
    n_queries: int | None = None
    n_tasks: int | None = None
    max_follow_ups: int | None = None
    tasks: tuple[str, ...] | None = None
    rounds: int | None = None
    max_calls: int = summarize.DEFAULT_MAX_CALLS
    max_model_len: int | None = None
    idle_power_w: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for metadata files."""
        d = dataclasses.asdict(self)
        if d["tasks"] is not None:
            d["tasks"] = list(d["tasks"])
        return d


def validate(settings: RunSettings) -> None:
    """Refuse impossible settings before anything starts.

    Raises:
        ConfigError: unknown workload/preset/backend, a non-positive size, a power cap <= 0, ...
    """
    if settings.workload not in WORKLOADS:
        raise ConfigError(f"unknown workload {settings.workload!r}; choose one of: {', '.join(WORKLOADS)}")
    if settings.preset not in PRESETS:
        raise ConfigError(f"unknown preset {settings.preset!r}; choose one of: {', '.join(PRESETS)}")
    values = settings.to_dict()
    for k in KNOBS.values():
        # A value the knob refuses ("users must be a positive integer, got 0"), or one of the wrong type.
        if k.coerce(values[k.field]) != values[k.field]:
            raise ConfigError(f"{k.name} must be typed, not text: got {values[k.field]!r}")
    for name in ("max_input_tokens", "review_len", "n_docs", "n_queries", "n_tasks", "max_calls", "max_model_len"):
        value = getattr(settings, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    for name in ("rounds", "max_follow_ups"):
        value = getattr(settings, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
    if settings.docs and settings.dataset:
        raise ConfigError("give either --docs or --dataset, not both")


def resolve(settings: RunSettings, workload: str | None = None) -> RunSettings:
    """A copy with every unset knob taken from the preset, for ``workload`` (default: the settings' own).

    Composite settings resolve per side: ``resolve(s, "summarize")`` and ``resolve(s, "search")``.
    """
    validate(settings)
    wl = workload or settings.workload
    if wl == "composite":
        return settings
    preset = dict(PRESET_VALUES[settings.preset][wl])
    if settings.workload == "composite":
        preset.update(COMPOSITE_OVERRIDES[settings.preset].get(wl, {}))
    changes = {k: v for k, v in preset.items() if getattr(settings, k) is None}
    return dataclasses.replace(settings, workload=wl, **changes)


def _filled_in(settings: RunSettings, workload: str) -> dict[str, Any]:
    """The fields that :func:`resolve` takes from the preset for ``workload`` (those left unset)."""
    given, resolved = settings.to_dict(), resolve(settings, workload).to_dict()
    return {k: v for k, v in resolved.items() if given.get(k) is None and v is not None}


@dataclass
class Inputs:
    """What a trial feeds its workload(s): chunked documents, search queries, coding tasks."""

    documents: list[list[str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)

    def expected_calls(self, settings: RunSettings) -> int:
        """LLM calls the trial will make (exact for these workloads' fixed structures)."""
        n = 0
        if self.documents:
            n += summarize.expected_calls(self.documents, settings.max_calls)
        if self.queries:
            n += search.expected_calls(self.queries)
        if self.tasks:
            s = resolve(settings, "agentic")
            n += sum(agentic.calls_per_task(len(agentic.resolve_task(t)["modules"]), s.rounds) for t in self.tasks)
        return n


def load_documents(settings: RunSettings):
    """The summarization documents: --docs, --dataset, or the embedded corpus."""
    if settings.docs:
        docs = load_user_documents(settings.docs)
        return docs[: settings.n_docs] if settings.n_docs else docs
    if settings.dataset:
        return load_hf_dataset(settings.dataset, split=settings.dataset_split, field=settings.dataset_field,
                               n_docs=settings.n_docs)
    return embedded_corpus(settings.n_docs)


def prepare_inputs(settings: RunSettings, count_tokens: Callable[[str], int], max_model_len: int = 0) -> Inputs:
    """Load and chunk the inputs and check that every call fits in the model's context.

    Runs before any engine starts, so bad inputs fail fast.

    Raises:
        DataError: missing, empty or binary documents; a dataset that cannot be loaded.
        ContextLengthError: a chunk or answer length that cannot fit in ``max_model_len``.
    """
    validate(settings)
    max_model_len = settings.max_model_len or max_model_len
    out = Inputs()
    sides = ("summarize", "search") if settings.workload == "composite" else (settings.workload,)
    for side in sides:
        s = resolve(settings, side)
        if side == "summarize":
            summarize.check_fits_context(s.input_len, s.output_len, max_model_len)
            for doc in load_documents(s):
                chunks = summarize.chunk_document(doc.page_content, chunk_tokens=s.input_len,
                                                  count_tokens=count_tokens, max_input_tokens=s.max_input_tokens)
                out.documents.append(chunks)
                out.sources.append(str(doc.metadata.get("source", "")))
        elif side == "search":
            search.check_fits_context(s.output_len, max_model_len, count_tokens)
            out.queries = search.load_queries(s.n_queries, max_follow_ups=s.max_follow_ups)
        elif side == "agentic":
            names = list(s.tasks) if s.tasks else [list(agentic.TASKS)[i % len(agentic.TASKS)] for i in range(s.n_tasks)]
            for t in names:
                agentic.resolve_task(t)
            out.tasks = names
    return out


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
    jobs = build_workloads(settings, llm, inputs)
    try:
        metered = run_jobs(jobs, handler=handler, callbacks=callbacks, idle_power_w=settings.idle_power_w)
    finally:
        _close_copy(caller_llm, llm)
    runs, summary = metered.runs, metered.summary
    meta = {
        # Only what the preset filled in: the settings themselves are the caller's to record, once.
        "preset_values": {name: _filled_in(settings, name) for name, _, _ in jobs},
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
        "recorded_llm_calls": int((runs["kind"] == "llm").sum()) if not runs.empty else 0,
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


def describe_inputs(inputs: Inputs) -> str:
    """One line about the inputs, for the CLI."""
    parts = []
    if inputs.documents:
        parts.append(f"{len(inputs.documents)} documents ({sum(map(len, inputs.documents))} chunks)")
    if inputs.queries:
        parts.append(f"{len(inputs.queries)} search sessions")
    if inputs.tasks:
        parts.append(f"{len(inputs.tasks)} coding tasks ({', '.join(inputs.tasks)})")
    if not parts:
        raise DataError("nothing to run")
    return ", ".join(parts)
