"""A two-call chain on the real embedded engine, metered end to end by EnergyCallbackHandler."""

from __future__ import annotations

import math
import os

import pytest
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnableLambda

from langchain_energy.callbacks import EnergyCallbackHandler
from langchain_energy.meters import auto_meter

pytestmark = pytest.mark.engine

HAS_RAPL = os.path.exists("/sys/class/powercap/intel-rapl")


def test_two_call_chain_is_metered_end_to_end(serving_llm):
    meter = auto_meter()
    handler = EnergyCallbackHandler(meter=meter, idle_power_w="model" if not HAS_RAPL else None)
    chain = (
        PromptTemplate.from_template("Write two sentences about {topic}.")
        | serving_llm
        | RunnableLambda(lambda text: {"text": text}, name="to_input")
        | PromptTemplate.from_template("Summarize in five words: {text}")
        | serving_llm
    )
    out = chain.invoke({"topic": "wind turbines"}, config={"callbacks": [handler]})
    handler.close()
    assert isinstance(out, str)

    df = handler.to_dataframe()
    calls = df[df.kind == "llm"].sort_values("t_start")
    assert len(calls) == 2 and (calls.status == "ok").all()
    # the second call starts after the first ends: a sequential chain
    assert calls.t_start.iloc[1] >= calls.t_end.iloc[0]
    assert (calls.prompt_tokens > 0).all() and (calls.completion_tokens > 0).all()
    assert set(calls.token_source) == {"server"}
    # first-token times from the server's ttft_s split each call into prefill and decode
    assert ((calls.t_start < calls.t_first_token) & (calls.t_first_token <= calls.t_end)).all()
    for _, row in calls.iterrows():
        assert row.prefill_energy_j + row.decode_energy_j == pytest.approx(row.energy_j, rel=1e-9)
        assert row.energy_cpu_j > 0
        if not HAS_RAPL:
            assert row.provenance_cpu.startswith("estimated:") and row.provenance_dram.startswith("estimated:")

    s = handler.summary()
    assert len(s) == 1
    wf = s.iloc[0]
    assert wf.llm_calls == 2
    assert wf.completion_tokens == calls.completion_tokens.sum()
    root = df[df.parent_run_id.isna()].iloc[0]
    assert wf.energy_j == pytest.approx(root.energy_j)
    assert wf.energy_j >= calls.energy_j.sum()
    assert math.isfinite(wf.energy_per_token_j) and wf.energy_per_token_j > 0
    if not HAS_RAPL:
        assert "cpu=estimated:" in wf.provenance
        # the engine runs in other processes; machine-wide utilization sees it above the model's idle power
        assert wf.active_energy_j > 0
    totals = handler.totals()
    assert totals["calls_j"] + totals["orchestration_j"] + totals["outside_j"] == pytest.approx(
        totals["metered_j"], rel=1e-9)
    print(handler.report())


def test_a_batch_ends_each_call_at_its_own_end_and_puts_joules_on_the_response(serving_llm):
    handler = EnergyCallbackHandler()
    with handler:
        result = serving_llm.generate(["Say hi.", "Count from one to twenty in words.", "Name a color."],
                                      callbacks=[handler])
    calls = handler.to_dataframe()
    calls = calls[calls.kind == "llm"]
    assert len(calls) == 3 and set(calls.timing) == {"response"}
    # one generate, three calls: each ends when its own last token came, not all at the batch's end
    assert calls.t_end.nunique() == 3
    assert (calls.completion_tokens > 0).all()
    energies = [gen[0].generation_info["energy"] for gen in result.generations]
    assert all(e["final"] and e["energy_j"] > 0 for e in energies)
    assert sorted(e["energy_j"] for e in energies) == pytest.approx(sorted(calls.energy_j), rel=1e-9)
