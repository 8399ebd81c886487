"""EnergyBudgetMiddleware without an engine: budgets are validated, the state schema carries the summary."""

from __future__ import annotations

import math
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.messages.tool import tool_call
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

from langchain_energy import ChatServing, EnergyBudgetMiddleware, EnergyCallbackHandler
from langchain_energy.errors import ConfigError
from langchain_energy.meters import ManualClock, ReplayMeter
from langchain_energy.middleware import EnergyBudgetState, _model_name


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "10", True])
def test_a_budget_must_be_a_positive_number(bad):
    with pytest.raises(ConfigError, match="positive number"):
        EnergyBudgetMiddleware(budget_j=bad)
    with pytest.raises(ConfigError, match="positive number"):
        EnergyBudgetMiddleware(budget_j_per_token=bad)


def test_some_budget_is_needed_and_the_fallback_is_a_chat_model():
    with pytest.raises(ConfigError, match="budget_j or budget_j_per_token"):
        EnergyBudgetMiddleware()
    with pytest.raises(ConfigError, match="chat model"):
        EnergyBudgetMiddleware(budget_j=1.0, fallback_model="smaller-model")
    assert EnergyBudgetMiddleware(budget_j=1.0, fallback_model=ChatServing()).fallback_model is not None


def test_the_budget_trips_on_joules_or_on_joules_per_token():
    by_joules = EnergyBudgetMiddleware(budget_j=10.0)
    summary = by_joules._fresh()
    assert by_joules._spent(summary) is None
    assert "10 J budget" in by_joules._spent({**summary, "energy_j": 10.0})
    by_rate = EnergyBudgetMiddleware(budget_j_per_token=0.5, min_tokens_for_rate=4)
    assert by_rate._spent({**summary, "energy_j": 3.0, "output_tokens": 2, "j_per_token": 1.5}) is None
    assert "J/token" in by_rate._spent({**summary, "energy_j": 3.0, "output_tokens": 4, "j_per_token": 0.75})


def test_the_energy_summary_is_part_of_the_agent_state():
    assert "energy" in EnergyBudgetState.__annotations__
    assert EnergyBudgetMiddleware.state_schema is EnergyBudgetState


class CountingHandler:
    """Test double of the energy handler: counts `energy_of` look-ups and answers each with 2 J."""

    def __init__(self) -> None:
        self.lookups = 0

    def energy_of(self, run_id):
        self.lookups += 1
        return {"energy_j": 2.0, "energy_measured_j": 0.0, "provenance": {"cpu": "estimated:test"}}


