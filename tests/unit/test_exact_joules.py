"""Joules you can trust: each case a careful user hit (replay meter and manual clock as test doubles)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from typing import Any
from uuid import uuid4

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel, BaseLLM
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, ChatResult, Generation, LLMResult

from langchain_energy.callbacks import EnergyCallbackHandler, energy_callback, get_energy_callback
from langchain_energy.meters import ManualClock, ReplayMeter
from langchain_energy.timeline import Timeline


def replay(watts: float = 100.0, **more: Any) -> tuple[ManualClock, ReplayMeter]:
    clock = ManualClock(50.0)
    traces = {"gpu:0": [(0.0, watts)], **more}
    prov = {k: ("measured:nvml" if k.startswith("gpu") else "estimated:replay") for k in traces}
    return clock, ReplayMeter(traces, clock=clock, provenance=prov)


class PerCallLatencyLLM(BaseLLM):
    """Test double of a serving LLM that batches in its engine: each prompt's own latency in generation_info
    (as `ServingLLM` reports it), while LangChain ends every call only after the whole batch returns."""

    clock: Any
    latencies: list[float]

    @property
    def _llm_type(self) -> str:
        return "per-call-latency"

    def _generate(self, prompts: list[str], stop: Any = None, run_manager: Any = None, **kw: Any) -> LLMResult:
        lat = self.latencies[: len(prompts)]
        self.clock.advance(max(lat))
        gens = [[Generation(text="x" * 10, generation_info={"prompt_tokens": 5, "completion_tokens": 10,
                                                             "latency_s": t, "sent_after_s": 0.0})]
                for t in lat]
        return LLMResult(generations=gens)


class BatchOnlyLLM(BaseLLM):
    """Test double of a completion LLM (like `VLLMOpenAI`) that reports only the batch's summed usage."""

    clock: Any
    seconds: float = 2.0

    @property
    def _llm_type(self) -> str:
        return "batch-only"

    def _generate(self, prompts: list[str], stop: Any = None, run_manager: Any = None, **kw: Any) -> LLMResult:
        self.clock.advance(self.seconds)
        return LLMResult(generations=[[Generation(text=p)] for p in prompts],
                         llm_output={"token_usage": {"prompt_tokens": 500, "completion_tokens": 500}})


def test_a_batch_of_calls_ends_each_call_at_its_own_end():
    clock, meter = replay(100.0)
    llm = PerCallLatencyLLM(clock=clock, latencies=[0.2, 0.2, 0.2, 2.0])
    with EnergyCallbackHandler(meter=meter) as handler:
        llm.batch(["a", "b", "c", "d"], config={"callbacks": [handler]})
    df = handler.to_dataframe()
    assert sorted(df.energy_j.round(6)) == pytest.approx([5.0, 5.0, 5.0, 185.0])
    assert sorted(df.latency_s.round(6)) == pytest.approx([0.2, 0.2, 0.2, 2.0])
    assert set(df.timing) == {"response"}


def test_a_batch_with_only_batch_level_timing_is_split_by_tokens_and_says_so():
    clock, meter = replay(100.0)
    llm = FakeListLLM(responses=["one", "one two three"])
    counter = lambda text: len(text.split())  # noqa: E731
    with EnergyCallbackHandler(meter=meter, token_counter=counter) as handler:
        advance = _Advance(clock, 2.0)
        llm.batch(["p", "p"], config={"callbacks": [advance, handler]})
    df = handler.to_dataframe().sort_values("completion_tokens")
    assert list(df.timing) == ["batch", "batch"]
    # 200 J for the batch; tokens (prompt 1 + completion) 2 and 4 -> 1/3 and 2/3
    assert list(df.energy_j) == pytest.approx([200.0 / 3, 400.0 / 3])


class _Advance(BaseCallbackHandler):
    """Test double for model latency: moves the manual clock when a call ends (listed before the handler)."""

    def __init__(self, clock: ManualClock, seconds: float) -> None:
        self.clock, self.seconds, self.done = clock, seconds, False

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        if not self.done:  # a batch's calls end together: advance once
            self.clock.advance(self.seconds)
            self.done = True


