"""Proof of the attribution on a GPU: the handler's per-call joules against independent Zeus windows.

One managed vLLM engine (default: the Llama-2-7B shape with dummy weights, CUDA graphs, batch 4), then:

1. ``sequential``: six calls one after another (inputs of about 500 and 2,000 tokens, outputs 64/256/512),
   each inside its own Zeus window opened right around it: the call's attributed GPU joules against the
   window's. Goal: within 2% each.
2. ``concurrent``: 16 calls at once inside one Zeus window: per-call sum + orchestration + outside against
   the window. Goal: within 0.5%.
3. ``batch``: one LLM batch of 8 prompts (`ServingLLM.batch`, one `generate`): with 4 slots the engine runs
   them in two waves, so each call's own end differs; per-call latencies and joules, and their sum against
   a Zeus window.
4. ``overhead``: 8 sessions of 3 sequential calls, all sessions at once, through LangChain + ServingLLM +
   EnergyCallbackHandler against the same requests sent as raw HTTP; both timed over the same span (first
   request sent to last answer received), with the handler's accounting (tables) timed on its own line;
   energy from a Zeus window over the same span; 4 alternating pairs. Goal: both ratios under 1.05.

Writes ``attribution.json`` to ``--out``. On a machine without a GPU, ``--rehearse`` runs the same steps
on the embedded CPU engine, with the estimated meter's windows in place of Zeus (a rehearsal, not a proof).

    python -m bench.gpu_attribution --out docs/results/gpu-h200-attribution
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnableLambda

from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer
from langchain_energy.callbacks import EnergyCallbackHandler
from langchain_energy.errors import EnergyError
from langchain_energy.ledger import CALL_KINDS
from langchain_energy.llms import ServingLLM
from chains.harness.overhead import replay_sessions
from chains.harness.store import write_json_atomic
from langchain_energy.timeline import shared_timeline

WORD = " energy"


class Windows:
    """Independent energy windows: Zeus on the GPU; the timeline's own meter in a CPU rehearsal."""

    def __init__(self, rehearse: bool) -> None:
        self.rehearse = rehearse
        if rehearse:
            self.timeline = shared_timeline()
            self._open: dict[str, float] = {}
        else:
            from zeus.monitor import ZeusMonitor

            self.monitor = ZeusMonitor(gpu_indices=[0], sync_execution_with="torch")

    def begin(self, key: str) -> None:
        if self.rehearse:
            self.timeline.sample_now()
            self._open[key] = self.timeline.last_sample_t or 0.0
        else:
            self.monitor.begin_window(key, sync_execution=False)

    def end(self, key: str) -> float:
        """Joules of the window: GPU 0 on the GPU, everything the meter sees in a rehearsal."""
        if self.rehearse:
            self.timeline.sample_now()
            t1 = self.timeline.last_sample_t or 0.0
            return sum(v for v in self.timeline.energy_between(self._open.pop(key), t1).values() if v == v)
        return float(self.monitor.end_window(key, sync_execution=False).gpu_energy[0])


def _joules(row: Any, rehearse: bool) -> float:
    return float(row.energy_j if rehearse else row.energy_gpu_j)


def prompt_of(tokens: int, llm: ServingLLM, tag: str) -> str:
    """A prompt of about `tokens` tokens (by the served model's tokenizer), distinct per tag."""
    base = f"Request {tag}: summarize the following notes." + WORD * tokens
    while llm.get_num_tokens(base) > tokens and len(base) > 64:
        base = base[: -len(WORD) * 8]
    return base


