"""Benchmark of the metering machinery: handler overhead per LLM call and the sampler's CPU use.

Prints a markdown table. Targets: under 0.2 ms of handler overhead per call (LangChain's fake LLM, so only the
callback machinery is timed) and under 2% of one core for the sampler at 10 Hz.

    python bench/bench_metering.py [--calls 2000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from langchain_core.language_models.fake import FakeListLLM

from langchain_energy.callbacks import EnergyCallbackHandler
from langchain_energy.meters import auto_meter
from langchain_energy.timeline import Timeline

OVERHEAD_TARGET_MS = 0.2
SAMPLER_TARGET_PCT = 2.0


def _per_call_s(llm: FakeListLLM, calls: int, config: dict | None) -> float:
    t0 = time.perf_counter()
    for i in range(calls):
        llm.invoke("prompt", config=config)
    return (time.perf_counter() - t0) / calls


def handler_overhead_ms(calls: int, rounds: int = 5) -> tuple[float, float, float]:
    """Median per-call time without and with the handler, and their difference, in ms."""
    llm = FakeListLLM(responses=["a reply of a few words"])
    meter = auto_meter()
    _per_call_s(llm, 200, None)  # warm up imports and caches
    bare, metered = [], []
    for _ in range(rounds):
        bare.append(_per_call_s(llm, calls, None))
        handler = EnergyCallbackHandler(meter=meter)
        metered.append(_per_call_s(llm, calls, {"callbacks": [handler]}))
        handler.close()
        if len(handler.runs) != calls:  # the timing means nothing unless every call was recorded
            raise RuntimeError(f"handler recorded {len(handler.runs)} of {calls} calls")
    b, m = statistics.median(bare) * 1e3, statistics.median(metered) * 1e3
    return b, m, m - b


def sampler_cpu_pct(seconds: float, interval_s: float = 0.1) -> tuple[float, int]:
    """CPU time of this (otherwise sleeping) process while the sampler runs, as % of one core."""
    tl = Timeline(auto_meter(), interval_s=interval_s)
    idle0 = time.process_time()
    time.sleep(1.0)
    baseline = time.process_time() - idle0  # what the process costs with no sampler, per second
    c0, w0 = time.process_time(), time.perf_counter()
    tl.acquire()
    time.sleep(seconds)
    tl.release()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return 100.0 * max(cpu - baseline * wall, 0.0) / wall, len(tl)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000, help="LLM calls per timing round")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds of sampling at 10 Hz")
    args = p.parse_args(argv)
    if args.calls < 1 or args.seconds <= 0:
        p.error("--calls must be >= 1 and --seconds > 0")
    bare, metered, overhead = handler_overhead_ms(args.calls)
    pct, samples = sampler_cpu_pct(args.seconds)
    prov = auto_meter().components()
    print("| metering benchmark | value | target | met |")
    print("| --- | --- | --- | --- |")
    print(f"| fake LLM call, no handler | {bare:.3f} ms | | |")
    print(f"| fake LLM call, with EnergyCallbackHandler | {metered:.3f} ms | | |")
    print(f"| handler overhead per call | {overhead:.3f} ms | < {OVERHEAD_TARGET_MS} ms | "
          f"{'yes' if overhead < OVERHEAD_TARGET_MS else 'no'} |")
    print(f"| sampler CPU at 10 Hz ({samples} samples in {args.seconds:.0f} s) | {pct:.2f} % of one core | "
          f"< {SAMPLER_TARGET_PCT} % | {'yes' if pct < SAMPLER_TARGET_PCT else 'no'} |")
    print(f"\nmeter: {', '.join(f'{k}={v}' for k, v in prov.items()) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