def test_two_handlers_alive_at_once_share_one_split():
    clock, meter = replay(100.0)
    first = EnergyCallbackHandler(meter=meter)
    second = EnergyCallbackHandler(meter=meter)
    a, b = uuid4(), uuid4()
    first.on_llm_start({}, ["x"], run_id=a)
    second.on_llm_start({}, ["y"], run_id=b)
    clock.advance(0.5)
    first.on_llm_end(LLMResult(generations=[[Generation(text="o")]]), run_id=a)
    second.on_llm_end(LLMResult(generations=[[Generation(text="o")]]), run_id=b)
    ea = first.to_dataframe().energy_j.sum()
    eb = second.to_dataframe().energy_j.sum()
    first.close(), second.close()
    assert (ea, eb) == (pytest.approx(25.0), pytest.approx(25.0))


def test_a_long_run_stays_exact_with_memory_bounded_by_what_is_open():
    clock, meter = replay(300.0)
    timeline = Timeline(meter, interval_s=0.1, max_samples=500)  # the display copy thins often
    handler = EnergyCallbackHandler(meter=meter, timeline=timeline)
    handler._ensure_started()
    timeline._stop.set()  # the manual clock drives sampling here
    call = uuid4()
    handler.on_llm_start({}, ["x"], run_id=call)
    for _ in range(20):
        clock.advance(0.1)
        timeline.sample_now()
    handler.on_llm_end(LLMResult(generations=[[Generation(text="o")]]), run_id=call)
    held = []
    for _ in range(36_000):  # one hour more at 10 Hz
        clock.advance(0.1)
        timeline.sample_now()
        held.append(timeline.ledger.samples_held)
    row = handler.to_dataframe().iloc[0]
    handler.close()
    assert row.energy_j == pytest.approx(600.0, rel=1e-9)
    assert max(held) < 100


def test_token_counts_are_per_call_never_an_aggregate():
    clock, meter = replay(100.0)
    with EnergyCallbackHandler(meter=meter) as handler:
        BatchOnlyLLM(clock=clock).batch(["a", "b", "c"], config={"callbacks": [handler]})
    df = handler.to_dataframe()
    assert df.completion_tokens.isna().all()  # the batch's 500 is never put on call one
    assert set(df.token_source) == {"unavailable:batch-aggregate"}
    assert df.energy_j.round(6).nunique() == 1


class TwoChoiceChat(BaseChatModel):
    """Test double of ChatOpenAI with n=2: the response's usage sits on every choice."""

    @property
    def _llm_type(self) -> str:
        return "two-choice"

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
        usage = {"input_tokens": 10, "output_tokens": 40, "total_tokens": 50}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=c, usage_metadata=usage))
                                       for c in ("a", "b")])


def test_usage_on_every_choice_is_counted_once():
    clock, meter = replay(100.0)
    with EnergyCallbackHandler(meter=meter) as handler:
        TwoChoiceChat().invoke("hi", config={"callbacks": [handler]})
    row = handler.to_dataframe().iloc[0]
    assert (row.prompt_tokens, row.completion_tokens) == (10, 40)


def test_nested_energy_callback_blocks_both_record():
    clock, meter = replay(100.0)
    llm = FakeListLLM(responses=["a"])
    with energy_callback(meter=meter) as outer:
        llm.invoke("1")
        with energy_callback(meter=meter) as inner:
            llm.invoke("2")
            llm.invoke("3")
    assert (len(outer.runs), len(inner.runs)) == (3, 2)


def test_energy_per_token_leaves_calls_without_counts_out_of_both_sides():
    clock, meter = replay(100.0)
    with EnergyCallbackHandler(meter=meter) as handler:
        root = uuid4()
        handler.on_chain_start({}, {}, run_id=root)
        counted, blind = uuid4(), uuid4()
        handler.on_llm_start({}, ["x"], run_id=counted, parent_run_id=root)
        clock.advance(1.0)
        info = {"prompt_tokens": 5, "completion_tokens": 50}
        handler.on_llm_end(LLMResult(generations=[[Generation(text="o", generation_info=info)]]), run_id=counted)
        handler.on_llm_start({}, ["x"], run_id=blind, parent_run_id=root)
        clock.advance(3.0)
        handler.on_llm_end(LLMResult(generations=[[Generation(text="o")]]), run_id=blind)
        handler.on_chain_end({}, run_id=root)
    s = handler.summary().iloc[0]
    assert s.energy_j == pytest.approx(400.0)
    assert s.energy_per_token_j == pytest.approx(100.0 / 50)
    assert s.calls_without_tokens == 1
    assert "left out of J/token" in handler.report()


