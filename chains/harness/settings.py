"""The settings of one trial: every knob and size, the presets that fill the unset ones, and their checks.

Example:
    >>> resolve(RunSettings(workload="search", preset="study")).output_len
    800
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from chains.harness.knobs import KNOBS
from chains.workloads import summarize
from langchain_energy.errors import ConfigError

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
        scheduling: workflow scheduling policy (`langchain_energy.scheduling.POLICIES`); None: none.
        batch_size: the engine's max_num_seqs.
        max_batched_tokens: the engine's token budget per step (None: vLLM's default).
        enforce_eager: run the engine eager (True) or with CUDA graphs (False); None: the engine's default.
        prefix_caching: the engine's prefix caching.
        tensor_parallel_size: GPUs per engine (vLLM tensor_parallel_size; None: 1).
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
    scheduling: str | None = None
    batch_size: int = 8
    max_batched_tokens: int | None = None
    enforce_eager: bool | None = None
    prefix_caching: bool = True
    tensor_parallel_size: int | None = None
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
    if settings.scheduling not in (None, "fcfs") and settings.backend != "vllm":
        raise ConfigError(f"--scheduling {settings.scheduling} orders the managed vLLM engine's requests; "
                          f"backend {settings.backend} cannot take it (Parrot schedules its own)")
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


def filled_in(settings: RunSettings, workload: str) -> dict[str, Any]:
    """The fields that :func:`resolve` takes from the preset for ``workload`` (those left unset)."""
    given, resolved = settings.to_dict(), resolve(settings, workload).to_dict()
    return {k: v for k, v in resolved.items() if given.get(k) is None and v is not None}
