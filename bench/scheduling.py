"""Workflow completion times under each scheduling policy, on one managed engine (a rehearsal-sized probe).

N sequential workflows of K calls each (every call's prompt carries the previous answer) are started at once on
an engine with ``max_num_seqs`` slots, so the engine is saturated. For each policy (server priorities alone;
the client's work-conserving gate; the gate keeping a freed slot ``--handoff`` seconds for the same workflow)
it reports the mean, p50 and p90 workflow completion time, the wall time of the whole load, the metered
energy of the load (`EnergyCallbackHandler`: on a CPU machine an estimate, on a GPU NVML's counter) and the
engine's mean batch occupancy (generated tokens per engine step, from vLLM's counters: a tail at small
batches shows up as a lower occupancy and more steps for the same tokens).

    python -m bench.scheduling --workflows 8 --calls 4 --slots 4 --output-len 24 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from langchain_core.runnables import RunnableLambda

from langchain_energy import EnergyCallbackHandler, EngineConfig, ServingLLM, VLLMServer
from langchain_energy.scheduling import WorkflowScheduler

TOPIC = "Explain, step by step, how a heat pump moves heat from a cold place to a warm one. "


def _workflow(llm: ServingLLM, calls: int):
    step = RunnableLambda(lambda text: TOPIC * 4 + "Continue from: " + text[-300:])
    chain = step | llm
    for _ in range(calls - 1):
        chain = chain | step | llm
    return chain


async def _load(llm: ServingLLM, scheduler: WorkflowScheduler, workflows: int, calls: int,
                energy: EnergyCallbackHandler) -> list[float]:
    chain = _workflow(llm, calls)
    t0 = time.monotonic()

    async def one(i: int) -> float:
        await chain.ainvoke(f"workflow {i}", config={"callbacks": [scheduler, energy]})
        return time.monotonic() - t0

    tasks = []
    for i in range(workflows):   # started in a known order, a few ms apart
        tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.sleep(0.005)
    return list(await asyncio.gather(*tasks))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workflows", type=int, default=8)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--slots", type=int, default=4, help="engine max_num_seqs (and the gate's max_in_flight)")
    p.add_argument("--output-len", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default=None)
    p.add_argument("--handoff", type=float, default=0.1,
                   help="seconds the handoff arm keeps a freed slot for the same workflow's next call")
    args = p.parse_args()
    engine = EngineConfig(max_num_seqs=args.slots, max_model_len=4096, scheduling_policy="priority",
                          **({"model": args.model} if args.model else {}))
    # (policy, gate width, handoff seconds): no gate is the server's priority alone.
    configs = [("fcfs", None, 0.0), ("workflow-fcfs", None, 0.0), ("workflow-fcfs", args.slots, 0.0),
               ("workflow-fcfs", args.slots, args.handoff), ("least-attained", args.slots, 0.0)]
    with VLLMServer(engine) as server:
        print(f"{'policy':16} {'gate':>4} {'keep s':>6} {'mean s':>7} {'p50 s':>6} {'p90 s':>6} {'wall s':>7} "
              f"{'energy J':>9} {'steps':>6} {'tok/step':>8}")
        for rep in range(args.repeats):
            for policy, gate, handoff in configs:
                scheduler = WorkflowScheduler(policy, max_in_flight=gate, handoff_s=handoff)
                llm = ServingLLM.from_server(server, max_tokens=args.output_len, ignore_eos=True, seed=rep,
                                             scheduler=scheduler)
                server.reset_prefix_cache()
                before = server.metrics()
                with EnergyCallbackHandler() as energy:
                    done = asyncio.run(_load(llm, scheduler, args.workflows, args.calls, energy))
                delta = server.metrics() - before
                done.sort()
                p90 = done[min(len(done) - 1, int(0.9 * len(done)))]
                occupancy = delta.generation_tokens / max(1, delta.engine_steps)
                print(f"{policy:16} {gate or '-':>4} {handoff:6.2f} {statistics.mean(done):7.2f} "
                      f"{statistics.median(done):6.2f} {p90:6.2f} {done[-1]:7.2f} "
                      f"{energy.totals()['metered_j']:9.1f} {delta.engine_steps:6.0f} {occupancy:8.2f}", flush=True)


if __name__ == "__main__":
    main()
