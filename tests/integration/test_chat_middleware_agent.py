"""EnergyBudgetMiddleware in `create_agent` with ChatServing and a tool, on the session's embedded engine."""

from __future__ import annotations

import asyncio

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool

from langchain_energy import ChatServing, EnergyBudgetMiddleware

pytestmark = pytest.mark.engine

TASK = "Write a Python function add(a, b) that returns a + b, then check its syntax with the tool."


@tool
def check_syntax(code: str) -> str:
    """Check that Python source code compiles; returns 'ok' or the syntax error."""
    try:
        compile(code, "<module>", "exec")
    except SyntaxError as exc:
        return f"syntax error: {exc.msg} (line {exc.lineno})"
    return "ok"


class ToolFirst(AgentMiddleware):
    """The 135M model answers "auto" in prose: call the tool first (forced), then answer without tools."""

    def _choose(self, request):
        called = any(isinstance(m, ToolMessage) for m in request.messages)
        return request.override(tool_choice="none" if called else "any")

    def wrap_model_call(self, request, handler):
        return handler(self._choose(request))

    async def awrap_model_call(self, request, handler):
        return await handler(self._choose(request))


@pytest.fixture(scope="module")
def chat(vllm_server):
    return ChatServing.from_server(vllm_server, max_tokens=48, temperature=0, seed=0)


def _agent(chat, budget):
    return create_agent(chat, tools=[check_syntax], middleware=[budget, ToolFirst()])


def test_a_run_within_budget_ends_normally_with_its_energy_in_the_state(chat):
    state = _agent(chat, EnergyBudgetMiddleware(budget_j=1e9)).invoke({"messages": [("user", TASK)]})
    kinds = [type(m).__name__ for m in state["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert state["messages"][1].tool_calls[0]["name"] == "check_syntax"
    energy = state["energy"]
    assert energy["model_calls"] == 2 and not energy["exhausted"] and energy["fallback_calls"] == 0
    assert energy["energy_j"] > 0 and energy["output_tokens"] > 0 and energy["input_tokens"] > 0
    assert energy["j_per_token"] == pytest.approx(energy["energy_j"] / energy["output_tokens"])
    assert set(energy["provenance"]) >= {"cpu", "gpu", "dram"}


def test_a_spent_budget_ends_the_run_cleanly_with_a_message_saying_so(chat):
    state = _agent(chat, EnergyBudgetMiddleware(budget_j=1e-6)).invoke({"messages": [("user", TASK)]})
    last = state["messages"][-1]
    assert isinstance(last, AIMessage) and "energy budget is spent" in last.content and not last.tool_calls
    assert state["energy"]["model_calls"] == 1 and state["energy"]["exhausted"]
    assert isinstance(state["messages"][-2], ToolMessage)  # the tool ran; the second model call did not


def test_a_spent_joules_per_token_budget_switches_to_the_fallback_model(chat, vllm_server):
    fallback = ChatServing.from_server(vllm_server, max_tokens=8, temperature=0, seed=0)
    budget = EnergyBudgetMiddleware(budget_j_per_token=1e-9, fallback_model=fallback)

    async def run():
        return await _agent(chat, budget).ainvoke({"messages": [("user", TASK)]})

    state = asyncio.run(run())
    energy = state["energy"]
    assert energy["model_calls"] == 2 and energy["fallback_calls"] == 1 and energy["exhausted"]
    answer = state["messages"][-1]
    assert isinstance(answer, AIMessage) and answer.usage_metadata["output_tokens"] <= 8
