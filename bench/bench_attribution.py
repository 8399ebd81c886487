"""Benchmark of exact attribution over long runs: 10,000 calls on a 4-hour replayed timeline.

A replayed power trace (the replay meter, a test double, on a manual clock) is sampled at 10 Hz while up to
eight calls overlap; the handler records them. Reported: the time the handler spent recording and folding,
the time to build the tables, the ledger's largest sample buffer and the peak traced memory (for 1 h and
4 h: memory must not grow with duration), and the largest error of any call's joules against the pure
reference (`attribute` over the whole history at once). Targets: exact to 1e-9, attribution under 1 s, memory
independent of duration (the same calls over a quarter of the time for comparison).

    python -m bench.bench_attribution [--calls 10000] [--hours 4]
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import time
import tracemalloc
from uuid import uuid4

from langchain_core.outputs import Generation, LLMResult

from langchain_energy.attribution import Span, attribute
from langchain_energy.callbacks import EnergyCallbackHandler
from langchain_energy.meters import ManualClock, ReplayMeter
from langchain_energy.timeline import Timeline

EXACT_TARGET = 1e-9
TABLES_TARGET_S = 1.0


def _trace(hours: float, rng: random.Random) -> list[tuple[float, float]]:
    """Piecewise-constant GPU watts changing every 7 s, between 80 and 650 W."""
    return [(t, rng.uniform(80.0, 650.0)) for t in range(0, int(hours * 3600) + 60, 7)]


def run(calls: int, hours: float, seed: int = 0, trace_memory: bool = False) -> dict[str, float]:
    """Replay `calls` overlapping calls over `hours`; return timings (or peak memory) and the error."""
    rng = random.Random(seed)
    clock = ManualClock(0.0)
    meter = ReplayMeter({"gpu:0": _trace(hours, rng)}, clock=clock, provenance="measured:nvml")
    timeline = Timeline(meter, interval_s=0.1)
    handler = EnergyCallbackHandler(meter=meter, timeline=timeline)
    end_s = hours * 3600.0
    events: list[tuple[float, int, str, object]] = []
    for i in range(calls):
        t0 = rng.uniform(0.0, end_s - 10.0)
        events.append((t0, 1, "start", i))
        events.append((t0 + rng.uniform(0.2, 8.0), 0, "end", i))
    for k in range(1, int(end_s * 10)):
        events.append((k / 10.0, 2, "sample", None))
    heapq.heapify(events)
    ids = {i: uuid4() for i in range(calls)}
    done = LLMResult(generations=[[Generation(text="x")]])

    if trace_memory:
        tracemalloc.start()
    handler._ensure_started()
    timeline._stop.set()  # the manual clock drives sampling
    held = 0
    t_handler = 0.0
    while events:
        t, _, kind, i = heapq.heappop(events)
        clock.set(max(t, clock()))
        if kind == "sample":
            timeline.sample_now()
        else:
            s = time.perf_counter()
            if kind == "start":
                handler.on_llm_start({}, ["p"], run_id=ids[i])
            else:
                handler.on_llm_end(done, run_id=ids[i])
            t_handler += time.perf_counter() - s
        held = max(held, timeline.ledger.samples_held)
    s = time.perf_counter()
    handler._accounts()  # the split of every run and the tables' rows, computed once (then cached)
    t_attribution = time.perf_counter() - s
    s = time.perf_counter()
    df = handler.to_dataframe()
    t_tables = time.perf_counter() - s
    peak = tracemalloc.get_traced_memory()[1] if trace_memory else 0
    tracemalloc.stop()
    if trace_memory:
        handler.close()
        return {"peak_mb": peak / 1e6}

    # The reference: the pure function over every sample of the whole run, at once.
    times, cum = [0.0], [0.0]
    k = 1
    while k / 10.0 <= clock():
        times.append(k / 10.0)
        cum.append(meter.traces["gpu:0"].energy_at(k / 10.0))
        k += 1
    spans = [Span(r.run_id, r.t_start, r.t_end) for r in handler.runs]
    pure = attribute(times, {"gpu:0": cum}, spans, window=(0.0, times[-1]))
    got = dict(zip(df.run_id, df.energy_j))
    err = max(abs(got[str(s.run_id)] - pure.direct[s.run_id]["gpu:0"]) / max(pure.direct[s.run_id]["gpu:0"], 1e-12)
              for s in spans)
    handler.close()
    return {"calls": calls, "hours": hours, "handler_s": t_handler, "per_call_ms": 1e3 * t_handler / calls,
            "attribution_s": t_attribution, "tables_s": t_tables, "samples_held": held, "peak_mb": peak / 1e6, "max_rel_error": err}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=10_000, help="calls over the longest run")
    p.add_argument("--hours", type=float, default=4.0, help="length of the longest run")
    args = p.parse_args(argv)
    if args.calls < 1 or args.hours <= 0:
        p.error("--calls must be >= 1 and --hours > 0")
    import pandas  # noqa: F401  (imported before timing the tables)

    # The same calls over a quarter of the time and over all of it: what grows with duration shows.
    short = run(args.calls, args.hours / 4)
    long = run(args.calls, args.hours)
    short.update(run(args.calls, args.hours / 4, trace_memory=True))
    long.update(run(args.calls, args.hours, trace_memory=True))
    print("| attribution benchmark | short run | long run | target | met |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| calls over hours | {short['calls']} over {short['hours']:g} h | {long['calls']} over {long['hours']:g} h"
          f" | | |")
    print(f"| max relative error of a call's joules vs the pure reference | {short['max_rel_error']:.1e} | "
          f"{long['max_rel_error']:.1e} | <= {EXACT_TARGET:.0e} | "
          f"{'yes' if long['max_rel_error'] <= EXACT_TARGET else 'no'} |")
    print(f"| attribution: every run's joules and table rows from the ledger | {short['attribution_s']:.3f} s | "
          f"{long['attribution_s']:.3f} s | < {TABLES_TARGET_S:g} s | "
          f"{'yes' if long['attribution_s'] < TABLES_TARGET_S else 'no'} |")
    print(f"| then the DataFrame (to_dataframe, from the cached rows) | {short['tables_s']:.3f} s | "
          f"{long['tables_s']:.3f} s | | |")
    print(f"| handler time per call (record, sample edges, fold) | {short['per_call_ms']:.3f} ms | "
          f"{long['per_call_ms']:.3f} ms | | |")
    print(f"| ledger's largest sample buffer | {short['samples_held']} | {long['samples_held']} | "
          f"independent of duration | {'yes' if long['samples_held'] <= 2 * short['samples_held'] + 64 else 'no'} |")
    print(f"| peak traced memory (records of every call included) | {short['peak_mb']:.1f} MB | "
          f"{long['peak_mb']:.1f} MB | independent of duration | "
          f"{'yes' if long['peak_mb'] <= 1.25 * short['peak_mb'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
