"""The results store of a sweep: one JSON file per finished trial, written atomically, and the sweep's identity.

Layout of a results directory::

    DIR/sweep.json             what the sweep is (workloads, knobs and values, repeats, fixed settings)
    DIR/trials/<key>.json      one finished trial (`chains.harness.record`): knob values, status, rows, timeline

A trial file is written to a temporary name and renamed into place (``os.replace``), so a killed sweep
leaves either the whole trial or nothing; rerunning the same sweep skips the keys already present.

Example:
    >>> import tempfile
    >>> store = ResultStore(tempfile.mkdtemp())
    >>> store.init(SweepSpec(workloads=["search"], knobs={"batch-size": [1, 2]}, repeats=2))
    >>> store.done_keys()
    set()
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from chains.harness.record import TrialRecord, from_json
from chains.harness.stats import aggregate
from chains.harness.tables import load_workflows, tagged, trial_metrics
from langchain_energy.errors import ConfigError, DataError

SCHEMA_VERSION = 1  # of sweep.json; trial files carry their own format (chains.harness.record)


class StoreLockedError(ConfigError):
    """Another live process is writing to this results directory."""


class SweepMismatchError(ConfigError):
    """A results directory already holds a different sweep; use another directory or the same command."""


@dataclass
class SweepSpec:
    """The identity of a sweep. A results directory holds exactly one.

    Attributes:
        workloads: workload names, in run order.
        knobs: knob name -> values swept one knob at a time (others at their defaults).
        repeats: trials per configuration.
        across: knob name -> values crossed with every swept configuration (e.g. ``backend``).
        fixed: settings held constant for the whole sweep (model, preset, engine arguments, ...).

    Example:
        >>> SweepSpec(workloads=["search"], knobs={"batch-size": [1, 2]}, repeats=3).repeats
        3
    """

    workloads: list[str]
    knobs: dict[str, list[Any]]
    repeats: int
    across: dict[str, list[Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.workloads:
            raise ConfigError("a sweep needs at least one workload")
        if not self.knobs:
            raise ConfigError("a sweep needs at least one knob (e.g. --knob batch-size=1,2,4)")
        for name, values in {**self.knobs, **self.across}.items():
            if not values:
                raise ConfigError(f"knob {name!r} has an empty value list")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ConfigError(f"repeats must be a positive integer, got {self.repeats!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, normalised by a JSON round trip so two equal sweeps compare equal."""
        return json.loads(json.dumps({"schema": SCHEMA_VERSION, **asdict(self)}, sort_keys=True, default=str))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepSpec:
        """Rebuild a spec from :meth:`to_dict` output."""
        body = {k: v for k, v in data.items() if k != "schema"}
        return cls(**body)


def _extends(wanted: Mapping[str, Any], have: Mapping[str, Any]) -> bool:
    """Whether sweep ``wanted`` contains every configuration and repeat of sweep ``have`` (both ``to_dict``)."""
    same = ("schema", "workloads", "fixed")
    if any(wanted.get(k) != have.get(k) for k in same) or wanted["repeats"] < have["repeats"]:
        return False
    if set(wanted["across"]) != set(have["across"]):  # an across knob is part of every trial's key
        return False
    grown = {**wanted["knobs"], **wanted["across"]}
    old = {**have["knobs"], **have["across"]}
    return all(name in grown and all(v in grown[name] for v in values) for name, values in old.items())


