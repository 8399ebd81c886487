"""The package's cost: the search workload through chains + ServingLLM + the handler against the same prompts
sent straight to the same vLLM server without LangChain, alternating, on one engine (``overhead.json``)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pandas as pd

from chains.harness.knobs import engine_fields
from chains.harness.store import write_json_atomic
from langchain_energy.errors import EnergyError
from langchain_energy.ledger import CALL_KINDS


class _PromptRecorder:
    """Collects each LLM call's prompt and start order.

    Not inline, like `EnergyCallbackHandler`: langchain-core's async ``on_llm_start`` hands the event only to
    inline handlers whenever one is present, so an inline recorder would silence the energy handler's starts.
    Beside an inline handler (LangSmith's tracer, say) both would miss starts: the caller checks the count.
    """

    def __init__(self) -> None:
        from langchain_core.callbacks import BaseCallbackHandler

        calls = self.calls = []

        class Recorder(BaseCallbackHandler):
            def on_llm_start(self, serialized, prompts, *, run_id, parent_run_id=None, **kwargs):
                calls.append({"run_id": str(run_id), "prompt": prompts[0], "t": time.monotonic()})

        self.handler = Recorder()


def _sessions(calls: list[dict], runs: pd.DataFrame) -> list[list[dict]]:
    """Group recorded calls by session (the workflow's direct child), each in call order.

    Each call's token cap is the number of tokens it generated: the replay runs with ``ignore_eos``, as the
    measured trial does, so both generate the same tokens.
    """
    parent = dict(zip(runs["run_id"].astype(str), runs["parent_run_id"].astype(str)))
    root = dict(zip(runs["run_id"].astype(str), runs["root_run_id"].astype(str)))
    generated = dict(zip(runs["run_id"].astype(str), runs["completion_tokens"]))
    groups: dict[str, list[dict]] = {}
    for call in calls:
        call["max_tokens"] = int(generated[call["run_id"]])
        node = call["run_id"]
        while parent.get(node) not in (None, "None", "nan", root.get(node)):
            node = parent[node]
        groups.setdefault(node, []).append(call)
    return [sorted(g, key=lambda c: c["t"]) for g in groups.values()]


async def replay_sessions(sessions: list[list[dict]], base_url: str, model: str, seed: int | None = None,
                          clock: Callable[[], float] = time.monotonic) -> tuple[int, float, float]:
    """Send the same requests straight to the server, sessions concurrently, calls in order.

    Each call is ``{"prompt", "max_tokens"}``; generation runs with ``ignore_eos`` as the measured trials do.

    Returns:
        Completion tokens, the instant the first request was sent and the instant the last answer ended.
    """
    first_sent: list[float] = []
    last_answer: list[float] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        async def session(calls: list[dict]) -> int:
            tokens = 0
            for call in calls:
                body = {"model": model, "messages": [{"role": "user", "content": call["prompt"]}],
                        "max_tokens": call["max_tokens"], "temperature": 0.7, "top_p": 1.0, "ignore_eos": True,
                        "stream": True, "stream_options": {"include_usage": True}}
                if seed is not None:
                    body["seed"] = seed
                first_sent.append(clock())
                async with client.stream("POST", base_url + "/chat/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if '"usage"' in line and '"completion_tokens"' in line:
                            tokens += json.loads(line[5:])["usage"]["completion_tokens"]
                last_answer.append(clock())
            return tokens

        tokens = sum(await asyncio.gather(*(session(s) for s in sessions)))
    return tokens, min(first_sent), max(last_answer)


def overhead_part(size: dict, out: Path) -> str:
    """Search through the package vs. raw HTTP, alternating, on one engine; writes overhead.json."""
    from chains.harness.inputs import prepare_inputs
    from chains.harness.settings import RunSettings
    from chains.harness.trial import run_trial
    from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer
    from langchain_energy.callbacks import EnergyCallbackHandler
    from langchain_energy.llms import ServingLLM
    from langchain_energy.timeline import shared_timeline

    target = out / "overhead.json"
    if target.exists():
        return "overhead: already measured"
    _, settings = size["search-batch"]
    fields = {k: v for k, v in settings.items() if k in RunSettings.__dataclass_fields__}
    run_settings = RunSettings(workload="search", model=size["model"], **{"batch_size": 8, **fields})
    config = EngineConfig(model=size["model"], **{**size["engine"], **engine_fields(run_settings.to_dict())})
    timeline = shared_timeline()
    timeline.acquire()
    pairs = []
    try:
        with VLLMServer(config) as server:
            llm = ServingLLM.from_server(server)
            inputs = prepare_inputs(run_settings, llm.get_num_tokens)  # loading the queries is not per-call work
            # One unrecorded trial: warms the engine and records the prompts the raw path replays.
            recorder = _PromptRecorder()
            result = run_trial(run_settings, llm, inputs=inputs, callbacks=[recorder.handler])
            expected = int(result.runs["kind"].isin(CALL_KINDS).sum())
            if not recorder.calls or len(recorder.calls) != expected:  # else the ratio would mean nothing
                raise EnergyError(f"the overhead part recorded {len(recorder.calls)} of {expected} LLM calls to "
                                  "replay (is an inline callback handler, such as a tracer, enabled?)")
            sessions = _sessions(recorder.calls, result.runs)

            def chain() -> tuple[int, float, float]:
                handler = EnergyCallbackHandler()
                with handler:
                    trial = run_trial(run_settings, llm, inputs=inputs, handler=handler)
                calls = trial.runs[trial.runs["kind"].isin(CALL_KINDS)]
                if len(calls) != len(recorder.calls):
                    raise EnergyError(f"the chain path recorded {len(calls)} of {len(recorder.calls)} calls")
                return int(trial.summary["completion_tokens"].sum()), calls["t_start"].min(), calls["t_end"].max()

            def raw() -> tuple[int, float, float]:
                return asyncio.run(replay_sessions(sessions, server.base_url, server.served_model_name,
                                                   run_settings.seed or 0, clock=timeline.clock))

            for pair in range(size["overhead_pairs"]):
                row = {"pair": pair, "calls": len(recorder.calls), "sessions": len(sessions)}
                # Alternate which path goes first, so drift in the engine or the GPU's clocks hits both alike.
                for name, path in ((("chain", chain), ("raw", raw)) if pair % 2 == 0 else (("raw", raw), ("chain", chain))):
                    server.reset_prefix_cache()
                    w0 = timeline.clock()
                    row[f"{name}_completion_tokens"], t0, t1 = path()
                    w1 = timeline.clock()
                    time.sleep(0.3)  # let the sampler pass t1 before reading the window
                    # Both paths over the same span: first request sent to last answer received.
                    row[f"{name}_latency_s"] = t1 - t0
                    row[f"{name}_energy_j"] = sum(v for v in timeline.energy_between(t0, t1).values() if v == v)
                    # What the chain path does outside that span (trial set-up, tables), on its own line.
                    row[f"{name}_outside_span_s"] = (w1 - w0) - (t1 - t0)
                pairs.append(row)
    finally:
        timeline.release()
    latency = [p["chain_latency_s"] / p["raw_latency_s"] for p in pairs]
    energy = [p["chain_energy_j"] / p["raw_energy_j"] for p in pairs if p["raw_energy_j"]]
    report = {"pairs": pairs, "latency_ratio_median": statistics.median(latency),
              "energy_ratio_median": statistics.median(energy) if energy else None,
              "meter": timeline.meter.describe() if hasattr(timeline.meter, "describe") else None, "target": 1.05}
    write_json_atomic(target, report, indent=2, default=str, sort_keys=False)
    return (f"overhead: latency ratio {report['latency_ratio_median']:.3f}, energy ratio "
            f"{report['energy_ratio_median'] if energy else float('nan'):.3f} (median of {len(pairs)} pairs)")
