"""The knob registry: every knob of a trial defined once, with where its value goes.

A knob has a command-line name (``batch-size``), the `RunSettings` field that holds its typed value
(``batch_size``), a parser, and a target: the engine (an `EngineConfig` field, a change needs a new engine),
the sampling parameters (a `ServingLLM` field), the workload's size, the GPU power cap, or the serving
system. Everything else reads this table: the ``run`` command's flags, the sweep's ``--knob``/``--set``, the
engine and sampling parameters of a trial, the columns of the results store and the figures' axis labels.

Adding a knob: one entry here and, where a workload or the engine must read it, the `RunSettings` field that
carries it (a unit test checks both ends of every entry).

Example:
    >>> parse_knob("batch-size=1,2,4")
    ('batch-size', [1, 2, 4])
    >>> engine_fields({"batch_size": 4, "prefix_caching": None})
    {'max_num_seqs': 4}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from langchain_energy.errors import ConfigError

Target = Literal["engine", "sampling", "workload", "power", "serving"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _positive_number(text: str) -> int | float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise ValueError("must be a positive number")
    return int(value) if value.is_integer() else value  # 250 and 250.0 name one configuration


def _non_negative_number(text: str) -> int | float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise ValueError("must be a number >= 0")
    return int(value) if value.is_integer() else value


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("on", "true", "yes", "1"):
        return True
    if low in ("off", "false", "no", "0"):
        return False
    raise ValueError("must be on/off (or true/false)")


def _policy(text: str) -> str:
    from langchain_energy.scheduling import POLICIES

    low = text.strip().lower()
    if low not in POLICIES:
        raise ValueError("must be " + ", ".join(POLICIES))
    return low


def _backend(text: str) -> str:
    low = text.strip().lower()
    if low not in ("vllm", "openai", "parrot"):
        raise ValueError("must be vllm, openai or parrot")
    return low


@dataclass(frozen=True)
class Knob:
    """One knob of a trial.

    Attributes:
        name: command-line name (``--batch-size``, ``--knob batch-size=...``).
        field: the `RunSettings` field that holds the typed value.
        parse: text -> typed value; raises ValueError with a reason that starts "must be".
        target: where the value goes: engine, sampling, workload, power or serving.
        to: the `EngineConfig` field (engine knobs) or `ServingLLM` field (sampling knobs) it sets.
        unit: unit for axis labels.
        label: human label for figures.
        help: one line for the command line's help.
        engine: `EngineConfig` fields that any value of the knob needs (a knob that is not an engine knob,
            whose values all share one engine).
    """

    name: str
    field: str
    parse: Callable[[str], Any]
    target: Target
    to: str | None = None
    unit: str = ""
    label: str = ""
    help: str = ""
    engine: tuple[tuple[str, Any], ...] = ()

    @property
    def is_engine_knob(self) -> bool:
        """Whether changing this knob needs a new engine."""
        return self.target == "engine"

    @property
    def is_switch(self) -> bool:
        """Whether the knob is on/off (a bare ``--NAME`` on the command line means on)."""
        return self.parse is _bool

    def coerce(self, value: Any) -> Any:
        """The typed value of ``value`` (text, a JSON number or already typed); None stays None.

        Raises:
            ConfigError: a value this knob refuses (the message says why).
        """
        if value is None:
            return None
        text = str(value).lower() if isinstance(value, bool) else str(value)
        try:
            return self.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{self.name} {exc}, got {value!r}") from None

    def axis_label(self) -> str:
        """Label of a figure axis: ``Batch size (max_num_seqs) (requests)``."""
        return f"{self.label} ({self.unit})" if self.unit else self.label


KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob("batch-size", "batch_size", _positive_int, "engine", "max_num_seqs", "requests",
             "Batch size (max_num_seqs)", "engine batch size, vLLM max_num_seqs (default 8)"),
        Knob("max-batched-tokens", "max_batched_tokens", _positive_int, "engine", "max_num_batched_tokens",
             "tokens", "Token budget per step", "engine token budget per scheduler step (default: vLLM's)"),
        Knob("enforce-eager", "enforce_eager", _bool, "engine", "enforce_eager", "", "Eager mode (no CUDA graphs)",
             "on: run the engine eager; off: CUDA graphs and torch.compile (default: the engine's)"),
        Knob("prefix-caching", "prefix_caching", _bool, "engine", "enable_prefix_caching", "", "Prefix caching",
             "the engine's prefix cache on/off (default on)"),
        Knob("tensor-parallel", "tensor_parallel_size", _positive_int, "engine", "tensor_parallel_size", "GPUs",
             "Tensor-parallel size", "GPUs per engine, vLLM tensor_parallel_size (default 1)"),
        Knob("output-len", "output_len", _positive_int, "workload", None, "tokens", "Output length",
             "max tokens per answer (summary, search answer, code)"),
        Knob("input-len", "input_len", _positive_int, "workload", None, "tokens", "Input length",
             "summarization chunk size in tokens (study: 500-2000)"),
        Knob("users", "users", _positive_int, "workload", None, "users", "Concurrent users",
             "concurrent users: documents, sessions or tasks in flight"),
        Knob("temperature", "temperature", _non_negative_number, "sampling", "temperature", "", "Temperature",
             "sampling temperature (default 0.7)"),
        Knob("fixed-output", "ignore_eos", _bool, "sampling", "ignore_eos", "", "Fixed output length",
             "on: ignore end-of-sequence, every call generates --output-len tokens"),
        Knob("power-cap", "power_cap_w", _positive_number, "power", None, "W", "GPU power cap",
             "GPU power cap in watts (see --power-cap-mode)"),
        Knob("backend", "backend", _backend, "serving", None, "", "Serving system",
             "vllm: the managed engine (or --base-url); openai: any vLLM URL; parrot: ServeCore"),
        # Every policy runs on an engine with vLLM's priority scheduling (equal priorities are its FCFS order),
        # so a sweep over policies keeps one engine; the gate admits batch-size calls at a time.
        Knob("scheduling", "scheduling", _policy, "serving", None, "", "Workflow scheduling",
             "workflow-aware order of the engine's requests: fcfs, workflow-fcfs, least-attained, critical-path "
             "(managed engine only; any value starts it with vLLM's priority scheduling)",
             engine=(("scheduling_policy", "priority"),)),
    )
}

#: The RunSettings fields that hold knobs, in registry order.
KNOB_FIELDS: tuple[str, ...] = tuple(k.field for k in KNOBS.values())


def knob(name: str) -> Knob:
    """The knob called ``name``.

    Raises:
        ConfigError: unknown knob (the message lists the known ones).
    """
    try:
        return KNOBS[name]
    except KeyError:
        raise ConfigError(f"unknown knob {name!r}; known knobs: {', '.join(KNOBS)}") from None


def parse_knob(arg: str) -> tuple[str, list[Any]]:
    """Parse ``NAME=V1,V2,...`` into the knob name and its typed, de-duplicated values.

    Raises:
        ConfigError: no ``=``, unknown knob, empty list, an empty item or a value the knob rejects.
    """
    name, sep, rest = arg.partition("=")
    name = name.strip()
    if not sep:
        raise ConfigError(f"knob {arg!r} is malformed; write NAME=V1,V2 (e.g. batch-size=1,2,4)")
    spec = knob(name)
    if not rest.strip():
        raise ConfigError(f"knob {name!r} has an empty value list")
    values: list[Any] = []
    for item in (s.strip() for s in rest.split(",")):
        if not item:
            raise ConfigError(f"knob {name!r} has an empty item in {rest!r}")
        try:
            value = spec.parse(item)
        except ValueError as exc:
            raise ConfigError(f"knob {name!r}: value {item!r} is invalid ({exc})") from None
        if value not in values:
            values.append(value)
    return name, values


def add_knob_flags(group: Any, knobs: Iterable[Knob], help_for: Mapping[str, str] | None = None) -> None:
    """A ``--NAME VALUE`` flag for each knob (an on/off knob alone means on), stored under its field.

    The flags keep text: :meth:`Knob.coerce` types it later, so a bad value is a one-line error, not a usage dump.
    """
    for k in knobs:
        switch = {"nargs": "?", "const": "on"} if k.is_switch else {}
        group.add_argument(f"--{k.name}", dest=k.field, default=None, metavar="VALUE",
                           help=(help_for or {}).get(k.name, k.help), **switch)


def knob_values(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Every knob's typed value in a mapping of run-settings fields, by knob name (None where unset)."""
    return {k.name: k.coerce(settings.get(k.field)) for k in KNOBS.values()}


