"""One measured session of the ``run`` and ``measure`` commands: the power cap held, the engine up, the
trials run one after another, and the tables and metadata written (atomically) to the output directory.

Example:
    >>> power_cap_line(300, "dry-run")
    'power cap: 300 W, recorded only, NOT applied (dry run)'
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from chains.harness.progress import CallProgress
from chains.harness.store import write_json_atomic, write_text_atomic
from langchain_energy.power import PowerCap

#: A trial of the session: (the model, the repeat index, the progress bar) -> a `TrialResult`.
TrialFn = Callable[[Any, int, CallProgress], Any]


@dataclass
class Session:
    """What a session measured: every trial's calls and workflows (tagged with ``repeat``) and metadata."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    trials: list[dict[str, Any]] = field(default_factory=list)
    power: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] | None = None


def output_dir(out: str | None, name: str) -> Path:
    """The output directory (made now): ``--out``, or ``results/<name>-<time>``."""
    path = Path(out or f"results/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_session(
    trial: TrialFn,
    make_llm: Callable[[Any], Any],
    *,
    server: Any,
    power_cap: PowerCap,
    power_cap_w: float | None,
    repeats: int,
    expected_calls: int | None,
    show_progress: bool = True,
) -> Session:
    """Hold the power cap, start the engine (when managed), run ``repeats`` trials, stop it whatever happens.

    Args:
        trial: runs one trial.
        make_llm: the served model from the started engine (``server``, None with a URL backend).
        server: a managed `VLLMServer` to start and stop, or None.
        power_cap: the session's power cap (checked already by its ``preflight``).
        power_cap_w: the cap to set or record; None for none.
        repeats: how many trials; the prefix cache is reset between them.
        expected_calls: LLM calls per trial, for the progress bar (None: unknown).
        show_progress: draw the progress bar.
    """
    runs, summaries, trials = [], [], []
    with power_cap as cap:
        if power_cap_w is not None:
            cap.set(power_cap_w)
        try:
            if server is not None:
                print("starting the engine ...", file=sys.stderr)
                server.start()
            llm = make_llm(server)
            for repeat in range(repeats):
                if server is not None and repeat:
                    server.reset_prefix_cache()  # independent trials: no cache carried over
                before = server.metrics() if server is not None else None
                progress = CallProgress(total=expected_calls, desc=f"trial {repeat + 1}/{repeats}",
                                        disable=not show_progress)
                try:
                    result = trial(llm, repeat, progress)
                finally:
                    progress.close()
                if server is not None:
                    result.meta["engine_metrics"] = (server.metrics() - before).to_dict()
                runs.append(result.runs.assign(repeat=repeat))
                summaries.append(result.summary.assign(repeat=repeat))
                trials.append(result.meta)
        finally:
            if server is not None:
                server.stop()
        power = {"requested_w": power_cap_w, "mode": cap.mode,
                 "applied": power_cap_w is not None and cap.mode == "applied",
                 "events": [vars(e) for e in cap.events]}
    return Session(runs=pd.concat(runs, ignore_index=True), summary=pd.concat(summaries, ignore_index=True),
                   trials=trials, power=power, engine=server.config.to_dict() if server is not None else None)


def write_session(out: Path, session: Session, meta: dict[str, Any]) -> None:
    """``runs.csv``, ``summary.csv`` and ``metadata.json`` (versions, hardware, power cap, trials) in ``out``."""
    from chains.harness import metadata

    write_text_atomic(out / "runs.csv", session.runs.to_csv(index=False))
    write_text_atomic(out / "summary.csv", session.summary.to_csv(index=False))
    summary = session.summary
    full = {
        **meta,
        "versions": metadata.versions(),
        "hardware": metadata.hardware(),
        "power_cap": session.power,
        "provenance": sorted(set(summary["provenance"])) if "provenance" in summary.columns else [],
        "trials": session.trials,
        "files": {"runs": "runs.csv", "summary": "summary.csv"},
    }
    write_json_atomic(out / "metadata.json", full, indent=2, default=str, sort_keys=False)


SUMMARY_COLUMNS = [
    ("workflow", "workflow"), ("repeat", "rep"), ("llm_calls", "calls"), ("latency_s", "latency_s"),
    ("throughput_tok_s", "tok/s"), ("energy_j", "energy_J"), ("energy_cpu_j", "cpu_J"), ("energy_gpu_j", "gpu_J"),
    ("energy_dram_j", "dram_J"), ("energy_per_token_j", "J/token"), ("cache_hit_rate", "cache_hit"),
]


def format_summary(summary: pd.DataFrame) -> str:
    """The summary table a command prints, plus the provenance line(s)."""
    cols = [(c, h) for c, h in SUMMARY_COLUMNS if c in summary.columns]
    table = summary[[c for c, _ in cols]].rename(columns=dict(cols))
    text = table.to_string(index=False, float_format=lambda x: "nan" if math.isnan(x) else f"{x:.4g}")
    provs = sorted(set(summary["provenance"])) if "provenance" in summary.columns else []
    return text + "".join(f"\nprovenance: {p}" for p in provs)


def power_cap_line(watts: float, mode: str) -> str:
    """How a summary names a power cap: never as applied unless it was."""
    how = {"applied": "applied", "simulated": "set on a simulated GPU, NOT on a real one"}
    return f"power cap: {watts:g} W, {how.get(mode, 'recorded only, NOT applied (dry run)')}"


def print_session(out: Path, session: Session) -> None:
    """The summary table, the power cap's line and where the files went."""
    print(format_summary(session.summary))
    if session.power.get("requested_w") is not None:
        print(power_cap_line(session.power["requested_w"], session.power["mode"]))
    print(f"wrote {out / 'runs.csv'}, {out / 'summary.csv'}, {out / 'metadata.json'}", file=sys.stderr)
