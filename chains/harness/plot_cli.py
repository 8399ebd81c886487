"""``python -m chains.run plot DIR``: draw the study's figures from a results directory and print the table.

Example:
    python -m chains.run plot results/search-batch --out figures/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import pandas as pd

from chains.harness.plots import render_all
from chains.harness.store import ResultStore
from chains.harness.tables import shown_columns
from langchain_energy.errors import EnergyError

TABLE_COLUMNS = ["workload", "backend", "knob", "value", "status", "n", "latency_s_mean", "latency_s_ci",
                 "throughput_tok_s_mean", "energy_j_mean", "energy_j_ci", "energy_per_token_j_mean",
                 "cache_hit_rate_mean", "power_cap_w", "power_cap_mode", "provenance", "reason"]


def main(argv: Sequence[str] | None = None) -> int:
    """Render every figure the store has data for; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m chains.run plot", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results directory written by the sweep command")
    p.add_argument("--out", default=None, help="where the PNG files go (default: RESULTS/figures)")
    p.add_argument("--csv", default=None, help="also write the per-configuration table (mean, 95%% CI) here")
    args = p.parse_args(argv)
    try:
        figures = render_all(args.results, args.out)
        agg = ResultStore(args.results).aggregate()
    except EnergyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.csv:
        agg.to_csv(args.csv, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(agg[shown_columns(agg, TABLE_COLUMNS)].to_string(index=False))
    for name, where in figures.items():
        print(f"{name}: {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
