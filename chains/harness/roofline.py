"""GPU energy per token of a search store's best configuration against the decode roofline floor."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from chains.harness.store import ResultStore, write_json_atomic
from langchain_energy.ledger import CALL_KINDS

# Decode roofline: every step reads all weights once; memory bandwidth bounds the step time.
LLAMA2_7B_SHAPE_PARAMS = 2 * 49152 * 4096 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096


def gpu_facts() -> dict[str, Any] | None:
    """Name, memory bandwidth (bytes/s) and power limit (W) of GPU 0, read through NVML; None without one."""
    try:
        import pynvml as nvml

        nvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML, no GPU
        return None
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    mem_clock_hz = nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM) * 1e6
    bus_bits = nvml.nvmlDeviceGetMemoryBusWidth(handle)
    name = nvml.nvmlDeviceGetName(handle)
    return {"name": name.decode() if isinstance(name, bytes) else name,
            "bandwidth_bytes_s": mem_clock_hz * 2 * bus_bits / 8,  # double data rate
            "power_limit_w": nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000}


def roofline(trials: pd.DataFrame, runs: pd.DataFrame, facts: dict[str, Any]) -> dict[str, Any] | None:
    """GPU energy per token of a search store's best configuration against the decode roofline floor.

    The floor is the energy of one decode step at the roofline (the fp16 weights streamed from memory once,
    at the board's power limit) shared by the sequences actually in flight.

    Args:
        trials: the store's trial rows (``ResultStore.load_trials``).
        runs: the store's per-call rows (``ResultStore.load_runs``).
        facts: ``bandwidth_bytes_s`` and ``power_limit_w`` of the GPU (see `gpu_facts`).

    Returns:
        The report, or None when no trial finished.
    """
    ok = trials[(trials["status"] == "ok") & (trials["completion_tokens"] > 0)]
    if ok.empty:
        return None
    per_token = ok.assign(gpu_j_per_token=ok["energy_gpu_j"] / ok["completion_tokens"])
    per_config = per_token.groupby(["knob", "value"])["gpu_j_per_token"].agg(["mean", "std", "count"])
    knob, value = per_config["mean"].idxmin()
    value = value.item() if hasattr(value, "item") else value  # a numpy scalar would be written as text
    best = per_config.loc[(knob, value)]
    llm = runs[runs["kind"].isin(CALL_KINDS) & (runs["knob"] == knob) & (runs["value"] == value)]
    # Mean sequences in flight: the decode batch actually realised (call-seconds over wall seconds).
    in_flight = llm.groupby("key").apply(
        lambda r: (r["t_end"] - r["t_start"]).sum() / (r["t_end"].max() - r["t_start"].min()), include_groups=False)
    batch = float(in_flight.mean())
    step_s = LLAMA2_7B_SHAPE_PARAMS * 2 / facts["bandwidth_bytes_s"]  # fp16 weights read once per step
    floor = step_s * facts["power_limit_w"] / batch
    return {"best_config": {"knob": knob, "value": value}, "gpu_energy_per_token_j": float(best["mean"]),
            "gpu_energy_per_token_sd_j": float(best["std"]), "repeats": int(best["count"]),
            "mean_sequences_in_flight": batch, "weight_bytes": LLAMA2_7B_SHAPE_PARAMS * 2, "roofline_step_s": step_s,
            "floor_j_per_token": floor, "ratio": float(best["mean"]) / floor, "target": 2.0}


def roofline_part(out: Path, parts: Sequence[str]) -> str:
    """The roofline report of each search store among ``parts``, and the best of them; writes roofline.json."""
    facts = gpu_facts()
    if facts is None:
        return "roofline: no GPU, skipped"
    reports = {}
    for part in parts:
        if (out / part / "sweep.json").exists():
            store = ResultStore(out / part)
            report = roofline(store.load_trials(), store.load_runs(), facts)
            if report is not None:
                reports[part] = report
    if not reports:
        return "roofline: no finished search trial here, skipped"
    best_part = min(reports, key=lambda part: reports[part]["gpu_energy_per_token_j"])
    best = reports[best_part]
    write_json_atomic(out / "roofline.json", {"gpu": facts, "best": best_part, **reports}, indent=2, default=str,
                      sort_keys=False)
    return (f"roofline: best {best_part} {best['best_config']['knob']}={best['best_config']['value']} "
            f"{best['gpu_energy_per_token_j']:.3f} GPU J/token, floor {best['floor_j_per_token']:.3f} J/token at "
            f"{best['mean_sequences_in_flight']:.1f} sequences in flight, ratio {best['ratio']:.2f}")