def test_the_energy_on_our_models_messages_is_read_without_asking_the_ledger():
    import uuid

    handler = CountingHandler()
    mw = EnergyBudgetMiddleware(budget_j=100.0, handler=handler)
    ours = AIMessage(content="hi", usage_metadata={"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
                     response_metadata={"energy": {"energy_j": 5.0, "energy_measured_j": 0.0,
                                                   "provenance": {"cpu": "estimated:on-message"}}})
    summary = mw._add_call(mw._fresh(), mw._call_energies([uuid.uuid4()], [ours]), [ours], fallback=False)
    assert handler.lookups == 0 and summary["energy_j"] == 5.0 and summary["output_tokens"] == 4
    assert summary["provenance"] == {"cpu": "estimated:on-message"}
    # Another chat model's message carries no energy: the handler's split is used instead.
    other = AIMessage(content="hi")
    summary = mw._add_call(summary, mw._call_energies([uuid.uuid4()], [other]), [other], fallback=False)
    assert handler.lookups == 1 and summary["energy_j"] == 7.0 and summary["model_calls"] == 2


@tool
def noop(x: str) -> str:
    """Do nothing."""
    return "done"


class ScriptedChat(BaseChatModel):
    """Test double of a chat model. In each run it asks for the `noop` tool `tool_rounds` times, then answers;
    each call takes `seconds` of `clock` (a manual clock) when one is given, carries `energy_j` on its message as
    this package's models do when set, and notes the callback handlers it saw."""

    clock: Any = None
    seconds: float = 0.0
    tool_rounds: int = 0
    energy_j: float | None = None
    calls: int = 0
    seen: list = []

    @property
    def _llm_type(self) -> str:
        return "scripted-fake"

    def bind_tools(self, tools, **kwargs):
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.calls += 1
        self.seen.append([type(h).__name__ for h in (run_manager.handlers if run_manager else [])])
        if self.clock is not None:
            self.clock.advance(self.seconds)
        last_human = max(i for i, m in enumerate(messages) if isinstance(m, HumanMessage))
        done = sum(isinstance(m, ToolMessage) for m in messages[last_human:])
        calls = [tool_call(name="noop", args={"x": "a"}, id=f"c{self.calls}")] if done < self.tool_rounds else []
        energy = ({} if self.energy_j is None else
                  {"energy": {"energy_j": self.energy_j, "energy_measured_j": 0.0,
                              "provenance": {"cpu": "estimated:test"}}})
        message = AIMessage(content="" if calls else "done", tool_calls=calls, response_metadata=energy,
                            usage_metadata={"input_tokens": 3, "output_tokens": 4, "total_tokens": 7})
        return ChatResult(generations=[ChatGeneration(message=message)])


def test_a_spent_budget_ends_the_run_with_a_message_and_no_further_model_call():
    model = ScriptedChat(tool_rounds=99, energy_j=5.0)  # every answer calls the tool and costs 5 J
    agent = create_agent(model, tools=[noop], middleware=[EnergyBudgetMiddleware(budget_j=1.0)])
    state = agent.invoke({"messages": [("user", "go")]})
    assert model.calls == 1
    assert [type(m).__name__ for m in state["messages"]] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert isinstance(state["messages"][2], ToolMessage) and "energy budget is spent" in state["messages"][-1].content
    assert state["energy"]["energy_j"] == 5.0 and state["energy"]["model_calls"] == 1 and state["energy"]["exhausted"]


def _timed_agent(seconds: float, handler, tool_rounds: int = 0, **agent_kwargs):
    """An agent whose model calls take `seconds` each on the handler's manual clock, metered by `handler`."""
    model = ScriptedChat(clock=handler.timeline.clock, seconds=seconds, tool_rounds=tool_rounds)
    middleware = EnergyBudgetMiddleware(budget_j=1e9, handler=handler)
    return model, create_agent(model, tools=[noop], middleware=[middleware], **agent_kwargs)


def _replay_handler(watts: float) -> EnergyCallbackHandler:
    clock = ManualClock(10.0)
    meter = ReplayMeter({"gpu:0": [(0.0, watts)]}, clock=clock, provenance={"gpu:0": "measured:nvml"})
    return EnergyCallbackHandler(meter=meter)


def test_alone_the_middleware_meters_a_model_call_without_langchain_callbacks():
    handler = _replay_handler(100.0)
    model, agent = _timed_agent(2.0, handler)
    with handler:
        state = agent.invoke({"messages": [("user", "go")]})
    assert model.seen == [[]]  # no callback handler was added to the model call
    assert state["energy"]["energy_j"] == pytest.approx(200.0) and state["energy"]["output_tokens"] == 4
    calls = handler.to_dataframe()
    assert len(calls) == 1 and calls.iloc[0].kind == "chat_model" and calls.iloc[0].completion_tokens == 4


def test_a_call_is_recorded_under_its_models_name():
    class Named(ScriptedChat):
        model_name: str = "tiny-1"

    class NamedByProperty(ScriptedChat):
        @property
        def model(self) -> str:
            return "tiny-2"

    assert [_model_name(m) for m in (Named(), NamedByProperty(), ScriptedChat())] == ["tiny-1", "tiny-2",
                                                                                        "ScriptedChat"]


def test_beside_the_users_energy_handler_a_model_call_is_counted_once():
    handler = _replay_handler(100.0)
    users = EnergyCallbackHandler(timeline=handler.timeline)  # the user's own handler, on the same meter
    model, agent = _timed_agent(2.0, handler)
    with handler, users:
        state = agent.invoke({"messages": [("user", "go")]}, config={"callbacks": [users]})
    assert "EnergyCallbackHandler" in model.seen[0]
    calls = users.to_dataframe().query("kind == 'chat_model'")
    assert len(calls) == 1 and calls.iloc[0].energy_j == pytest.approx(200.0)  # not halved by a second record
    assert state["energy"]["energy_j"] == pytest.approx(200.0)


def test_each_run_on_a_thread_has_its_own_budget():
    model = ScriptedChat(energy_j=5.0)  # answers at once with 5 J on the message
    agent = create_agent(model, tools=[], middleware=[EnergyBudgetMiddleware(budget_j=8.0)],
                         checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": "one"}}
    summaries = [agent.invoke({"messages": [("user", f"question {i}")]}, thread)["energy"] for i in range(3)]
    assert model.calls == 3  # a spent budget of an earlier run never stops a later one
    assert [s["model_calls"] for s in summaries] == [1, 1, 1] and [s["energy_j"] for s in summaries] == [5.0] * 3
    other = agent.invoke({"messages": [("user", "hi")]}, {"configurable": {"thread_id": "two"}})["energy"]
    assert other["model_calls"] == 1


def test_a_run_on_a_thread_keeps_one_summary_over_its_model_calls():
    handler = _replay_handler(100.0)
    model, agent = _timed_agent(1.0, handler, tool_rounds=1, checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": "t"}}
    with handler:
        runs = [agent.invoke({"messages": [("user", f"go {i}")]}, thread)["energy"] for i in range(2)]
    # Each run: a model call, the tool, a model call; its summary holds both calls and nothing of the other run.
    assert [r["model_calls"] for r in runs] == [2, 2]
    assert [r["energy_j"] for r in runs] == [pytest.approx(200.0)] * 2


def test_the_middlewares_own_handler_keeps_no_record_of_the_calls_it_has_counted():
    """A long-lived agent makes calls without end: once a call's joules are in its run's summary, the handler
    the middleware made for itself keeps nothing of it (a handler given by the user keeps its table)."""
    middleware = EnergyBudgetMiddleware(budget_j=1e9)
    model = ScriptedChat(tool_rounds=1)  # two model calls per run, no energy on the message: the ledger's split
    agent = create_agent(model, tools=[noop], middleware=[middleware])
    ledger = middleware.handler.ledger  # (the process's shared one: other handlers may hold runs in it)
    held_before = len(ledger._cum)  # (the ledger's per-run tables)
    summaries = [agent.invoke({"messages": [("user", f"go {i}")]})["energy"] for i in range(40)]
    assert [s["model_calls"] for s in summaries] == [2] * 40 and all(s["energy_j"] > 0 for s in summaries)
    ledger.fold()
    assert middleware.handler.runs == []
    assert len(ledger._cum) - held_before < 10  # what is folded and forgotten is dropped
