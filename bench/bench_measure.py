"""``measure`` on a small user app: the two-node LangGraph app shipped in ``examples/two_node_app``, on the
embedded engine, as a user runs it (the command line, the app unchanged).

Runs ``python -m chains.run measure examples/two_node_app/graph.py:make_graph --inputs ...`` into a temporary
folder and reads back what it wrote: the command's wall time (engine start included), the calls recorded per
node, latency, tokens/s and energy with its provenance. Prints a markdown table.

Run: ``python -m bench.bench_measure``
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

APP = Path(__file__).resolve().parents[1] / "examples" / "two_node_app"
USERS, OUTPUT_LEN, REPEATS = 2, 48, 2


def main() -> int:
    inputs = APP / "questions.jsonl"
    n_inputs = sum(1 for line in inputs.read_text().splitlines() if line.strip())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "measure"
        cmd = [sys.executable, "-m", "chains.run", "measure", f"{APP}/graph.py:make_graph", "--inputs", str(inputs),
               "--users", str(USERS), "--output-len", str(OUTPUT_LEN), "--repeats", str(REPEATS),
               "--no-progress", "--out", str(out)]
        started = time.monotonic()
        run = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.monotonic() - started
        if run.returncode != 0:
            print(run.stderr[-2000:], file=sys.stderr)
            return 1
        runs, summary = pd.read_csv(out / "runs.csv"), pd.read_csv(out / "summary.csv")
        meta = json.loads((out / "metadata.json").read_text())
    llm = runs[runs["kind"].isin(("llm", "chat_model"))]  # the app's calls are chat-model calls
    per_node = llm.groupby("langgraph_node").size().div(REPEATS)
    expected = 2 * n_inputs  # two nodes, one chat call each, per input
    calls = len(llm) / REPEATS
    mean = summary.mean(numeric_only=True)
    rows = [
        ("command", f"`python -m chains.run measure examples/two_node_app/graph.py:make_graph --inputs "
                    f"examples/two_node_app/questions.jsonl --users {USERS} --output-len {OUTPUT_LEN} "
                    f"--repeats {REPEATS}`", ""),
        ("wall time of the command (engine start and both trials)", f"{wall:.1f} s", ""),
        ("inputs, workflows per trial", f"{n_inputs}, {len(summary) // REPEATS}", "one workflow over the inputs"),
        ("LLM calls per trial (by node)", f"{calls:g} ("
         + ", ".join(f"{node}: {count:g}" for node, count in per_node.items()) + ")",
         f"{expected} (2 nodes x {n_inputs} inputs): {'yes' if calls == expected else 'no'}"),
        ("trial latency, mean of 2", f"{mean['latency_s']:.2f} s", ""),
        ("tokens/s, mean of 2", f"{mean['throughput_tok_s']:.1f}", ""),
        ("energy per trial, mean of 2", f"{mean['energy_j']:.1f} J ({mean['energy_per_token_j']:.3f} J/token)", ""),
        ("energy provenance", "; ".join(meta.get("provenance", [])), ""),
    ]
    print("| measure benchmark | value | target |")
    print("| --- | --- | --- |")
    for name, value, target in rows:
        print(f"| {name} | {value} | {target} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