def trial_key(workload: str, assign: Mapping[str, Any], repeat: int) -> str:
    """A readable, file-safe key for one trial, e.g. ``search__batch-size=4__r003``."""
    parts = [workload] + [f"{k}={_fmt(v)}" for k, v in sorted(assign.items())] + [f"r{repeat:03d}"]
    # No leading dot (a target such as ./app.py:graph): dot files are the store's unfinished writes.
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "__".join(parts)).lstrip(".")


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _jsonable(obj: Any) -> Any:
    """Turn numpy scalars, NaN, timestamps and tuples into plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, TypeError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def frame_records(df: pd.DataFrame | None) -> list[dict[str, Any]]:
    """A DataFrame as JSON-ready records (empty list for None)."""
    if df is None or len(df) == 0:
        return []
    return _jsonable(df.to_dict(orient="records"))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that readers see the old file or the new one, never a part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any, **dump_options: Any) -> None:
    """Write ``data`` as JSON, atomically (see `write_text_atomic`).

    ``dump_options`` go to `json.dumps` (keys are sorted unless ``sort_keys=False``).
    """
    write_text_atomic(path, json.dumps(data, **{"sort_keys": True, **dump_options}))


class ResultStore:
    """An append-only store of trials in a directory.

    Args:
        path: the results directory (created on :meth:`init`).

    Example:
        >>> import tempfile
        >>> store = ResultStore(tempfile.mkdtemp())
        >>> store.init(SweepSpec(workloads=["search"], knobs={"output-len": [8]}, repeats=1))
        >>> _ = store.append(TrialRecord(key="k", workload="search", knob="output-len", repeat=0))
        >>> sorted(store.done_keys())
        ['k']
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.trials_dir = self.path / "trials"
        self.spec_path = self.path / "sweep.json"

    # -- one writer ------------------------------------------------------------------------------------
    @contextmanager
    def writer(self) -> Iterator[ResultStore]:
        """Hold the store's lock while trials are written: a second sweep on the same directory is refused.

        The lock is an OS file lock (``flock``) on ``.lock`` in the directory, which the kernel drops when its
        process dies, so the lock of a killed sweep never blocks a resume.

        Raises:
            StoreLockedError: another live process holds the store (its PID and command are named).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_path.read_text(errors="replace").strip() or "another process"
                raise StoreLockedError(f"{self.path} is in use by {holder}; wait for it to finish or choose "
                                       "another --out directory") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} ({' '.join(sys.argv[:4])})".encode())
            yield self
        finally:
            os.close(fd)  # closing drops the flock

    # -- identity -------------------------------------------------------------------------------------
    def init(self, spec: SweepSpec) -> None:
        """Create the store for ``spec``, or check that the directory already holds this same sweep.

        A spec that only extends the stored one (more values of a knob, another knob, more repeats; the same
        workloads, ``across`` knobs and fixed settings) replaces it: the finished trials are the same
        configurations and count toward it, so a finished sweep can grow without rerunning anything.

        Raises:
            SweepMismatchError: the directory holds a different sweep (nothing is changed).
            ConfigError: the path exists and is not a directory.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"results path {self.path} exists and is not a directory")
        wanted = spec.to_dict()
        if self.spec_path.exists():
            have = self._read_spec_dict()
            if have == wanted:
                return
            if not _extends(wanted, have):
                diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
                raise SweepMismatchError(
                    f"{self.path} holds a different sweep (differs in: {', '.join(diff)}); "
                    "rerun the same command to resume it, or choose another --out directory"
                )
            write_json_atomic(self.spec_path, wanted)
            return
        if self.trials_dir.exists() and any(self.trials_dir.glob("*.json")):
            raise SweepMismatchError(f"{self.path} holds trials but no sweep.json; choose another --out directory")
        write_json_atomic(self.spec_path, wanted)

    def _read_spec_dict(self) -> dict[str, Any]:
        try:
            return json.loads(self.spec_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {self.spec_path}: {exc}") from exc

    def spec(self) -> SweepSpec:
        """The sweep this store holds.

        Raises:
            DataError: no readable sweep.json in the directory.
        """
        if not self.spec_path.exists():
            raise DataError(f"{self.path} is not a results directory (no sweep.json); run a sweep with --out first")
        return SweepSpec.from_dict(self._read_spec_dict())

    # -- writing ---------------------------------------------------------------------------------------
    def append(self, record: TrialRecord) -> Path:
        """Write one trial atomically. A key already present is an error (trials are never overwritten)."""
        target = self.trials_dir / f"{record.key}.json"
        if target.exists():
            raise DataError(f"trial {record.key} is already in {self.path}; the store is append-only")
        write_json_atomic(target, _jsonable(asdict(record)))
        return target

    def done_keys(self) -> set[str]:
        """Keys of the trials already stored (finished or recorded infeasible)."""
        if not self.trials_dir.exists():
            return set()
        return {p.stem for p in self.trials_dir.glob("*.json") if not p.name.startswith(".")}

    # -- reading ---------------------------------------------------------------------------------------
    def records(self) -> list[TrialRecord]:
        """Every stored trial, in key order. Leftover temporary files of a killed write are ignored."""
        out = []
        for p in sorted(self.trials_dir.glob("*.json")) if self.trials_dir.exists() else []:
            if p.name.startswith("."):
                continue
            try:
                out.append(from_json(json.loads(p.read_text())))
            except (OSError, json.JSONDecodeError, TypeError, KeyError) as exc:
                raise DataError(f"trial file {p} is unreadable: {exc}") from exc
        return out

    def load(self) -> pd.DataFrame:
        """Workflow rows of every trial as a tidy DataFrame; an infeasible trial is one row with its reason."""
        return load_workflows(self.records())

    def load_trials(self) -> pd.DataFrame:
        """One row per trial with the per-trial metrics that :func:`aggregate` averages."""
        return trial_metrics(self.records())

    def load_runs(self) -> pd.DataFrame:
        """Per-call rows of every trial, tagged with the trial's configuration."""
        return tagged(self.records(), "runs")

    def load_timeline(self) -> pd.DataFrame:
        """Utilization/power samples of every trial that recorded them, tagged with the configuration."""
        return tagged(self.records(), "timeline")

    def aggregate(self) -> pd.DataFrame:
        """Mean and 95% CI per configuration (see :func:`aggregate`)."""
        return aggregate(self.load_trials(), extra_keys=list(self.spec().across))