def test_closing_freezes_results_and_reports_open_calls_as_open():
    clock, meter = replay(100.0)
    handler = EnergyCallbackHandler(meter=meter)
    handler.on_llm_start({}, ["x"], run_id=uuid4())
    clock.advance(62.0)
    handler.close()
    clock.advance(600.0)
    row = handler.to_dataframe().iloc[0]
    assert row.energy_j == pytest.approx(6200.0)
    assert row.status == "open_at_close" and math.isnan(row.latency_s)
    assert handler.to_dataframe().iloc[0].energy_j == pytest.approx(6200.0)


def test_measured_joules_stand_beside_the_total_with_provenance():
    clock, meter = replay(100.0, cpu=[(0.0, 20.0)])
    with EnergyCallbackHandler(meter=meter) as handler:
        run = uuid4()
        handler.on_llm_start({}, ["x"], run_id=run)
        clock.advance(1.0)
        handler.on_llm_end(LLMResult(generations=[[Generation(text="o")]]), run_id=run)
    df = handler.to_dataframe()
    row = df.iloc[0]
    assert (row.energy_j, row.energy_measured_j, row.energy_gpu0_j) == (
        pytest.approx(120.0), pytest.approx(100.0), pytest.approx(100.0))
    assert row.provenance_gpu == "measured:nvml@gpu0"
    assert df.attrs["provenance"]["energy_measured_j"].startswith("sum of measured:nvml")
    assert "estimated:replay" in df.attrs["provenance"]["energy_j"]


def test_engine_start_inside_a_call_is_a_run_of_its_own():
    clock, meter = replay(100.0)
    with EnergyCallbackHandler(meter=meter) as handler:
        run = uuid4()
        handler.on_llm_start({}, ["x"], run_id=run)
        clock.advance(36.0)
        info = {"prompt_tokens": 20, "completion_tokens": 30, "engine_start_s": 35.0, "sent_after_s": 35.0,
                "latency_s": 1.0, "ttft_s": 0.1}
        handler.on_llm_end(LLMResult(generations=[[Generation(text="o", generation_info=info)]]), run_id=run)
    df = handler.to_dataframe().set_index("kind")
    assert df.loc["llm"].energy_j == pytest.approx(100.0)
    assert df.loc["llm"].latency_s == pytest.approx(1.0)
    assert df.loc["engine_start"].energy_j == pytest.approx(3500.0)
    assert handler.summary().set_index("workflow").loc["llm"].energy_per_token_j == pytest.approx(100.0 / 30)


def test_every_call_edge_is_sampled():
    clock, meter = replay(100.0)
    with EnergyCallbackHandler(meter=meter) as handler:
        clock.advance(0.05)
        before = meter.reads
        for _ in range(5):
            run = uuid4()
            handler.on_llm_start({}, ["x"], run_id=run)
            clock.advance(0.01)
            handler.on_llm_end(LLMResult(generations=[[Generation(text="o")]]), run_id=run)
            clock.advance(0.05)
        assert meter.reads - before >= 10


def test_an_estimate_is_read_at_a_calls_end_but_not_at_its_start():
    # An estimate's joules over an interval come from the utilization measured over it, known at the interval's
    # end: a read at a call's start would only make the time before it use an older utilization. (A counter
    # that steps, such as NVML's, is read at both edges: the test above.)
    clock = ManualClock(50.0)
    meter = ReplayMeter({"cpu": [(0.0, 100.0)]}, clock=clock, provenance={"cpu": "estimated:replay"})
    reads_here = []
    real_read = meter.read
    meter.read = lambda: (reads_here.append(threading.current_thread() is threading.main_thread()), real_read())[1]
    with EnergyCallbackHandler(meter=meter) as handler:
        clock.advance(0.05)
        before = sum(reads_here)
        results = [PerCallLatencyLLM(clock=clock, latencies=[0.01]).generate(["x"], callbacks=[handler])
                   for _ in range(5)]
        assert sum(reads_here) - before == 5
    energies = [r.generations[0][0].generation_info["energy"] for r in results]
    assert all(e["final"] for e in energies)
    assert [e["energy_j"] for e in energies] == pytest.approx([100.0 * 0.01] * 5)


