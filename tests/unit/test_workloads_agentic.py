"""The multi-agent coding graph: roles, parallel module branches, bounded review rounds."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.language_models.fake import FakeListLLM

from chains.workloads.agentic import TASKS, agentic_workload, build_agentic_graph, calls_per_task, resolve_task
from langchain_energy.errors import ConfigError, DataError
from tests.unit._workload_helpers import PromptRecorder, SlowFakeLLM


def test_full_size_task_makes_17_calls_in_the_study_range():
    rec = PromptRecorder()
    graph = build_agentic_graph(FakeListLLM(responses=["code"]), rounds=2, code_tokens=40, review_tokens=20)
    out = asyncio.run(graph.ainvoke({"task": "snake"}, {"callbacks": [rec]}))
    assert out["calls"] == len(rec.calls) == calls_per_task(3, 2) == 17
    assert 15 <= out["calls"] <= 20
    roles = rec.roles()
    assert roles[0] == "architect" and roles[-1] == "integrator"
    assert roles.count("engineer") == 3 and roles.count("reviewer") == 6 and roles.count("reviser") == 6
    caps = {c["metadata"]["role"]: c["metadata"].get("ls_max_tokens") for c in rec.calls}
    assert caps == {"architect": 20, "engineer": 40, "reviewer": 20, "reviser": 40, "integrator": 40}
    assert sorted(r["module"] for r in out["results"]) == sorted(TASKS["snake"]["modules"])
    assert all(r["rounds"] == 2 for r in out["results"])


def test_module_branches_run_in_parallel():
    llm = SlowFakeLLM(responses=["x"], sleep=0.05)
    graph = build_agentic_graph(llm, rounds=0)
    out = asyncio.run(graph.ainvoke({"task": "todo"}))
    assert out["calls"] == 5  # architect, three engineers, integrator
    assert llm.peak_in_flight == 3  # the three engineers were in flight together


def test_graph_structure_fans_out_to_module_subgraph():
    g = build_agentic_graph(FakeListLLM(responses=["x"])).get_graph(xray=1)
    nodes = set(g.nodes)
    assert {"architect", "integrate", "module:engineer", "module:reviewer", "module:reviser"} <= nodes
    edges = {(e.source, e.target) for e in g.edges}
    assert ("module:reviser", "module:reviewer") in edges  # the review loop
    assert ("architect", "module:engineer") in edges or ("architect", "module") in edges


def test_rounds_override_in_state_and_validation():
    graph = build_agentic_graph(FakeListLLM(responses=["x"]), rounds=2)
    out = asyncio.run(graph.ainvoke({"task": "calculator", "rounds": 1}))
    assert out["calls"] == calls_per_task(3, 1) == 11
    with pytest.raises(ConfigError):
        build_agentic_graph(FakeListLLM(responses=["x"]), rounds=-1)


def test_tasks_by_name_or_brief():
    assert resolve_task("snake")["modules"] == TASKS["snake"]["modules"]
    assert resolve_task("a tiny http server")["name"] == "custom"
    with pytest.raises(DataError):
        resolve_task("  ")


def test_workload_runs_tasks_concurrently():
    rec = PromptRecorder()
    wl = agentic_workload(FakeListLLM(responses=["x"]), rounds=1, users=2)
    out = asyncio.run(wl.ainvoke(["snake", "todo"], {"callbacks": [rec]}))
    assert [o["calls"] for o in out] == [11, 11] and len(rec.calls) == 22


def test_one_user_still_runs_a_tasks_modules_in_parallel_but_tasks_one_at_a_time():
    llm = SlowFakeLLM(responses=["x"], sleep=0.05)
    wl = agentic_workload(llm, rounds=0, users=1)
    asyncio.run(wl.ainvoke(["snake", "todo"]))
    # Each task has three modules; a second task in flight at once would push the peak past three.
    assert llm.peak_in_flight == 3


# -- the tool-using engineer ---------------------------------------------------------------------------------
from typing import Any  # noqa: E402

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessage, ToolMessage  # noqa: E402
from langchain_core.messages.tool import invalid_tool_call, tool_call  # noqa: E402
from langchain_core.outputs import ChatGeneration, ChatResult  # noqa: E402

from chains.workloads.agentic import check_syntax  # noqa: E402


class ToolCallingFakeChat(BaseChatModel):
    """Test double of a tool-calling chat model: with a forced tool bound it calls it with ``code``; otherwise text.

    ``cut`` makes its tool call come back incomplete, as a call cut at the token cap does.
    """

    code: str = "def add(a, b):\n    return a + b\n"
    cut: bool = False
    seen: list = []

    @property
    def _llm_type(self) -> str:
        return "tool-calling-fake"

    def bind_tools(self, tools, *, tool_choice=None, **kwargs):
        return self.bind(tools=[t.name for t in tools], tool_choice=tool_choice, **kwargs)

    def _generate(self, messages, stop=None, run_manager=None, tools=None, tool_choice=None, **kwargs):
        self.seen.append((messages[-1].content, tool_choice))
        if tools and self.cut:
            message = AIMessage(content="", invalid_tool_calls=[invalid_tool_call(
                name=tool_choice, args='{"code": "def add(a, b):\\n    return (a +', id="call_cut", error="cut")])
        elif tools:
            message = AIMessage(content="", tool_calls=[tool_call(name=tool_choice, args={"code": self.code},
                                                                   id=f"call_{len(self.seen)}")])
        else:
            message = AIMessage(content="a reply")
        return ChatResult(generations=[ChatGeneration(message=message)])


class ToolRuns(BaseCallbackHandler):
    """Records the tool runs and model calls that LangChain reports."""

    def __init__(self) -> None:
        self.tools: list[str] = []
        self.models = 0

    def on_tool_start(self, serialized, input_str, **kwargs: Any) -> None:
        self.tools.append(serialized.get("name"))

    def on_chat_model_start(self, serialized, messages, **kwargs: Any) -> None:
        self.models += 1


def test_check_syntax_parses_without_running_the_code():
    assert check_syntax.invoke({"code": "import os\nos.remove('/nonexistent')\n"}) == "ok"
    assert check_syntax.invoke({"code": "def f(:\n  pass"}).startswith("SyntaxError: ")
    assert "(line 2)" in check_syntax.invoke({"code": "x = 1\ny = (\n"})


def test_a_tool_calling_engineer_round_trips_through_its_syntax_check():
    model = ToolCallingFakeChat(seen=[])
    runs = ToolRuns()
    out = asyncio.run(build_agentic_graph(model, rounds=1).ainvoke({"task": "snake"}, {"callbacks": [runs]}))
    # One forced call per engineer, one tool run per engineer; the tool runs are not model calls.
    assert out["tool_calls"] == 3 and runs.tools == ["check_syntax"] * 3
    assert out["calls"] == runs.models == calls_per_task(3, 1)
    assert sum(1 for _, choice in model.seen if choice == "check_syntax") == 3
    assert [r["syntax"] for r in out["results"]] == ["ok"] * 3
    # The code the engineers submitted to the tool, and the tool's verdict, come back to the team: the reviewers
    # read both.
    reviews = [text for text, choice in model.seen if text.startswith("You are a code reviewer")]
    assert len(reviews) == 3 and all(model.code in r and "Syntax check of the module: ok" in r for r in reviews)


def test_a_call_cut_at_the_cap_is_still_answered_on_its_partial_code():
    runs = ToolRuns()
    out = asyncio.run(build_agentic_graph(ToolCallingFakeChat(cut=True, seen=[]), rounds=0).ainvoke(
        {"task": "todo"}, {"callbacks": [runs]}))
    assert out["tool_calls"] == 3 and runs.tools == ["check_syntax"] * 3
    assert all(r["code"].startswith("def add(a, b):") and r["syntax"].startswith("SyntaxError")
               for r in out["results"])


def test_the_engineers_history_holds_its_tool_call_and_the_tool_message():
    from chains.workloads.agentic import _module_graph

    async def updates():
        graph = _module_graph(ToolCallingFakeChat(seen=[]))
        state = {"brief": "b", "design": "d", "module": "m", "rounds": 0, "code_tokens": 8, "review_tokens": 8}
        return [u async for u in graph.astream(state, stream_mode="updates")]

    checked = next(u["check"] for u in asyncio.run(updates()) if "check" in u)
    prompt, call, answer = checked["messages"]
    assert call.tool_calls[0]["name"] == "check_syntax" and isinstance(answer, ToolMessage)
    assert answer.tool_call_id == call.tool_calls[0]["id"] and answer.content == "ok"


def test_on_parrot_the_engineer_writes_plain_text():
    # Parrot decodes no JSON schema: the chat model refuses tools as LangChain's models without them do.
    from chains.workloads.agentic import _tool_engineer
    from langchain_energy import ChatServing

    assert _tool_engineer(ChatServing(backend="parrot", base_url="http://127.0.0.1:9")) is None
    assert _tool_engineer(ChatServing(backend="openai", base_url="http://127.0.0.1:9/v1")) is not None
