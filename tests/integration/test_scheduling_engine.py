"""The workflow scheduler on the real embedded vLLM engine (the session's one engine, priority scheduling)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import RunnableLambda, RunnableParallel

from langchain_energy.chat_models import ChatServing
from langchain_energy.llms import ServingLLM
from langchain_energy.scheduling import WorkflowScheduler

pytestmark = pytest.mark.engine


class CallClock(BaseCallbackHandler):
    """Records when each LLM call of each tagged workflow starts and ends (a real handler beside the scheduler)."""

    def __init__(self) -> None:
        self.starts: dict[str, list[float]] = {}
        self.ends: dict[str, list[float]] = {}

    def on_llm_start(self, serialized: Any, prompts: Any, *, run_id: UUID, tags: list[str] | None = None,
                     **kwargs: Any) -> None:
        name = next(t for t in tags or [] if t.startswith("wf-"))
        self.starts.setdefault(name, []).append(time.monotonic())

    def on_llm_end(self, response: Any, *, run_id: UUID, tags: list[str] | None = None, **kwargs: Any) -> None:
        name = next(t for t in tags or [] if t.startswith("wf-"))
        self.ends.setdefault(name, []).append(time.monotonic())


def _three_calls(llm: ServingLLM | ChatServing):
    """A sequential workflow of three LLM calls, each fed by the previous answer (text or chat message)."""
    step = RunnableLambda(lambda text: f"Continue this in one sentence: {text[-200:]}")
    call = llm | StrOutputParser()
    return call | step | call | step | call


async def _two_workflows(llm: ServingLLM | ChatServing, scheduler: WorkflowScheduler) -> CallClock:
    clock = CallClock()
    workflow = _three_calls(llm)

    async def one(name: str) -> str:
        return await workflow.ainvoke(f"Write about {name}.", config={"callbacks": [scheduler, clock], "tags": [name]})

    first = asyncio.ensure_future(one("wf-a"))
    while "wf-a" not in clock.starts:   # A's first call has started; both are in flight together from then on
        await asyncio.sleep(0.01)
    await asyncio.gather(first, one("wf-b"))
    return clock


@pytest.mark.parametrize("policy, model", [("workflow-fcfs", ServingLLM), ("fcfs", ServingLLM),
                                           ("workflow-fcfs", ChatServing)])
def test_two_workflows_finish_in_order_under_workflow_fcfs_and_interleave_under_fcfs(vllm_server, policy, model):
    # One slot at the gate: the order of admission is the whole story (the slot is kept between A's calls).
    scheduler = WorkflowScheduler(policy, max_in_flight=1, handoff_s=1.0)
    llm = model.from_server(vllm_server, max_tokens=12, ignore_eos=True, seed=0, scheduler=scheduler)
    ends = asyncio.run(_two_workflows(llm, scheduler)).ends
    a, b = ends["wf-a"], ends["wf-b"]
    assert len(a) == len(b) == 3
    if policy == "workflow-fcfs":
        assert max(a) < min(b)          # A's last call ends before B's first: one after the other
    else:
        assert min(b) < max(a)          # B's calls run between A's
    assert scheduler.in_flight == 0 and scheduler.waiting == 0 and scheduler.open_runs == 0


def _fan_out(llm: ServingLLM, width: int):
    return RunnableParallel({f"call{i}": llm for i in range(width)})


@pytest.mark.parametrize("policy", ["workflow-fcfs", "fcfs"])
def test_the_engine_serves_an_older_workflow_first_from_the_priority_alone(vllm_server, policy):
    # No gate: the order comes from vLLM's priority queue. A blocker workflow fills the engine's 8 slots; then
    # B's eight calls arrive before A's, although A's workflow started first. Once all sixteen wait, the blocker
    # is cancelled (vLLM aborts a request whose client went away), which frees every slot at once. Under
    # workflow-fcfs the engine serves A's waiting calls first; under fcfs, B's, which came first.
    width = vllm_server.config.max_num_seqs
    scheduler = WorkflowScheduler(policy)
    llm = ServingLLM.from_server(vllm_server, max_tokens=16, ignore_eos=True, seed=0, scheduler=scheduler)
    # Long enough to outlast any slow spell of the machine: it never ends on its own, the test ends it.
    blocker_llm = ServingLLM.from_server(vllm_server, max_tokens=2048, ignore_eos=True, seed=0, scheduler=scheduler)
    clock = CallClock()

    async def run() -> None:
        def cfg(name: str) -> dict:
            return {"callbacks": [scheduler, clock], "tags": [name]}

        async def started(name: str, settle_s: float = 0.1) -> None:  # the workflow's calls reached the engine
            while len(clock.starts.get(name, [])) < width:
                await asyncio.sleep(0.01)
            await asyncio.sleep(settle_s)

        blocker = asyncio.ensure_future(_fan_out(blocker_llm, width).ainvoke("Describe a river.", config=cfg("wf-0")))
        await started("wf-0")

        async def late_a(text: str) -> dict:
            await started("wf-b")   # A's root started before B's, but its calls reach the engine after B's
            return await _fan_out(llm, width).ainvoke(text)

        a = asyncio.ensure_future(RunnableLambda(late_a).ainvoke("Describe a lake.", config=cfg("wf-a")))
        await asyncio.sleep(0.02)
        b = asyncio.ensure_future(_fan_out(llm, width).ainvoke("Describe a hill.", config=cfg("wf-b")))
        await started("wf-a", settle_s=0.5)
        # The premise: the blocker still holds the engine's slots while every call of A and B waits.
        assert "wf-0" not in clock.ends and not blocker.done(), "the blocker ended before A's calls arrived"
        blocker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await blocker
        await asyncio.gather(a, b)

    asyncio.run(run())
    a, b = clock.ends["wf-a"], clock.ends["wf-b"]
    assert len(a) == len(b) == width
    if policy == "workflow-fcfs":
        assert max(a) < min(b)
    else:
        assert max(b) < min(a)


@pytest.mark.parametrize("model", [ServingLLM, ChatServing])
def test_streaming_and_sync_calls_go_through_the_gate(vllm_server, model):
    scheduler = WorkflowScheduler("workflow-fcfs", max_in_flight=1)
    llm = model.from_server(vllm_server, max_tokens=8, ignore_eos=True, seed=0, scheduler=scheduler) | StrOutputParser()
    with scheduler:
        chunks = list(llm.stream("Count to five."))
        text = llm.invoke("Name a colour.")
    assert "".join(chunks).strip() and text.strip()
    assert scheduler.in_flight == 0 and scheduler.open_runs == 0 and scheduler.workflows_finished == 2