def test_a_call_shorter_than_the_edge_window_still_gets_its_final_joules_on_the_response():
    clock, meter = replay(100.0)
    with EnergyCallbackHandler(meter=meter) as handler:
        clock.advance(0.05)
        results = [PerCallLatencyLLM(clock=clock, latencies=[0.0005]).generate(["x"], callbacks=[handler])
                   for _ in range(3)]  # each call starts and ends within a millisecond of the last sample
        again = handler.energy_of(handler.runs[-1].run_id)
    energies = [r.generations[0][0].generation_info["energy"] for r in results]
    assert all(e["final"] for e in energies)
    assert sum(e["energy_j"] for e in energies) == pytest.approx(100.0 * 0.0015)
    assert again == energies[-1]


def test_energy_of_a_run_and_energy_per_model():
    clock, meter = replay(100.0)
    chat = FakeListChatModel(responses=["hello"])
    with get_energy_callback(meter=meter) as cb:
        chat.invoke("hi", config={"callbacks": [_Advance(clock, 2.0)]})
        run_id = cb.runs[0].run_id
        energy = cb.energy_of(run_id)
    assert energy["energy_j"] == pytest.approx(200.0) and energy["final"]
    assert energy["provenance"]["gpu"] == "measured:nvml@gpu0"
    by_model = cb.energy_by_model
    (name, agg), = by_model.items()
    assert agg["calls"] == 1 and agg["energy_j"] == pytest.approx(200.0)
    assert cb.energy_of(uuid4()) is None


