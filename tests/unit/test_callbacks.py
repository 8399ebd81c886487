"""EnergyCallbackHandler with the replay meter (a test double) and LangChain's own fake models and graphs."""

from __future__ import annotations

import asyncio
import math
import time
from typing import TypedDict
from uuid import uuid4

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import (
    FakeListChatModel,
    FakeListChatModelError,
    GenericFakeChatModel,
)
from langchain_core.messages import AIMessage
from langchain_core.outputs import Generation, LLMResult
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import RunnableLambda
from langgraph.graph import END, START, StateGraph

from langchain_energy.callbacks import RUN_COLUMNS, SUMMARY_COLUMNS, EnergyCallbackHandler, energy_callback
from langchain_energy.errors import ConfigError
from langchain_energy.meters import EstimatedMeter, ManualClock, PowerModel, ReplayMeter

CONTRACT_RUN_COLUMNS = (
    "run_id parent_run_id root_run_id name kind tags status t_start t_first_token t_end latency_s prompt_tokens "
    "completion_tokens cached_tokens token_source energy_j energy_cpu_j energy_gpu_j energy_dram_j provenance_cpu "
    "provenance_gpu provenance_dram prefill_energy_j decode_energy_j"
).split()
CONTRACT_SUMMARY_COLUMNS = (
    "workflow root_run_id latency_s llm_calls prompt_tokens completion_tokens cached_tokens throughput_tok_s "
    "energy_j energy_cpu_j energy_gpu_j energy_dram_j active_energy_j idle_energy_j energy_per_token_j "
    "cache_hit_rate provenance"
).split()