def engine_fields(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The `EngineConfig` fields that the engine knobs set in ``settings`` (unset knobs keep the engine's)."""
    fields = {k.to: settings[k.field] for k in KNOBS.values()
              if k.target == "engine" and k.to and settings.get(k.field) is not None}
    for k in KNOBS.values():
        if k.engine and settings.get(k.field) is not None:
            fields.update(k.engine)
    return fields


def sampling_fields(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling parameters that the sampling knobs set in ``settings``."""
    return {k.to: settings[k.field] for k in KNOBS.values()
            if k.target == "sampling" and k.to and settings.get(k.field) is not None}


#: The values the tuner (`chains.harness.tuner`) tries for each knob, unless ``--knob NAME=...`` says others.
#: Knobs missing here are not tuned: input length and temperature change the task, not how it is served.
#: ``output-len`` and ``users`` change what the user gets, so they are searched only where the user allows
#: (`TUNE_OPT_IN`); ``power-cap`` only where a cap can be applied; ``backend`` only where Parrot can run.
TUNE_VALUES: dict[str, tuple[Any, ...]] = {
    "batch-size": (1, 2, 4, 8, 16, 32, 64),
    "max-batched-tokens": (2048, 4096, 8192, 16384),
    "enforce-eager": (True, False),
    "prefix-caching": (True, False),
    "output-len": (64, 128, 256, 512),
    "users": (1, 2, 4, 8, 16),
    "power-cap": (200, 300, 400, 500, 700),
    "backend": ("vllm", "parrot"),
}
TUNE_OPT_IN: frozenset[str] = frozenset({"output-len", "users"})
