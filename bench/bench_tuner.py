"""The tuner on the committed H100 stores used as an oracle: how close it gets to the grid's optimum.

For each grid, the tuner (seeds 0-9) measures at most a third of the grid's configurations (each with the
same repeats as the grid); its best energy meeting the SLO is compared with the grid's optimum under the same
SLO. Target: the median over the seeds within 5% of the optimum. Prints a markdown table.

Run: ``python -m bench.bench_tuner``
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from chains.harness.tuner import RecordedObjective, parse_slo, tune

ROOT = Path(__file__).resolve().parents[1] / "docs" / "results" / "gpu-h100"
SEEDS = range(10)
TARGET = 0.05
# (name, stores, workload, trials held fixed, SLO)
GRIDS = (
    ("search: batch size x CUDA graphs", ("search-batch", "search-graphs"), "search", {}, None),
    ("search: same, p90 latency <= 10 s", ("search-batch", "search-graphs"), "search", {}, "p90_latency_s<=10"),
    ("summarize: batch size x backend", ("systems",), "summarize", {"input-len": 1000, "output-len": 128}, None),
)


def run_grid(stores, workload, where, slo_text) -> tuple[int, int, float, list[float]]:
    """Grid size, tuner budget, grid optimum and the tuner's best per seed (relative excess over the optimum)."""
    slo = parse_slo(slo_text) if slo_text else None
    paths = [str(ROOT / s) for s in stores]
    with tempfile.TemporaryDirectory() as tmp:
        grid = RecordedObjective(paths, workload, Path(tmp) / "grid", where=where).grid()
    feasible = [e for e in grid if e.ok and (slo is None or slo.met(e.metric(slo.metric)))]
    optimum = min(e.metric("energy_j") for e in feasible)
    budget = len(grid) // 3
    excess = []
    for seed in SEEDS:
        with tempfile.TemporaryDirectory() as tmp:
            obj = RecordedObjective(paths, workload, tmp, where=where)
            result = tune(obj, tmp, "energy", slo, trials=budget, seed=seed)
            best = result.winner.metric("energy_j") if result.winner else math.inf
            excess.append(best / optimum - 1)
    return len(grid), budget, optimum, excess


def main() -> int:
    print("| grid | configurations | tuner trials (max) | grid optimum (J) | median excess over optimum (10 seeds) "
          "| worst seed | target | met |")
    print("|---|---|---|---|---|---|---|---|")
    started = time.monotonic()
    for name, stores, workload, where, slo in GRIDS:
        size, budget, optimum, excess = run_grid(stores, workload, where, slo)
        median = statistics.median(excess)
        met = median <= TARGET and budget <= size / 3
        print(f"| {name} | {size} | {budget} | {optimum:.0f} | {100 * median:.1f}% | {100 * max(excess):.1f}% "
              f"| within {100 * TARGET:.0f}% with <= 1/3 of the trials | {'yes' if met else 'no'} |")
    print(f"\nOracle: committed H100 stores under docs/results/gpu-h100 (llama2-7b-shape); "
          f"TPE, default configuration first; {time.monotonic() - started:.0f} s.")
    return 0  # a target missed is a result (the met column), not a broken benchmark


if __name__ == "__main__":
    sys.exit(main())
