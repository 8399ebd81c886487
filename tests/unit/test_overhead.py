"""The overhead comparison's prompt recorder sees every call, whatever other handlers run beside it."""

from __future__ import annotations

import asyncio

from langchain_core.language_models.fake import FakeListLLM

from chains.harness.overhead import _PromptRecorder
from langchain_energy.callbacks import EnergyCallbackHandler
from langchain_energy.meters import ReplayMeter


def test_the_recorder_and_the_energy_handler_both_see_every_async_llm_start():
    recorder = _PromptRecorder()
    with EnergyCallbackHandler(meter=ReplayMeter({"cpu": [(0.0, 1.0)]})) as energy:
        asyncio.run(FakeListLLM(responses=["a"] * 3).abatch(
            ["x", "y", "z"], config={"callbacks": [recorder.handler, energy]}))
    assert sorted(c["prompt"] for c in recorder.calls) == ["x", "y", "z"]
    assert "end-only" not in {r.timing for r in energy.runs}  # every start seen, none rebuilt from its end