class Seen(BaseCallbackHandler):
    """A user's ordinary (non-inline) handler."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def on_llm_start(self, *a: Any, **k: Any) -> None:
        self.events.append("start")

    def on_chat_model_start(self, *a: Any, **k: Any) -> None:
        self.events.append("start")

    def on_llm_end(self, *a: Any, **k: Any) -> None:
        self.events.append("end")


@pytest.mark.parametrize("model", ["llm", "chat"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_users_other_handler_sees_every_event_beside_ours(model, mode):
    clock, meter = replay(100.0)
    runnable = FakeListLLM(responses=["a"] * 3) if model == "llm" else FakeListChatModel(responses=["a"] * 3)
    seen = Seen()
    with EnergyCallbackHandler(meter=meter) as handler:
        config = {"callbacks": [seen, handler]}
        if mode == "sync":
            runnable.batch(["x", "y", "z"], config=config)
        else:
            asyncio.run(runnable.abatch(["x", "y", "z"], config=config))
    assert seen.events.count("start") == 3 and seen.events.count("end") == 3
    assert len(handler.runs) == 3


def test_calls_whose_start_langchain_skipped_are_recorded_from_their_end(caplog):
    class InlineTracer(BaseCallbackHandler):
        run_inline = True

    clock, meter = replay(100.0)
    with EnergyCallbackHandler(meter=meter) as handler, caplog.at_level(logging.WARNING):
        asyncio.run(FakeListLLM(responses=["a", "b"]).abatch(["x", "y"],
                                                              config={"callbacks": [handler, InlineTracer()]}))
    df = handler.to_dataframe()
    assert df.kind.tolist() == ["llm", "llm"] and set(df.timing) == {"end-only"}
    assert "never saw" in caplog.text


def test_a_calls_energy_is_on_the_response_of_our_models_and_by_run_for_any_class():
    clock, meter = replay(100.0)
    with EnergyCallbackHandler(meter=meter) as handler:
        result = PerCallLatencyLLM(clock=clock, latencies=[1.5]).generate(["x"], callbacks=[handler])
        message = FakeListChatModel(responses=["hi"]).invoke("x", config={"callbacks": [_Advance(clock, 2.0),
                                                                                       handler]})
    energy = result.generations[0][0].generation_info["energy"]
    assert energy["energy_j"] == pytest.approx(150.0) and energy["final"]
    assert energy["provenance"]["gpu"] == "measured:nvml@gpu0"
    assert "energy" not in message.response_metadata  # another class's message is left as it was
    chat_run = next(r.run_id for r in handler.runs if r.kind == "chat_model")
    assert handler.energy_of(chat_run)["energy_j"] == pytest.approx(200.0)


def test_an_idle_gpu_beside_the_engine_is_not_charged_to_calls():
    from langchain_energy.meters import forget_served_gpus, serve_on_gpus

    clock, meter = replay(300.0, **{"gpu:1": [(0.0, 70.0)]})
    try:
        serve_on_gpus([0])  # what the managed server registers when it starts on GPU 0
        with EnergyCallbackHandler(meter=meter) as handler:
            run = uuid4()
            handler.on_llm_start({}, ["x"], run_id=run)
            clock.advance(10.0)
            handler.on_llm_end(LLMResult(generations=[[Generation(text="o")]]), run_id=run)
    finally:
        forget_served_gpus()
    row = handler.to_dataframe().iloc[0]
    assert row.energy_gpu_j == pytest.approx(3000.0) and row.energy_gpu0_j == pytest.approx(3000.0)
    assert "energy_gpu1_j" not in handler.to_dataframe().columns
    assert row.provenance_gpu == "measured:nvml@gpu0"


def test_a_batchs_energy_on_the_response_is_its_final_split():
    clock, meter = replay(100.0)
    llm = PerCallLatencyLLM(clock=clock, latencies=[2.0, 0.2, 1.0])  # reported in prompt order, not end order
    with EnergyCallbackHandler(meter=meter) as handler:
        result = llm.generate(["a", "b", "c"], callbacks=[handler])
    on_response = [g[0].generation_info["energy"]["energy_j"] for g in result.generations]
    by_start = handler.to_dataframe().energy_j.tolist()
    assert on_response == pytest.approx(by_start, rel=1e-12)
    assert on_response == pytest.approx([100 * (0.2 / 3 + 0.8 / 2 + 1.0), 100 * 0.2 / 3, 100 * (0.2 / 3 + 0.8 / 2)])


def test_a_call_shorter_than_the_counters_step_says_so():
    clock, meter = replay(100.0)
    meter.resolution_s = 0.1  # as the Zeus meter declares for NVML's ~100 ms counter
    with EnergyCallbackHandler(meter=meter) as handler:
        for seconds in (0.05, 0.5):
            run = uuid4()
            handler.on_llm_start({}, ["x"], run_id=run)
            clock.advance(seconds)
            handler.on_llm_end(LLMResult(generations=[[Generation(text="o")]]), run_id=run)
    assert handler.to_dataframe().below_resolution.tolist() == [True, False]


@pytest.mark.parametrize("keep", [True, False])
def test_a_call_recorded_outside_the_callbacks_gets_its_joules_at_its_end(keep):
    clock, meter = replay(100.0)
    with EnergyCallbackHandler(meter=meter) as handler:
        clock.advance(0.05)
        call = handler.start_call("outside", keep=keep)
        clock.advance(2.0)
        message = AIMessage(content="ok", usage_metadata={"input_tokens": 5, "output_tokens": 3, "total_tokens": 8},
                            response_metadata={"latency_s": 2.0})  # (as this package's models report)
        energy = handler.end_call(call, [message])
        assert energy["energy_j"] == pytest.approx(200.0) and energy["final"]
        assert message.response_metadata["energy"] == energy
        held = handler.ledger._holders.get(call.run_id, 0)  # (the ledger's holders of the run)
        if keep:
            assert handler.energy_of(call.run_id) == energy and handler.runs[0].completion_tokens == 3
            assert held == 1
        else:
            # Nothing of the call stays with the handler, and the ledger drops it once folded.
            assert handler.runs == [] and handler.energy_of(call.run_id) is None and held == 0
            clock.advance(1.0)
            handler.timeline.sample_now()
            handler.ledger.fold()
            assert handler.ledger.view("equal", runs=[call.run_id]).received == {}
