"""The workflow scheduler's policies on recorded run trees (LangChain callback events), pure and clocked by hand."""

from __future__ import annotations

import asyncio
from typing import TypedDict
from uuid import UUID, uuid4

import pytest
from langgraph.graph import END, START, StateGraph

from langchain_energy.errors import ConfigError
from langchain_energy.scheduling import POLICIES, WorkflowScheduler


class FakeClock:
    """Test double for time.monotonic: advanced by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def chain(s: WorkflowScheduler, parent: UUID | None = None, node: str | None = None) -> UUID:
    run = uuid4()
    meta = {"langgraph_node": node} if node else {}
    s.on_chain_start(None, {}, run_id=run, parent_run_id=parent, metadata=meta, name=node or "chain")
    return run


def llm(s: WorkflowScheduler, parent: UUID | None, node: str | None = None) -> UUID:
    run = uuid4()
    meta = {"langgraph_node": node} if node else {}
    s.on_llm_start({}, ["prompt"], run_id=run, parent_run_id=parent, metadata=meta)
    return run


def end_llm(s: WorkflowScheduler, run: UUID) -> None:
    s.on_llm_end(None, run_id=run)


async def _admit(s: WorkflowScheduler, order: list[str], run_id: UUID, name: str) -> None:
    """Wait at the gate, note the admission, hand the slot back."""
    ticket = await s.acquire(run_id)
    order.append(name)
    s.release(ticket)


def test_an_unknown_policy_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="unknown scheduling policy 'lifo'.*fcfs"):
        WorkflowScheduler("lifo")
    assert set(POLICIES) == {"fcfs", "workflow-fcfs", "least-attained", "critical-path"}


def test_fcfs_sends_no_priority_and_orders_by_arrival():
    clock = FakeClock()
    s = WorkflowScheduler("fcfs", clock=clock)
    a, b = chain(s), chain(s)
    b1 = llm(s, b)
    clock.t += 1
    a1 = llm(s, a)
    assert s.priority(a1) is None and s.priority(b1) is None
    assert s.order([a1, b1]) == [b1, a1]


def test_workflow_fcfs_puts_the_workflow_that_started_first_first():
    clock = FakeClock()
    s = WorkflowScheduler("workflow-fcfs", clock=clock)
    a = chain(s)
    clock.t += 0.1
    b = chain(s)
    b1 = llm(s, b)          # B's call is ready first...
    clock.t += 2
    a1 = llm(s, a)          # ...but A started first
    assert s.order([b1, a1]) == [a1, b1]
    assert s.priority(a1) < s.priority(b1)
    # Once A is done, B is first among the open workflows.
    s.on_chain_end({}, run_id=a)
    b2 = llm(s, b)
    assert s.position(b2).workflow_rank == 0


def test_least_attained_puts_the_workflow_with_least_engine_time_first():
    clock = FakeClock()
    s = WorkflowScheduler("least-attained", clock=clock, quantum_s=1.0)
    a, b = chain(s), chain(s)
    a1 = llm(s, a)
    clock.t += 3.0           # A has had 3 s of engine time
    end_llm(s, a1)
    b1 = llm(s, b)
    clock.t += 0.5
    end_llm(s, b1)           # B 0.5 s
    a2 = llm(s, a)
    b2 = llm(s, b)
    assert s.position(a2).attained_s == pytest.approx(3.0)
    assert s.order([a2, b2]) == [b2, a2]


class _S(TypedDict):
    x: int


def _graph():
    """architect -> engineer -> reviewer -> reviser -> END, and architect -> notes -> END (a short branch)."""
    builder = StateGraph(_S)
    for name in ("architect", "engineer", "reviewer", "reviser", "notes"):
        builder.add_node(name, lambda state: state)
    builder.add_edge(START, "architect")
    builder.add_edge("architect", "engineer")
    builder.add_edge("architect", "notes")
    builder.add_edge("engineer", "reviewer")
    builder.add_edge("reviewer", "reviser")
    builder.add_edge("reviser", END)
    builder.add_edge("notes", END)
    return builder.compile()


def test_critical_path_puts_the_branch_with_the_longest_remaining_path_first():
    clock = FakeClock()
    s = WorkflowScheduler("critical-path", graph=_graph(), clock=clock)
    root = chain(s)
    notes = llm(s, chain(s, root, "notes"), "notes")
    clock.t += 1
    engineer = llm(s, chain(s, root, "engineer"), "engineer")
    assert s.position(engineer).remaining_path == 3 and s.position(notes).remaining_path == 1
    assert s.order([notes, engineer]) == [engineer, notes]


def test_critical_path_counts_a_loop_once_and_takes_the_longest_exit():
    builder = StateGraph(_S)
    for name in ("draft", "refine", "done"):
        builder.add_node(name, lambda state: state)
    builder.add_edge(START, "draft")
    builder.add_edge("draft", "refine")
    builder.add_conditional_edges("refine", lambda state: "done", ["refine", "done"])
    builder.add_edge("done", END)
    s = WorkflowScheduler("critical-path", graph=builder.compile())
    root = chain(s)
    assert s.position(llm(s, chain(s, root, "draft"), "draft")).remaining_path == 3


def test_critical_path_without_a_graph_falls_back_to_depth_deepest_first():
    clock = FakeClock()
    s = WorkflowScheduler("critical-path", clock=clock)
    root = chain(s)
    shallow = llm(s, root)
    clock.t += 1
    deep = llm(s, chain(s, chain(s, root)))
    assert s.position(deep).depth == 3 and s.position(shallow).depth == 1
    assert s.position(deep).remaining_path is None
    assert s.order([shallow, deep]) == [deep, shallow]


def test_position_knows_workflow_node_depth_and_calls_done_and_pending():
    s = WorkflowScheduler("workflow-fcfs")
    root = chain(s)
    node = chain(s, root, "summarize")
    first = llm(s, node, "summarize")
    end_llm(s, first)
    second, third = llm(s, node, "summarize"), llm(s, node, "summarize")
    pos = s.position(third)
    assert pos.workflow_id == root and pos.node == "summarize" and pos.depth == 2
    assert pos.calls_done == 1 and pos.calls_pending == 2
    assert second != third


def test_ageing_bounds_the_wait_of_a_request_behind_later_better_ones():
    # A has received 10 quanta of engine time; B-like newcomers have none. Without ageing they would pass A's
    # waiting request forever; with ageing_s=2 a newcomer ready more than 10 * 2 s after A's request loses.
    clock = FakeClock()
    s = WorkflowScheduler("least-attained", clock=clock, quantum_s=1.0, ageing_s=2.0)
    a = chain(s)
    warm = llm(s, a)
    clock.t += 10.0
    end_llm(s, warm)
    waiting = llm(s, a)
    for waited in (1.0, 10.0, 19.9):
        clock.t = 110.0 + waited
        newcomer = llm(s, chain(s))
        assert s.order([waiting, newcomer]) == [newcomer, waiting], waited
        assert s.effective_priority(waiting) == pytest.approx(10 - waited / 2.0)
    clock.t = 110.0 + 20.1
    late = llm(s, chain(s))
    assert s.order([late, waiting]) == [waiting, late]
    assert s.wait_bound_s(waiting, better_base=0) == pytest.approx(20.0)


def test_without_ageing_a_waiting_request_can_be_passed_forever():
    clock = FakeClock()
    s = WorkflowScheduler("least-attained", clock=clock, quantum_s=1.0, ageing_s=None)
    a = chain(s)
    warm = llm(s, a)
    clock.t += 10.0
    end_llm(s, warm)
    waiting = llm(s, a)
    clock.t += 1e6
    assert s.order([waiting, llm(s, chain(s))])[-1] == waiting
    assert s.wait_bound_s(waiting, better_base=0) is None


# -- the admission gate ------------------------------------------------------------------------------------

def test_the_gate_releases_held_calls_in_policy_order_and_ages_them():
    async def scenario() -> list[str]:
        clock = FakeClock()
        s = WorkflowScheduler("least-attained", clock=clock, quantum_s=1.0, ageing_s=2.0, max_in_flight=1,
                              handoff_s=0.0)
        order: list[str] = []
        a = chain(s)
        warm = llm(s, a)
        clock.t += 10.0
        end_llm(s, warm)
        blocker = llm(s, chain(s))
        holding = await s.acquire(blocker)
        waiting_a = llm(s, a)                    # held: the slot is taken

        task_a = asyncio.ensure_future(_admit(s, order, waiting_a, "a"))
        await asyncio.sleep(0)
        clock.t += 25.0                          # A's call has waited past its bound (10 quanta * 2 s)
        newcomer = llm(s, chain(s))
        task_n = asyncio.ensure_future(_admit(s, order, newcomer, "newcomer"))
        await asyncio.sleep(0)
        assert s.waiting == 2 and s.in_flight == 1
        s.release(holding)
        await asyncio.gather(task_a, task_n)
        return order

    assert asyncio.run(scenario()) == ["a", "newcomer"]


def test_the_gate_hands_a_freed_slot_to_the_same_workflow_next_call():
    async def scenario() -> list[str]:
        s = WorkflowScheduler("workflow-fcfs", max_in_flight=1, handoff_s=5.0)
        order: list[str] = []
        a, b = chain(s), chain(s)
        a1 = llm(s, a)
        ticket = await s.acquire(a1)
        task_b = asyncio.ensure_future(_admit(s, order, llm(s, b), "b1"))
        await asyncio.sleep(0)
        s.release(ticket)                        # the slot is kept for A, whose next call comes a moment later
        end_llm(s, a1)
        await asyncio.sleep(0.01)
        assert order == []
        await _admit(s, order, llm(s, a), "a2")
        s.on_chain_end({}, run_id=a)             # A is done: nothing more to keep a slot for
        await task_b
        stats = s.slot_stats()
        assert (stats["kept"], stats["handed"], stats["ended"]) == (2, 1, 1) and stats["idle_s"] > 0.005
        return order

    assert asyncio.run(scenario()) == ["a2", "b1"]


@pytest.mark.parametrize("policy, kwargs, at_once", [
    ("workflow-fcfs", {"handoff_s": 0.0}, True),     # a work-conserving gate keeps no slot
    ("fcfs", {"handoff_s": 5.0}, True),          # fcfs keeps no slot whatever the handoff
    ("workflow-fcfs", {"handoff_s": 0.05}, False),   # a kept slot goes on once the workflow does not come back
])
def test_a_freed_slot_goes_to_the_next_waiter(policy, kwargs, at_once):
    async def scenario() -> list[str]:
        s = WorkflowScheduler(policy, max_in_flight=1, **kwargs)
        order: list[str] = []
        a, b = chain(s), chain(s)                # A started first and is still running: it would go first
        ticket = await s.acquire(llm(s, a))
        task_b = asyncio.ensure_future(_admit(s, order, llm(s, b), "b1"))
        await asyncio.sleep(0)
        s.release(ticket)
        for _ in range(3):
            await asyncio.sleep(0)
        assert (order == ["b1"]) is at_once
        await asyncio.wait_for(task_b, timeout=2.0)
        return order

    assert asyncio.run(scenario()) == ["b1"]


def test_workflows_below_a_fan_out_root_are_workflows_of_their_own():
    # A workload's root run fans out documents; with workflow_depth=1 each document is a workflow, and the
    # root, a container, does not count in the ranks.
    s = WorkflowScheduler("workflow-fcfs", workflow_depth=1)
    root = chain(s)
    doc1, doc2 = chain(s, root), chain(s, root)
    c1, c2 = llm(s, chain(s, doc1, "refine"), "refine"), llm(s, chain(s, doc2, "refine"), "refine")
    assert s.position(c1).workflow_id == doc1 and s.position(c2).workflow_id == doc2
    assert (s.position(c1).workflow_rank, s.position(c2).workflow_rank) == (0, 1)
    end_llm(s, c1)
    s.on_chain_end({}, run_id=doc1)
    assert s.position(llm(s, doc2)).workflow_rank == 0
    assert s.workflows_finished == 1


def test_a_cancelled_wait_gives_nothing_away():
    async def scenario() -> int:
        s = WorkflowScheduler("workflow-fcfs", max_in_flight=1)
        ticket = await s.acquire(llm(s, chain(s)))
        task = asyncio.ensure_future(s.acquire(llm(s, chain(s))))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        s.release(ticket)
        return s.in_flight + s.waiting

    assert asyncio.run(scenario()) == 0


def test_bad_gate_and_ageing_values_are_config_errors():
    for kwargs in ({"max_in_flight": 0}, {"ageing_s": 0}, {"quantum_s": -1}, {"handoff_s": -0.1},
                   {"workflow_depth": -1}):
        with pytest.raises(ConfigError):
            WorkflowScheduler("workflow-fcfs", **kwargs)


def test_finished_workflows_are_forgotten_so_memory_stays_bounded():
    s = WorkflowScheduler("least-attained")
    for _ in range(50):
        root = chain(s)
        end_llm(s, llm(s, root))
        s.on_chain_end({}, run_id=root)
    assert s.open_runs == 0 and s.workflows_finished == 50


def test_runs_started_inside_the_block_report_to_the_scheduler():
    from langchain_core.runnables import RunnableLambda

    seen: list[int] = []
    with WorkflowScheduler("workflow-fcfs") as s:
        RunnableLambda(lambda x: seen.append(s.open_runs) or x).invoke(1)
    RunnableLambda(lambda x: seen.append(s.open_runs) or x).invoke(1)
    assert seen == [1, 0] and s.workflows_finished == 1