class ClockAdvancer(BaseCallbackHandler):
    """Test double for model latency on a manual clock: moves time forward when a model call ends.

    Listed before the energy handler, so the energy handler stamps the call's end after the advance.
    """

    def __init__(self, clock: ManualClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def on_llm_end(self, response, **kwargs):
        self.clock.advance(self.seconds)


def rel_close(a: float, b: float, tol: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=1e-12)


def union_length(intervals):
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def manual_meter():
    clock = ManualClock(1000.0)
    meter = ReplayMeter({"cpu": [(0.0, 10.0)], "gpu:0": [(0.0, 100.0)]}, clock=clock,
                        provenance={"cpu": "estimated:replay", "gpu:0": "measured:nvml"})
    return clock, meter


def test_nested_chain_energy_is_exact_on_a_manual_clock():
    clock, meter = manual_meter()
    handler = EnergyCallbackHandler(meter=meter, token_counter=lambda s: len(s.split()))
    think = RunnableLambda(lambda x: (clock.advance(1.0), x)[1], name="think")
    chain = think | PromptTemplate.from_template("Summarize: {text}") | FakeListLLM(responses=["a short one"])
    out = chain.invoke({"text": "some words here"}, config={"callbacks": [ClockAdvancer(clock, 2.0), handler]})
    handler.close()
    assert out == "a short one"
    df = handler.to_dataframe()
    assert list(df.columns)[: len(CONTRACT_RUN_COLUMNS)] == CONTRACT_RUN_COLUMNS
    root = df[df.parent_run_id.isna()].iloc[0]
    llm = df[df.kind == "llm"].iloc[0]
    step = df[df.name == "think"].iloc[0]
    assert llm.energy_j == pytest.approx(2.0 * 110.0)
    assert llm.energy_gpu_j == pytest.approx(200.0) and llm.energy_cpu_j == pytest.approx(20.0)
    assert step.energy_j == pytest.approx(110.0)
    assert root.energy_j == pytest.approx(330.0) and root.latency_s == pytest.approx(3.0)
    # a chain's energy is the sum over its children plus its own idle share
    children = df[df.parent_run_id == root.run_id]
    assert root.energy_j == pytest.approx(children.energy_j.sum() + root.orchestration_energy_j
                                          - children.orchestration_energy_j.sum())
    assert (llm.provenance_cpu, llm.provenance_gpu, llm.provenance_dram) == (
        "estimated:replay", "measured:nvml@gpu0", "unavailable")
    assert math.isnan(llm.energy_dram_j)
    assert (llm.prompt_tokens, llm.completion_tokens, llm.token_source) == (4, 3, "counted")
    s = handler.summary().iloc[0]
    assert list(handler.summary().columns)[: len(CONTRACT_SUMMARY_COLUMNS)] == CONTRACT_SUMMARY_COLUMNS
    assert s.llm_calls == 1 and s.energy_j == pytest.approx(330.0)
    assert s.energy_per_token_j == pytest.approx(330.0 / 3)
    assert s.throughput_tok_s == pytest.approx(1.0)
    assert "gpu=measured:nvml" in s.provenance and "dram=unavailable" in s.provenance
    t = handler.totals()
    assert t["metered_j"] == pytest.approx(330.0) and t["calls_j"] == pytest.approx(220.0)
    assert t["orchestration_j"] == pytest.approx(110.0) and t["outside_j"] == pytest.approx(0.0)


async def test_64_concurrent_abatch_runs_conserve_energy():
    watts = 37.0
    meter = ReplayMeter({"cpu": [(0.0, watts)]}, clock=time.monotonic)
    handler = EnergyCallbackHandler(meter=meter, sample_interval_s=0.01)
    chat = FakeListChatModel(responses=[f"answer {i}" for i in range(64)], sleep=0.01)

    async def ask(messages):
        # FakeListChatModel's own abatch runs its inputs one by one; a node calling ainvoke runs them together.
        return await chat.ainvoke(messages)

    chain = ChatPromptTemplate.from_messages([("human", "q {i}")]) | RunnableLambda(ask, name="ask")
    outs = await chain.abatch([{"i": i} for i in range(64)], config={"callbacks": [handler]})
    handler.close()
    assert len(outs) == 64
    df = handler.to_dataframe()
    calls = df[df.kind == "chat_model"]
    assert len(calls) == 64 and (calls.status == "ok").all()
    assert len(handler.summary()) == 64
    t = handler.totals()
    assert rel_close(t["calls_j"] + t["orchestration_j"] + t["outside_j"], t["metered_j"])
    window = df.t_end.max() - df.t_start.min()
    assert rel_close(t["metered_j"], watts * window, 1e-6)
    # energy goes to calls exactly when at least one call runs
    assert rel_close(t["calls_j"], watts * union_length(zip(calls.t_start, calls.t_end)), 1e-6)
    assert rel_close(calls.energy_j.sum(), t["calls_j"], 1e-9)
    roots = df[df.parent_run_id.isna()]
    assert rel_close(roots.energy_j.sum(), t["calls_j"] + t["orchestration_j"], 1e-9)
    # calls overlapped: the sum of per-call wall windows exceeds what was metered (where naive windows double count)
    assert (calls.latency_s.sum() * watts) > t["calls_j"] * 1.5


def test_threaded_batch_conserves_energy():
    meter = ReplayMeter({"cpu": [(0.0, 5.0)], "dram": [(0.0, 1.0)]}, clock=time.monotonic)
    handler = EnergyCallbackHandler(meter=meter, sample_interval_s=0.01)
    chat = FakeListChatModel(responses=["ok"], sleep=0.005)
    outs = chat.batch([f"question {i}" for i in range(16)], config={"callbacks": [handler],
                                                                      "max_concurrency": 8})
    handler.close()
    assert len(outs) == 16
    t = handler.totals()
    assert rel_close(t["calls_j"] + t["orchestration_j"] + t["outside_j"], t["metered_j"])
    assert len(handler.to_dataframe()) == 16


def test_streaming_first_token_splits_prefill_and_decode():
    meter = ReplayMeter({"cpu": [(0.0, 20.0)]}, clock=time.monotonic)
    handler = EnergyCallbackHandler(meter=meter, sample_interval_s=0.01)
    chat = FakeListChatModel(responses=["tokens come one by one"], sleep=0.002)
    text = "".join(chunk.content for chunk in chat.stream("go", config={"callbacks": [handler]}))
    handler.close()
    assert text == "tokens come one by one"
    row = handler.to_dataframe().iloc[0]
    assert row.t_start < row.t_first_token < row.t_end
    assert row.prefill_energy_j + row.decode_energy_j == pytest.approx(row.energy_j, rel=1e-9)
    assert row.decode_energy_j > row.prefill_energy_j > 0  # the fake sleeps before each of many chunks


def _serving_result(prompt_tokens, completion_tokens, cached, ttft):
    # What the serving LLM puts in each generation's generation_info.
    info = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "cached_tokens": cached,
            "ttft_s": ttft, "latency_s": 4.0, "token_source": "server"}
    return LLMResult(generations=[[Generation(text="x", generation_info=info)]],
                     llm_output={"token_usage": {"prompt_tokens": 999, "completion_tokens": 999}})


