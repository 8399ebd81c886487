"""What limits workflow scheduling: the client's gap between a workflow's calls, with and without metering.

A gate that admits ``max_num_seqs`` calls keeps the engine full only while each workflow's next call follows
its last one at once; the time between them (the client's gap) idles the slot. This probe serves the
scheduling study's composite load (documents plus search sessions, all started at once) on one engine and
reports, per arm, the gap between a workflow's consecutive calls, the mean workflow completion time, the
engine's steps and tokens per step, and the load's GPU joules from two reads of NVML's energy counter
(``measured:nvml`` over the whole load, no per-call split; absent without a GPU). Arms:

- ``fcfs+handler``: vLLM FCFS with `EnergyCallbackHandler` metering every call (what a study trial does);
- ``fcfs``, ``workflow-fcfs``, ``workflow-fcfs/no-keep``: no energy handler, only a timestamp recorder
  (an async handler, so it costs the event loop no thread hop), under FCFS, under the gate keeping a freed
  slot for the workflow's next call (``handoff_s`` 0.25) and under the gate without keeping (``handoff_s`` 0).

It also times one read of the energy handler's default meter. Every number is printed and written as JSON:

    python -m bench.scheduling_gaps --docs 4 --queries 4 --batch 4 --output-len 16 --repeats 1   # CPU
    python -m bench.scheduling_gaps --model llama2-7b-shape --out gaps.json                       # one GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler

from chains.harness.inputs import prepare_inputs
from chains.harness.scheduling_study import document_pieces
from chains.harness.settings import RunSettings
from chains.harness.trial import _run_coroutine, build_workloads, run_jobs
from langchain_energy import ChatServing, EnergyCallbackHandler, EngineConfig, VLLMServer
from langchain_energy.scheduling import WorkflowScheduler


class Stamps(AsyncCallbackHandler):
    """Start and end time of every run (parent links kept), on the event loop itself."""

    def __init__(self) -> None:
        self.runs: dict[UUID, dict[str, Any]] = {}

    def _start(self, run_id: UUID, parent: UUID | None, name: str, call: bool) -> None:
        self.runs[run_id] = {"parent": parent, "name": name, "call": call, "t0": time.monotonic(), "t1": None}

    def _end(self, run_id: UUID) -> None:
        if run_id in self.runs:
            self.runs[run_id]["t1"] = time.monotonic()

    async def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, **kw) -> None:
        self._start(run_id, parent_run_id, kw.get("name") or (serialized or {}).get("name", "chain"), False)

    async def on_chain_end(self, outputs, *, run_id, **kw) -> None:
        self._end(run_id)

    async def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None, **kw) -> None:
        self._start(run_id, parent_run_id, "call", True)

    async def on_llm_end(self, response, *, run_id, **kw) -> None:
        self._end(run_id)

    def workflow_stats(self) -> dict[str, float]:
        """Mean gap between a workflow's consecutive calls, and mean workflow completion from the first start."""
        roots = {r for r, v in self.runs.items() if v["parent"] is None}
        t0 = min(v["t0"] for v in self.runs.values())

        def workflow(run_id: UUID) -> UUID:
            while self.runs[run_id]["parent"] not in roots:
                run_id = self.runs[run_id]["parent"]
            return run_id

        calls: dict[UUID, list[tuple[float, float]]] = {}
        for run_id, v in self.runs.items():
            if v["call"] and v["t1"] is not None:
                calls.setdefault(workflow(run_id), []).append((v["t0"], v["t1"]))
        gaps = [b[0] - a[1] for spans in calls.values() for a, b in zip(sorted(spans), sorted(spans)[1:])]
        done = [self.runs[w]["t1"] - t0 for w in calls if self.runs[w]["t1"] is not None]
        return {"calls": sum(len(s) for s in calls.values()), "gap_mean_s": statistics.mean(gaps),
                "gap_p50_s": statistics.median(gaps), "completion_mean_s": statistics.mean(done),
                "wall_s": max(done)}


def _nvml_mj() -> Any:
    """A reader of the first GPU's energy counter in millijoules, or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:
        return None


def _read_ms(read: Any, n: int = 200) -> float:
    read()
    t = time.perf_counter()
    for _ in range(n):
        read()
    return (time.perf_counter() - t) / n * 1e3


async def _unmetered(jobs: list[tuple[str, Any, Any]], callbacks: list[Any]) -> list[Any]:
    return await asyncio.gather(*(wl.ainvoke(data, config={"callbacks": callbacks, "run_name": name})
                                  for name, wl, data in jobs))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scheduling_gaps", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--eager", action="store_true", help="run the engine eager (default: CUDA graphs on a GPU)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()

    gpu_mj = _nvml_mj()
    with EnergyCallbackHandler() as probe:
        reads = {"handler_meter_read_ms": _read_ms(probe.timeline.meter.read)}
    if gpu_mj is not None:
        reads["nvml_energy_read_ms"] = _read_ms(gpu_mj)
    print(json.dumps(reads), flush=True)

    folder = Path(args.out).parent if args.out else Path(".")
    settings = RunSettings(workload="composite", n_docs=args.docs, n_queries=args.queries,
                           users=args.docs + args.queries, input_len=1000, max_input_tokens=6000, max_follow_ups=6,
                           output_len=args.output_len, ignore_eos=True,
                           docs=str(document_pieces(folder / "gap-docs", args.docs)),
                           **({"model": args.model, "preset": "study"} if args.model else {}))
    engine = EngineConfig(max_num_seqs=args.batch, max_model_len=4096, scheduling_policy="priority",
                          enforce_eager=args.eager or None, **({"model": args.model} if args.model else {}))
    arms = [("fcfs+handler", None, 0.0), ("fcfs", None, 0.0), ("workflow-fcfs", "workflow-fcfs", 0.25),
            ("workflow-fcfs/no-keep", "workflow-fcfs", 0.0)]
    rows = []
    with VLLMServer(engine) as server:
        base = ChatServing.from_server(server, max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
        inputs = prepare_inputs(settings, base.get_num_tokens)
        for repeat in range(args.repeats):
            for arm, policy, keep in arms:
                scheduler = None if policy is None else WorkflowScheduler(
                    policy, max_in_flight=args.batch, handoff_s=keep, workflow_depth=1)
                llm = base if scheduler is None else base.model_copy(update={"scheduler": scheduler})
                stamps = Stamps()
                callbacks = [stamps] + ([scheduler] if scheduler else [])
                server.reset_prefix_cache()
                before, e0 = server.metrics(), gpu_mj() if gpu_mj else None
                jobs = build_workloads(settings, llm, inputs)
                if arm.endswith("+handler"):
                    run_jobs(jobs, callbacks=callbacks)
                else:
                    _run_coroutine(_unmetered(jobs, callbacks))
                delta = server.metrics() - before
                row = {"arm": arm, "repeat": repeat, **stamps.workflow_stats(),
                       "gpu_j": (gpu_mj() - e0) / 1e3 if gpu_mj else None,
                       "engine_steps": delta.engine_steps,
                       "tokens_per_step": delta.generation_tokens / max(1, delta.engine_steps),
                       **({"kept": scheduler.slot_stats()} if scheduler else {})}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"reads": reads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
