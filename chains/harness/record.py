"""One trial as the results store keeps it, and the reader of every trial format written so far.

Format 2 (written now) holds each knob's typed value once, in ``knobs`` (knob name -> value); ``swept``
names the knobs the sweep set for this trial (the swept one and the crossed ones), ``knob`` the swept one.
Format 1 (the committed H100 stores) held the value six times: ``value``, ``assign``, ``settings``, and the
meta's settings, resolved settings and engine; :func:`from_json` reads it into format 2 without rewriting
the file.

Example:
    >>> rec = TrialRecord(key="k", workload="search", knob="batch-size", repeat=0,
    ...                   knobs={"batch-size": 4}, swept=["batch-size"])
    >>> rec.value, rec.assign
    (4, {'batch-size': 4})
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chains.harness.knobs import KNOB_FIELDS, KNOBS, knob_values
from langchain_energy.errors import DataError

FORMAT = 2
STATUS_OK = "ok"
STATUS_INFEASIBLE = "infeasible"
STATUS_FAILED = "failed"  # its worker died twice (a Ray sweep); ``reason`` says how


@dataclass
class TrialRecord:
    """One finished trial (or one infeasible configuration's repeat).

    Attributes:
        key: unique name of (workload, configuration, repeat); also the file name.
        workload: workload name.
        knob: the swept knob.
        repeat: repeat index from 0.
        knobs: every knob's typed value in this trial, by knob name (None: the preset's or engine's default).
        swept: the knobs the sweep set for this trial (the swept one and the crossed ones).
        status: ``"ok"``, ``"infeasible"`` or ``"failed"`` (a Ray worker died on it twice).
        reason: why a configuration is infeasible or failed (empty when ok).
        settings: the other run settings (sizes, model, preset, seed; no knob).
        summary: workflow rows (the energy handler's summary columns).
        runs: per-call rows.
        timeline: utilization/power samples if recorded.
        meta: anything else the trial reported (wall time, engine counters, power-cap mode, ...); a trial run
            by a Ray worker adds ``node`` (its host name), ``gpus`` (the node's GPU indices its engine used),
            ``started_at``/``ended_at`` (Unix times) and ``attempt`` (1, or 2 after a worker died).
        finished_at: when the trial was written (Unix time).
        format: the trial format (2).
    """

    key: str
    workload: str
    knob: str
    repeat: int
    knobs: dict[str, Any] = field(default_factory=dict)
    swept: list[str] = field(default_factory=list)
    status: str = STATUS_OK
    reason: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    finished_at: float = field(default_factory=time.time)
    format: int = FORMAT

    @property
    def value(self) -> Any:
        """The swept knob's value."""
        return self.knobs.get(self.knob)

    @property
    def assign(self) -> dict[str, Any]:
        """Every knob the sweep set for this trial, with its value (what the trial's key is made of)."""
        return {name: self.knobs.get(name) for name in self.swept}


def split_settings(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run-settings fields into (knob values by knob name, typed; the other fields)."""
    return knob_values(settings), {k: v for k, v in settings.items() if k not in KNOB_FIELDS}


def from_json(data: Mapping[str, Any]) -> TrialRecord:
    """A trial file's content as a record, whichever format wrote it.

    Raises:
        DataError: a format this version cannot read.
    """
    version = data.get("format", 1)
    if version == FORMAT:
        return TrialRecord(**{k: v for k, v in data.items()})
    if version == 1:
        return _from_format_1(data)
    raise DataError(f"trial {data.get('key')!r} has format {version!r}; this version reads formats 1 and 2")


# Format-1 meta entries that repeated the settings (and, for the engine, the engine knobs' values).
_FORMAT_1_REPEATS = ("settings", "resolved")


def _from_format_1(data: Mapping[str, Any]) -> TrialRecord:
    """Format 1: knob values came from ``settings``; ``value`` and ``assign`` repeated them as text or numbers."""
    knobs, settings = split_settings(data.get("settings") or {})
    assign = dict(data.get("assign") or {})
    for name, value in assign.items():  # a crossed knob missing from the settings (never seen, but cheap)
        if name in KNOBS and knobs.get(name) is None:
            knobs[name] = KNOBS[name].coerce(value)
    meta = {k: v for k, v in (data.get("meta") or {}).items() if k not in _FORMAT_1_REPEATS}
    return TrialRecord(
        key=data["key"], workload=data["workload"], knob=data["knob"], repeat=data["repeat"], knobs=knobs,
        swept=list(assign), status=data.get("status", STATUS_OK), reason=data.get("reason", ""),
        settings=settings, summary=data.get("summary") or [], runs=data.get("runs") or [],
        timeline=data.get("timeline") or [], meta=meta, finished_at=data.get("finished_at", 0.0), format=FORMAT,
    )
