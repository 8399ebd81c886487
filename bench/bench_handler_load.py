"""The energy handler under load: does metering delay a workflow's next call?

The scheduling study's composite load (32 documents and 32 search sessions, all started at once; 358 calls)
runs on `QueuedChatModel`, a test double of an engine with 8 slots: each call waits for a slot, holds it
0.12 s and answers (reporting its latency, as this package's models do, so the handler puts the call's joules
on the message). With 64 calls open at once, a handler whose work per call grows with what is open delays
every workflow's next call; on an H200 the handler's gap was 1.25 s against 7 ms without it
(docs/results/gpu-h200-scheduling). Reported: the gap between a workflow's consecutive calls (mean, p50) and
the mean workflow completion time, without a handler and with `EnergyCallbackHandler`, in one run.

    python -m bench.bench_handler_load
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from langchain_core.language_models.fake_chat_models import FakeListChatModel

from bench.scheduling_gaps import Stamps, _unmetered
from chains.harness.inputs import prepare_inputs
from chains.harness.scheduling_study import document_pieces
from chains.harness.settings import RunSettings
from chains.harness.trial import _run_coroutine, build_workloads
from langchain_energy import EnergyCallbackHandler

SLOTS, SERVICE_S = 8, 0.12


class QueuedChatModel(FakeListChatModel):
    """Test double of an engine with `SLOTS` slots: a call waits for one, holds it `SERVICE_S`, answers."""

    async def _agenerate(self, *args: Any, **kwargs: Any) -> Any:
        t = time.monotonic()
        async with _slots():
            await asyncio.sleep(SERVICE_S)
        result = await super()._agenerate(*args, **kwargs)
        result.generations[0].message.response_metadata["latency_s"] = time.monotonic() - t
        return result


_SEMAPHORE: asyncio.Semaphore | None = None


def _slots() -> asyncio.Semaphore:
    global _SEMAPHORE
    if _SEMAPHORE is None:
        _SEMAPHORE = asyncio.Semaphore(SLOTS)  # made on the package's loop, where the calls run
    return _SEMAPHORE


def _run(handler: EnergyCallbackHandler | None, settings: RunSettings, inputs: Any) -> dict[str, float]:
    stamps = Stamps()
    llm = QueuedChatModel(responses=["word " * 64])
    jobs = build_workloads(settings, llm, inputs)
    callbacks = [stamps] + ([handler] if handler is not None else [])
    if handler is None:
        _run_coroutine(_unmetered(jobs, callbacks))
    else:
        with handler:
            _run_coroutine(_unmetered(jobs, callbacks))
    return stamps.workflow_stats()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = RunSettings(workload="composite", n_docs=32, n_queries=32, users=32, input_len=1000,
                               max_input_tokens=6000, max_follow_ups=6, output_len=64,
                               docs=str(document_pieces(Path(tmp) / "docs", 32)), preset="study")
        inputs = prepare_inputs(settings, lambda text: len(text) // 4)
        _run(None, settings, inputs)   # warm-up: imports and the loop
        rows = [("no handler", _run(None, settings, inputs)),
                ("EnergyCallbackHandler", _run(EnergyCallbackHandler(), settings, inputs))]
    base = rows[0][1]["completion_mean_s"]
    print(f"{rows[0][1]['calls']} calls, 64 workflows at once, {SLOTS} slots of {SERVICE_S} s (test double)\n")
    print("| handler | gap mean (ms) | gap p50 (ms) | mean completion (s) | vs no handler |")
    print("| :--- | ---: | ---: | ---: | ---: |")
    for name, r in rows:
        print(f"| {name} | {r['gap_mean_s'] * 1e3:.1f} | {r['gap_p50_s'] * 1e3:.1f} | {r['completion_mean_s']:.2f} | "
              f"{r['completion_mean_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