def sequential(llm: ServingLLM, win: Windows, rehearse: bool, sizes: list[tuple[int, int]]) -> list[dict]:
    """Each call inside a workflow of its own (a root run) and a window right around that workflow."""
    group = None if rehearse else "gpu"
    rows = []
    for i, (n_in, n_out) in enumerate(sizes):
        prompt = prompt_of(n_in, llm, f"seq{i}")
        workflow = RunnableLambda(lambda p, n=n_out: llm.invoke(p, max_tokens=n), name=f"seq{i}")
        with EnergyCallbackHandler() as handler:
            win.begin(f"seq{i}")
            workflow.invoke(prompt, config={"callbacks": [handler]})
            window = win.end(f"seq{i}")
        call = handler.to_dataframe().set_index("kind").loc["llm"]
        t = handler.totals(group)
        received = t["calls_j"] + t["orchestration_j"] + t["outside_j"]
        rows.append({"input_tokens": int(call.prompt_tokens), "output_tokens": int(call.completion_tokens),
                     "latency_s": float(call.latency_s), "call_j": _joules(call, rehearse),
                     "workflow_j": received, "window_j": window,
                     "call_ratio": _joules(call, rehearse) / window if window else None,
                     "workflow_ratio": received / window if window else None,
                     "below_resolution": bool(call.below_resolution)})
    return rows


async def _concurrent(llm: ServingLLM, prompts: list[str], handler: EnergyCallbackHandler, n_out: int,
                      win: Windows) -> float:
    async def all_calls(_: Any) -> None:
        await asyncio.gather(*(llm.ainvoke(p, config={"callbacks": [handler]}, max_tokens=n_out) for p in prompts))

    # The window opens and closes right around the workflow (a root run), inside the event loop.
    win.begin("concurrent")
    await RunnableLambda(all_calls, name="concurrent").ainvoke(None, config={"callbacks": [handler]})
    return win.end("concurrent")


def concurrent(llm: ServingLLM, win: Windows, n: int, n_in: int, n_out: int) -> dict:
    prompts = [prompt_of(n_in, llm, f"con{i}") for i in range(n)]
    with EnergyCallbackHandler() as handler:
        window = asyncio.run(_concurrent(llm, prompts, handler, n_out, win))
    totals = handler.totals(None if win.rehearse else "gpu")
    df = handler.to_dataframe()
    calls = df[df.kind.isin(CALL_KINDS)]
    received = totals["calls_j"] + totals["orchestration_j"] + totals["outside_j"]
    return {"calls": int(len(calls)), "calls_j": totals["calls_j"], "orchestration_j": totals["orchestration_j"],
            "outside_j": totals["outside_j"], "received_j": received, "window_j": window,
            "ratio": received / window if window else None, "provenance": df.attrs["provenance"]["energy_j"]}


def batch(llm: ServingLLM, win: Windows, rehearse: bool, n: int, n_in: int, n_out: int) -> dict:
    prompts = [prompt_of(n_in, llm, f"bat{i}") for i in range(n)]
    workflow = RunnableLambda(lambda ps: llm.batch(ps, max_tokens=n_out), name="batch")
    with EnergyCallbackHandler() as handler:
        win.begin("batch")
        workflow.invoke(prompts, config={"callbacks": [handler]})
        window = win.end("batch")
    df = handler.to_dataframe().sort_values("t_end")
    calls = df[df.kind.isin(CALL_KINDS)]
    per_call = [{"latency_s": float(r.latency_s), "attributed_j": _joules(r, rehearse), "timing": r.timing}
                for r in calls.itertuples()]
    t = handler.totals(None if rehearse else "gpu")
    received = t["calls_j"] + t["orchestration_j"] + t["outside_j"]
    return {"calls": per_call, "calls_j": t["calls_j"], "orchestration_j": t["orchestration_j"],
            "received_j": received, "window_j": window, "ratio": received / window if window else None}


async def _chain_sessions(sessions: list[list[str]], llm: ServingLLM, handler: EnergyCallbackHandler,
                          n_out: int) -> None:
    chain = PromptTemplate.from_template("{question}") | llm.bind(max_tokens=n_out)

    async def one(prompts: list[str]) -> None:
        for p in prompts:
            await chain.ainvoke({"question": p}, config={"callbacks": [handler]})

    await asyncio.gather(*(one(s) for s in sessions))