@pytest.mark.parametrize("weighting", ["equal", "tokens"])
def test_generation_info_tokens_first_token_and_token_weighting(weighting):
    clock, meter = manual_meter()
    handler = EnergyCallbackHandler(meter=meter, weighting=weighting)
    a, b = uuid4(), uuid4()
    handler.on_llm_start({"name": "ServingLLM"}, ["p"], run_id=a)
    handler.on_llm_start({"name": "ServingLLM"}, ["p"], run_id=b)
    clock.advance(4.0)
    # a: 300 uncached prompt tokens in 1 s, then 60 tokens in 3 s; b: 100 prompt tokens, 20 generated
    handler.on_llm_end(_serving_result(300, 60, 0, 1.0), run_id=a)
    handler.on_llm_end(_serving_result(150, 20, 50, 1.0), run_id=b)
    handler.close()
    df = handler.to_dataframe().set_index("run_id")
    ra, rb = df.loc[str(a)], df.loc[str(b)]
    assert (ra.prompt_tokens, ra.completion_tokens, ra.cached_tokens, ra.token_source) == (300, 60, 0, "server")
    assert rb.cached_tokens == 50
    assert ra.t_first_token == pytest.approx(ra.t_start + 1.0) and ra.ttft_s == pytest.approx(1.0)
    assert ra.energy_j + rb.energy_j == pytest.approx(440.0)
    if weighting == "equal":
        assert ra.energy_j == pytest.approx(220.0)
    else:
        # prefill second: rates 300 vs 100 -> 3/4; decode seconds: 20 vs 20/3 tok/s -> 3/4
        assert ra.energy_j == pytest.approx(440.0 * 0.75)
        assert ra.prefill_energy_j == pytest.approx(110.0 * 0.75)
    s = handler.summary()
    assert len(s) == 2  # each bare call is its own workflow


def test_usage_metadata_of_chat_models():
    meter = ReplayMeter({"cpu": [(0.0, 1.0)]}, clock=time.monotonic)
    handler = EnergyCallbackHandler(meter=meter)
    msg = AIMessage("hello", usage_metadata={"input_tokens": 12, "output_tokens": 5, "total_tokens": 17,
                                             "input_token_details": {"cache_read": 8}})
    GenericFakeChatModel(messages=iter([msg])).invoke("hi", config={"callbacks": [handler]})
    handler.close()
    row = handler.to_dataframe().iloc[0]
    assert (row.kind, row.prompt_tokens, row.completion_tokens, row.cached_tokens, row.token_source) == (
        "chat_model", 12, 5, 8, "usage_metadata")
    assert handler.summary().iloc[0].cache_hit_rate == pytest.approx(8 / 12)


