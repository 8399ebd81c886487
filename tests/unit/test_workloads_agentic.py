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