def overhead(llm: ServingLLM, server: VLLMServer, win: Windows, pairs: int, n_sessions: int, calls: int,
             n_in: int, n_out: int) -> dict:
    sessions = [[prompt_of(n_in, llm, f"s{s}c{c}") for c in range(calls)] for s in range(n_sessions)]
    rows = []
    for pair in range(pairs):
        row: dict[str, Any] = {"pair": pair}
        order = ("chain", "raw") if pair % 2 == 0 else ("raw", "chain")
        for path in order:
            server.reset_prefix_cache()
            if path == "chain":
                handler = EnergyCallbackHandler()
                handler._ensure_started()
                win.begin("chain")
                t0 = time.perf_counter()
                asyncio.run(_chain_sessions(sessions, llm, handler, n_out))
                t1 = time.perf_counter()
                row["chain_energy_j"] = win.end("chain")
                a0 = time.perf_counter()
                df = handler.to_dataframe()
                handler.summary()
                row["accounting_s"] = time.perf_counter() - a0
                handler.close()
                recorded = int((df.kind.isin(CALL_KINDS)).sum())
                if recorded != n_sessions * calls:  # a measurement that recorded nothing is no measurement
                    raise EnergyError(f"the chain path recorded {recorded} of {n_sessions * calls} calls")
            else:
                win.begin("raw")
                t0 = time.perf_counter()
                requests = [[{"prompt": p, "max_tokens": n_out} for p in s] for s in sessions]
                asyncio.run(replay_sessions(requests, server.base_url, server.served_model_name))
                t1 = time.perf_counter()
                row["raw_energy_j"] = win.end("raw")
            row[f"{path}_latency_s"] = t1 - t0
        rows.append(row)
    lat = statistics.median(r["chain_latency_s"] / r["raw_latency_s"] for r in rows)
    energy = statistics.median(r["chain_energy_j"] / r["raw_energy_j"] for r in rows if r["raw_energy_j"])
    return {"pairs": rows, "latency_ratio_median": lat, "energy_ratio_median": energy, "target": 1.05,
            "calls_per_trial": n_sessions * calls}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for attribution.json")
    p.add_argument("--rehearse", action="store_true", help="the embedded CPU engine, small sizes, no Zeus")
    args = p.parse_args(argv)
    try:
        if args.rehearse:
            config = EngineConfig(max_num_seqs=4)
            seq = [(100, 8), (400, 8), (100, 16), (400, 16), (100, 32), (400, 32)]
            con, bat, ovh = (8, 100, 16), (8, 100, 16), (2, 2, 2, 100, 8)
        else:
            config = EngineConfig(model="llama2-7b-shape", max_num_seqs=4, max_model_len=4096, enforce_eager=False)
            seq = [(500, 64), (2000, 64), (500, 256), (2000, 256), (500, 512), (2000, 512)]
            con, bat, ovh = (16, 1000, 128), (8, 500, 128), (8, 3, 4, 500, 64)
        win = Windows(args.rehearse)
        started = time.perf_counter()
        with VLLMServer(config) as server:
            engine_start_s = time.perf_counter() - started
            llm = ServingLLM.from_server(server, ignore_eos=True)
            llm.invoke("warm up", max_tokens=8)
            report = {"engine": {"model": config.model, "max_num_seqs": config.max_num_seqs,
                                 "cuda_graphs": not config.enforce_eager, "start_s": engine_start_s},
                      "sequential": sequential(llm, win, args.rehearse, seq)}
            report["concurrent"] = concurrent(llm, win, *con)
            report["batch"] = batch(llm, win, args.rehearse, *bat)
            n_sessions, calls, pairs, n_in, n_out = ovh
            report["overhead"] = overhead(llm, server, win, pairs, n_sessions, calls, n_in, n_out)
            report["meter"] = shared_timeline().meter.describe()
    except EnergyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "attribution.json", report, indent=2, default=str, sort_keys=False)
    print(json.dumps(report, indent=1, default=str)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