def test_llm_output_token_usage_fallback():
    meter = ReplayMeter({"cpu": [(0.0, 1.0)]}, clock=time.monotonic)
    handler = EnergyCallbackHandler(meter=meter)
    rid = uuid4()
    handler.on_llm_start({}, ["p"], run_id=rid)
    handler.on_llm_end(LLMResult(generations=[[Generation(text="x")]], llm_output={"token_usage": {
        "prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}}), run_id=rid)
    handler.close()
    row = handler.to_dataframe().iloc[0]
    assert (row.prompt_tokens, row.completion_tokens, row.cached_tokens, row.token_source) == (7, 3, 4, "llm_output")


class State(TypedDict):
    text: str
    summary: str


def test_langgraph_node_names_appear():
    meter = ReplayMeter({"cpu": [(0.0, 3.0)]}, clock=time.monotonic)
    llm = FakeListLLM(responses=["first draft", "better draft"])

    def initial_summary(state: State) -> dict:
        return {"summary": llm.invoke(f"Summarize {state['text']}")}

    def refine(state: State) -> dict:
        return {"summary": llm.invoke(f"Refine {state['summary']}")}

    g = StateGraph(State)
    g.add_node("initial_summary", initial_summary)
    g.add_node("refine", refine)
    g.add_edge(START, "initial_summary")
    g.add_edge("initial_summary", "refine")
    g.add_edge("refine", END)
    graph = g.compile()
    with energy_callback(meter=meter) as handler:
        result = graph.invoke({"text": "doc", "summary": ""})
    assert result["summary"] == "better draft"
    df = handler.to_dataframe()
    nodes = df[df.langgraph_node.isin(["initial_summary", "refine"]) & (df.kind == "chain")]
    assert set(nodes.name) >= {"initial_summary", "refine"}
    llm_rows = df[df.kind == "llm"]
    assert len(llm_rows) == 2
    # each LLM call sits under its node, in the graph's one workflow
    node_ids = dict(zip(nodes.run_id, nodes.name))
    assert {node_ids.get(p) for p in llm_rows.parent_run_id} == {"initial_summary", "refine"}
    assert df.root_run_id.nunique() == 1
    s = handler.summary().iloc[0]
    assert s.workflow == "LangGraph" and s.llm_calls == 2


def test_errors_are_recorded_and_never_break_the_chain():
    meter = ReplayMeter({"cpu": [(0.0, 2.0)]}, clock=time.monotonic)
    handler = EnergyCallbackHandler(meter=meter)

    def maybe_fail(x: int) -> int:
        if x == 2:
            raise ValueError("bad input 2")
        return x

    chain = RunnableLambda(maybe_fail, name="maybe_fail") | RunnableLambda(lambda x: x * 10, name="times_ten")
    outs = chain.batch([1, 2, 3], config={"callbacks": [handler]}, return_exceptions=True)
    assert outs[0] == 10 and isinstance(outs[1], ValueError) and outs[2] == 30
    with pytest.raises(FakeListChatModelError):
        list(FakeListChatModel(responses=["abc"], error_on_chunk_number=1).stream(
            "x", config={"callbacks": [handler]}))
    handler.close()
    df = handler.to_dataframe()
    failed = df[df.status == "error"]
    assert "ValueError: bad input 2" in set(failed.error)
    assert (df[df.kind == "chat_model"].status == "error").all()
    s = handler.summary()
    assert (s.status == "error").sum() == 2 and (s.status == "ok").sum() == 2
    assert not (df.status == "running").any()


def test_a_broken_meter_never_breaks_the_chain():
    class BrokenMeter(ReplayMeter):
        def read(self):
            raise OSError("counter gone")

    handler = EnergyCallbackHandler(meter=BrokenMeter({"cpu": [(0.0, 1.0)]}, clock=time.monotonic))
    chain = PromptTemplate.from_template("{q}") | FakeListLLM(responses=["fine"])
    assert chain.invoke({"q": "x"}, config={"callbacks": [handler]}) == "fine"
    handler.close()
    assert handler.timeline.errors > 0
    assert "meter read failures" in handler.report()
    assert len(handler.to_dataframe()) == 3


def test_energy_callback_context_picks_up_runs_without_passing_callbacks():
    meter = ReplayMeter({"cpu": [(0.0, 1.0)]}, clock=time.monotonic)
    llm = FakeListLLM(responses=["r"])
    with energy_callback(meter=meter) as cb:
        llm.invoke("inside")
        assert cb.timeline.running
    llm.invoke("outside")
    assert len(cb.to_dataframe()) == 1
    assert not cb.timeline.running


async def test_energy_callback_context_reaches_async_tasks():
    meter = ReplayMeter({"cpu": [(0.0, 1.0)]}, clock=time.monotonic)
    llm = FakeListLLM(responses=["r"])
    with energy_callback(meter=meter) as cb:
        await asyncio.gather(*(llm.ainvoke(f"q{i}") for i in range(5)))
    assert len(cb.summary()) == 5


def test_idle_baseline_gives_active_energy():
    clock, meter = manual_meter()
    handler = EnergyCallbackHandler(meter=meter, idle_power_w=30.0)
    chain = RunnableLambda(lambda x: (clock.advance(2.0), x)[1], name="work")
    chain.invoke(1, config={"callbacks": [handler]})
    handler.close()
    s = handler.summary().iloc[0]
    assert s.energy_j == pytest.approx(220.0)
    assert s.idle_energy_j == pytest.approx(60.0) and s.active_energy_j == pytest.approx(160.0)
    assert "idle baseline=30.00 W" in handler.report()


def test_idle_baseline_from_model_or_measurement():
    est = EstimatedMeter(PowerModel(cpu_tdp_w=40.0, idle_fraction=0.25, dram_gib=8.0))
    h = EnergyCallbackHandler(meter=est, idle_power_w="model")
    assert h.idle_power_w == {"cpu": pytest.approx(10.0), "dram": pytest.approx(3.0)}
    h.close()
    replay = ReplayMeter({"cpu": [(0.0, 12.0)]}, clock=time.monotonic)
    h2 = EnergyCallbackHandler(meter=replay, idle_power_w="measure", idle_measure_s=0.05)
    assert h2.idle_power_w == {"cpu": pytest.approx(12.0)}
    h2.close()
    with pytest.raises(ConfigError):
        EnergyCallbackHandler(meter=replay, idle_power_w="model")  # a replay has no idle model
    with pytest.raises(ConfigError):
        EnergyCallbackHandler(meter=replay, idle_power_w=-1.0)
    with pytest.raises(ConfigError):
        EnergyCallbackHandler(meter=replay, idle_power_w="sometimes")
    with pytest.raises(ConfigError):
        EnergyCallbackHandler(meter=replay, weighting="by-vibes")  # type: ignore[arg-type]


def test_report_and_timeline_frame():
    clock, meter = manual_meter()
    handler = EnergyCallbackHandler(meter=meter)
    RunnableLambda(lambda x: (clock.advance(1.0), x)[1], name="step").invoke(0, config={"callbacks": [handler]})
    handler.close()
    text = handler.report()
    assert "workflow step [ok]" in text and "gpu=measured:nvml" in text and "energy 110.00 J" in text
    tf = handler.timeline_frame()
    assert {"t", "energy_cpu_j", "power_gpu0_w", "cpu_util"} <= set(tf.columns)
    assert tf.power_gpu0_w.dropna().eq(100.0).all()
    assert tf.cpu_util.dropna().between(0, 100).all()  # the machine's own utilization beside the meter's joules


def test_columns_are_stable_when_nothing_ran():
    handler = EnergyCallbackHandler(meter=ReplayMeter({"cpu": [(0.0, 1.0)]}))
    assert list(handler.to_dataframe().columns) == list(RUN_COLUMNS)
    assert list(handler.summary().columns) == list(SUMMARY_COLUMNS)
    assert "(no runs recorded)" in handler.report()




def test_the_timeline_counts_the_energy_handlers_alive_on_it():
    # (The middleware skips looking for another handler of the call while its own is the only one alive.)
    import gc

    from langchain_energy.timeline import Timeline

    timeline = Timeline(ReplayMeter({"cpu": [(0.0, 10.0)]}, clock=ManualClock()))
    first, second = EnergyCallbackHandler(timeline=timeline), EnergyCallbackHandler(timeline=timeline)
    assert timeline.handlers == 2
    del first
    gc.collect()
    assert timeline.handlers == 1 and second.timeline is timeline
