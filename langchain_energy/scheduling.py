"""Workflow-aware scheduling: which LangChain/LangGraph workflow a request belongs to, and who goes first.

`WorkflowScheduler` is a callback handler. It sees chain, graph-node and LLM runs start and end, so it knows
each request's workflow (the root run), its position (LangGraph node, depth, calls done and pending) and the
engine time its workflow has had. From these a policy gives each request a priority, which the model classes
send to vLLM (``--scheduling-policy priority``: lower runs first), and, with ``max_in_flight``, an admission
gate on the client holds calls while the engine's slots are full and releases them in the same order.

Every policy orders requests by one key, lower first::

    key = base * ageing_s + ready_time

where ``base`` is the policy's rank of the request (in steps, fixed when the request becomes ready) and
``ready_time`` the moment its LLM run started. Since every waiting request's key falls at the same rate with
time, this is the ageing rule "a request's effective priority ``base - waited / ageing_s`` improves by one
step every ``ageing_s`` seconds of waiting", written in a form that a server can enforce with a static
priority. The bound follows: a request of base ``b`` goes before every request of base ``b'`` that becomes
ready more than ``(b - b') * ageing_s`` seconds after it, so no request waits forever behind newcomers.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, AsyncIterator
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.tracers.context import register_configure_hook

from langchain_energy.errors import ConfigError

POLICIES: tuple[str, ...] = ("fcfs", "workflow-fcfs", "least-attained", "critical-path")
"""The policies, each chosen by its name."""

_GRAPH_ENDS = ("__start__", "__end__")


@dataclass(frozen=True)
class RequestPosition:
    """Where one LLM request stands in its workflow, as the scheduler sees it.

    Attributes:
        run_id: the LLM run.
        workflow_id: the root run of its tree (the workflow).
        workflow_rank: open workflows that started before this one (when the request became ready).
        node: the LangGraph node it runs in (``langgraph_node`` metadata of it or an ancestor), or None.
        depth: runs between it and the root (the root itself is 0).
        calls_done: LLM calls of the workflow that have ended.
        calls_pending: LLM calls of the workflow started and not ended, this one included.
        attained_s: engine seconds the workflow has had so far (calls from admission to end).
        remaining_path: nodes on the longest path from its node to the graph's end (critical-path with a
            graph and a known node), else None.
        base: the policy's rank of the request, in steps (lower first); 0 under ``fcfs``.
        ready_s: when the request became ready, on the scheduler's clock.
    """

    run_id: UUID
    workflow_id: UUID
    workflow_rank: int
    node: str | None
    depth: int
    calls_done: int
    calls_pending: int
    attained_s: float
    remaining_path: int | None
    base: int
    ready_s: float


@dataclass
class _Run:
    run_id: UUID
    parent: UUID | None
    root: UUID
    node: str | None
    depth: int
    is_llm: bool
    started: float
    base: int = 0
    rank: int = 0
    remaining: int | None = None
    sent: float | None = None
    counted: bool = False
    detached: bool = False


@dataclass
class _Workflow:
    root: UUID
    started: float
    seq: int
    depth: int = 0
    runs: set[UUID] = field(default_factory=set)
    calls_done: int = 0
    open_calls: set[UUID] = field(default_factory=set)
    attained_s: float = 0.0


@dataclass(eq=False)
class _Reservation:
    root: UUID
    since: float
    timer: threading.Timer | None = None


@dataclass(eq=False)
class Ticket:
    """One admitted call: hand it back to `WorkflowScheduler.release` when the call has ended."""

    run_id: UUID
    workflow_id: UUID
    priority: int | None


@dataclass(order=True)
class _Waiter:
    key: float
    seq: int
    run_id: UUID = field(compare=False)
    workflow_id: UUID = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)
    future: asyncio.Future = field(compare=False)
    granted: bool = field(default=False, compare=False)
    cancelled: bool = field(default=False, compare=False)


class WorkflowScheduler(BaseCallbackHandler):
    """Gives each LLM request of a LangChain/LangGraph workflow a priority, and optionally gates admission.

    Pass it in the callbacks of the runs to schedule (or run them inside ``with scheduler:``) and to the model
    (``ServingLLM(scheduler=...)``), which sends each call's priority to vLLM and, with ``max_in_flight``,
    waits at the gate before sending. The engine must be started with ``scheduling_policy="priority"`` for
    its own queue to follow the priorities (a FCFS engine ignores them; the gate still orders admission).

    Policies (``policy=``):

    - ``fcfs``: no priorities (vLLM's default order); the gate, if any, admits in arrival order.
    - ``workflow-fcfs``: the workflow that started first goes first (base: open workflows started before it).
    - ``least-attained``: the workflow with the least engine time so far goes first (base: attained seconds
      in quanta of ``quantum_s``), program-level least-attained service.
    - ``critical-path``: requests on the longest remaining path of the graph go first (from the compiled
      LangGraph ``graph=``, loops counted once); without a graph, or for a node it does not hold, the deepest
      run goes first (Parrot's deepest-first rule).

    Starvation is bounded by ageing (see the module's docstring): with ``ageing_s`` set (default 60 s), a
    request of base ``b`` goes before any request of base ``b'`` ready more than ``(b - b') * ageing_s``
    later; ``ageing_s=None`` turns ageing off (strict priorities, ties in arrival order).

    The gate (``max_in_flight=N``, the engine's ``max_num_seqs``) admits at most N calls at once, in policy
    order. When a call ends while others wait and its workflow is still running and would go first, its slot
    is kept for that workflow's next call for up to ``handoff_s`` seconds (the workflow's end gives it back at
    once): the leading workflows own their slots and finish in groups, where a freed slot would otherwise go
    to a waiting call of another workflow a moment before the leader's next call arrives (calls that start
    together end together, so the leaders would wait a whole call) and leave a tail of half-done workflows at
    a small batch. The price is the slot idle between one call's end and the next call's start (the actual
    gap, milliseconds where the client is not starved of CPU; ``handoff_s`` only bounds it for a workflow
    whose next call does not come).
    ``handoff_s=0`` makes the gate work-conserving at the client; measured on the CPU engine it served the
    load in more engine steps and more energy than FCFS, and kept no order (``bench/scheduling.py``). With the
    gate, every call to the engine must go through this scheduler for the count to be the engine's.

    A workflow is the run at ``workflow_depth`` on the path from the root (0: the root itself). A harness that
    runs many workflows under one root (a root that fans out documents or sessions) uses 1.

    Example:
        .. code-block:: python

            from langchain_energy import EngineConfig, ServingLLM, WorkflowScheduler

            scheduler = WorkflowScheduler("workflow-fcfs", max_in_flight=8)
            llm = ServingLLM(engine=EngineConfig(max_num_seqs=8, scheduling_policy="priority"), scheduler=scheduler)
            chain = prompt | llm | parse | prompt2 | llm
            with scheduler:
                results = await chain.abatch(inputs)   # workflows finish one after another, not all at the end
    """

    run_inline: bool = False  # langchain-core's async on_llm_start skips non-inline handlers only beside inline ones

    def __init__(self, policy: str = "workflow-fcfs", *, graph: Any = None, max_in_flight: int | None = None,
                 ageing_s: float | None = 60.0, quantum_s: float = 1.0, handoff_s: float = 0.25,
                 workflow_depth: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        """Choose a policy.

        Args:
            policy: one of `POLICIES`.
            graph: a compiled LangGraph graph (or anything with ``get_graph()``), for ``critical-path``.
            max_in_flight: admit at most this many calls to the engine at once (None: no gate).
            ageing_s: seconds of waiting worth one step of priority (None: no ageing).
            quantum_s: engine seconds per step of ``least-attained``.
            handoff_s: how long a freed slot is kept for the same workflow's next call (gate only; 0: never).
            workflow_depth: the depth of the run that is a workflow (0: the root run).
            clock: monotonic seconds (a fake clock in tests).
        """
        super().__init__()
        if policy not in POLICIES:
            raise ConfigError(f"unknown scheduling policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if max_in_flight is not None and (isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int)
                                          or max_in_flight < 1):
            raise ConfigError(f"max_in_flight must be a positive integer or None, got {max_in_flight!r}")
        if ageing_s is not None and not (isinstance(ageing_s, (int, float)) and ageing_s > 0):
            raise ConfigError(f"ageing_s must be a positive number of seconds or None, got {ageing_s!r}")
        if not (isinstance(quantum_s, (int, float)) and quantum_s > 0):
            raise ConfigError(f"quantum_s must be a positive number of seconds, got {quantum_s!r}")
        if not (isinstance(handoff_s, (int, float)) and handoff_s >= 0):
            raise ConfigError(f"handoff_s must be a number of seconds >= 0, got {handoff_s!r}")
        if isinstance(workflow_depth, bool) or not isinstance(workflow_depth, int) or workflow_depth < 0:
            raise ConfigError(f"workflow_depth must be an integer >= 0, got {workflow_depth!r}")
        self.policy = policy
        self.max_in_flight = max_in_flight
        self.ageing_s = None if ageing_s is None else float(ageing_s)
        self.quantum_s = float(quantum_s)
        self.handoff_s = float(handoff_s)
        self.workflow_depth = workflow_depth
        self._clock = clock
        self._epoch = clock()
        self._lock = threading.RLock()
        self._runs: dict[UUID, _Run] = {}
        self._workflows: dict[UUID, _Workflow] = {}
        self._workflow_seq = itertools.count()
        self._waiter_seq = itertools.count()
        self._waiters: list[_Waiter] = []
        self._in_flight = 0
        self._reserved: dict[UUID, list[_Reservation]] = {}   # workflow -> slots kept for its next calls
        self._kept = {"kept": 0, "handed": 0, "expired": 0, "ended": 0, "idle_s": 0.0}
        self.workflows_finished = 0
        self._remaining, self._longest = _remaining_paths(graph) if graph is not None else ({}, 0)
        self._token: Any = None

    # -- what callers ask ------------------------------------------------------------------------------
    def priority(self, run_id: UUID) -> int | None:
        """The priority to send to vLLM for this LLM run (lower first), or None under ``fcfs``.

        With ageing it is the key in milliseconds since the scheduler was made; without, the base.
        """
        if self.policy == "fcfs":
            return None
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            if self.ageing_s is None:
                return run.base
            return int(round(self._key(run) * 1000))

    def effective_priority(self, run_id: UUID) -> float:
        """The request's base improved by its waiting so far: ``base - waited / ageing_s`` (lower first)."""
        with self._lock:
            run = self._known(run_id)
            waited = self._clock() - run.started
            return run.base - (waited / self.ageing_s if self.ageing_s else 0.0)

    def wait_bound_s(self, run_id: UUID, better_base: int) -> float | None:
        """Seconds after which a request of base `better_base` that becomes ready no longer goes first.

        None when ageing is off: the request can then be passed forever.
        """
        with self._lock:
            run = self._known(run_id)
            if self.ageing_s is None:
                return None
            return max(0.0, (run.base - better_base) * self.ageing_s)

    def order(self, run_ids: Sequence[UUID]) -> list[UUID]:
        """The given LLM runs in the order this policy serves them."""
        with self._lock:
            runs = [self._known(r) for r in run_ids]
            return [r.run_id for r in sorted(runs, key=self._sort_key)]

    def position(self, run_id: UUID) -> RequestPosition:
        """Where an LLM run stands in its workflow (see `RequestPosition`)."""
        with self._lock:
            run = self._known(run_id)
            wf = self._workflows.get(run.root)
            now = self._clock()
            return RequestPosition(
                run_id=run.run_id, workflow_id=run.root, workflow_rank=run.rank, node=run.node, depth=run.depth,
                calls_done=wf.calls_done if wf else 0, calls_pending=len(wf.open_calls) if wf else 0,
                attained_s=self._attained(wf, now) if wf else 0.0, remaining_path=run.remaining, base=run.base,
                ready_s=run.started - self._epoch)

    def slot_stats(self) -> dict[str, float]:
        """What keeping freed slots cost: slots ``kept``, then ``handed`` to the workflow's next call, ``expired``
        after ``handoff_s``, or given back when the workflow ``ended``; ``idle_s``: seconds they stood kept."""
        with self._lock:
            return dict(self._kept)

    @property
    def in_flight(self) -> int:
        """Calls admitted by the gate and not yet released."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Calls held at the gate."""
        with self._lock:
            return sum(1 for w in self._waiters if not w.cancelled and not w.granted)

    @property
    def open_runs(self) -> int:
        """Runs of unfinished workflows that the scheduler still keeps."""
        return len(self._runs)

    # -- the gate --------------------------------------------------------------------------------------
    async def acquire(self, run_id: UUID) -> Ticket:
        """Wait until this LLM run may be sent to the engine; returns its ticket (with its priority).

        Without a gate it returns at once. A run the scheduler has not seen start (its callbacks did not
        include the scheduler) is scheduled as a workflow of its own and forgotten on release.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                run = self._start(run_id, None, {}, is_llm=True)
                run.detached = True
            if self.max_in_flight is None:
                return self._admit(run)
            kept = self._reserved.get(run.root)
            if kept:   # a slot kept for this workflow's next call: already counted in flight
                reservation = kept.pop(0)
                if not kept:
                    del self._reserved[run.root]
                if reservation.timer is not None:
                    reservation.timer.cancel()
                self._close_reservation(reservation, "handed")
                return self._admit(run)
            key = run.started if self.policy == "fcfs" else self._sort_key(run)[0]
            waiter = _Waiter(key, next(self._waiter_seq), run_id, run.root, loop, loop.create_future())
            if self._in_flight < self.max_in_flight and not self._better_waiting(waiter):
                self._in_flight += 1
                return self._admit(run)
            heapq.heappush(self._waiters, waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                waiter.cancelled = True
                if waiter.granted:
                    self._in_flight -= 1
                    self._grant()
            raise
        with self._lock:
            return self._admit(run)

    def _admit(self, run: _Run) -> Ticket:
        run.sent = self._clock()
        return Ticket(run.run_id, run.root, self.priority(run.run_id))

    def release(self, ticket: Ticket) -> None:
        """Hand a slot back once its call has ended; the next call in policy order is admitted."""
        with self._lock:
            run = self._runs.get(ticket.run_id)
            if run is not None:
                self._count_engine_time(run)
            if self.max_in_flight is not None:
                if run is not None and self._keep_for_workflow(run):
                    reservation = _Reservation(run.root, self._clock())
                    self._kept["kept"] += 1
                    self._reserved.setdefault(run.root, []).append(reservation)
                    reservation.timer = threading.Timer(self.handoff_s, self._expire, args=(reservation,))
                    reservation.timer.daemon = True
                    reservation.timer.start()
                else:
                    self._in_flight -= 1
                    self._grant()
            if run is not None and run.detached:
                self._end(run.run_id)

    def _count_engine_time(self, run: _Run) -> None:
        wf = self._workflows.get(run.root)
        if run.is_llm and not run.counted and wf is not None:
            wf.attained_s += max(0.0, self._clock() - (run.sent if run.sent is not None else run.started))
            run.counted = True

    @asynccontextmanager
    async def admitted(self, run_id: UUID) -> AsyncIterator[int | None]:
        """``async with scheduler.admitted(run_id) as priority:`` send the call inside; released on exit."""
        ticket = await self.acquire(run_id)
        try:
            yield ticket.priority
        finally:
            self.release(ticket)

    # -- use as a context: every run started inside gets the scheduler as a callback -------------------
    def __enter__(self) -> WorkflowScheduler:
        self._token = _scheduler_var.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _scheduler_var.reset(self._token)

    # -- callbacks -------------------------------------------------------------------------------------
    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *, run_id: UUID,
                       parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None,
                       **kwargs: Any) -> None:
        with self._lock:
            self._start(run_id, parent_run_id, metadata, is_llm=False)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None,
                     **kwargs: Any) -> None:
        with self._lock:
            self._start(run_id, parent_run_id, metadata, is_llm=True)

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], *, run_id: UUID,
                            parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None,
                            **kwargs: Any) -> None:
        with self._lock:
            self._start(run_id, parent_run_id, metadata, is_llm=True)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    # -- internals -------------------------------------------------------------------------------------
    def _known(self, run_id: UUID) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise ConfigError(f"the scheduler has not seen run {run_id} start: pass it in the run's callbacks")
        return run

    def _start(self, run_id: UUID, parent: UUID | None, metadata: dict[str, Any] | None, *, is_llm: bool) -> _Run:
        now = self._clock()
        up = self._runs.get(parent) if parent is not None else None
        node = (metadata or {}).get("langgraph_node") or (up.node if up else None)
        if up is not None:
            root, depth = up.root, up.depth + 1
        elif parent is not None:
            root, depth = parent, 1   # a parent we never saw start: it stands for the workflow
        else:
            root, depth = run_id, 0
        if depth <= self.workflow_depth and (up is not None or parent is None):
            root = run_id   # at or above the workflow's depth, a run is its own workflow (a container above it)
        run = _Run(run_id, parent, root, node, depth, is_llm, now)
        self._runs[run_id] = run
        wf = self._workflows.get(root)
        if wf is None:
            wf = self._workflows[root] = _Workflow(root, now, next(self._workflow_seq), depth)
        wf.runs.add(run_id)
        if is_llm:
            wf.open_calls.add(run_id)
            # Containers above the workflows' depth are not workflows of their own.
            run.rank = sum(1 for other in self._workflows.values()
                           if other.seq < wf.seq and other.depth >= self.workflow_depth)
            if node is not None and node in self._remaining:
                run.remaining = self._remaining[node]
            elif node is not None:
                nested = [v for k, v in self._remaining.items() if k.endswith(":" + node)]
                run.remaining = max(nested) if nested else None
            run.base = self._base(run, wf, now)
        return run

    def _base(self, run: _Run, wf: _Workflow, now: float) -> int:
        if self.policy == "workflow-fcfs":
            return run.rank
        if self.policy == "least-attained":
            return int(math.floor(self._attained(wf, now) / self.quantum_s))
        if self.policy == "critical-path":
            return self._longest - run.remaining if run.remaining is not None else -run.depth
        return 0

    def _attained(self, wf: _Workflow, now: float) -> float:
        running = sum(now - self._runs[r].sent for r in wf.open_calls
                      if r in self._runs and self._runs[r].sent is not None and not self._runs[r].counted)
        return wf.attained_s + running

    def _key(self, run: _Run) -> float:
        ready = run.started - self._epoch
        return run.base * self.ageing_s + ready if self.ageing_s else float(run.base)

    def _sort_key(self, run: _Run) -> tuple[float, float]:
        if self.policy == "fcfs":
            return (run.started, 0.0)
        return (self._key(run), run.started)

    def _end(self, run_id: UUID) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
            if run is None:
                return
            wf = self._workflows.get(run.root)
            if wf is None:
                return
            wf.runs.discard(run_id)
            if run.is_llm and run_id in wf.open_calls:
                self._count_engine_time(run)
                wf.open_calls.discard(run_id)
                wf.calls_done += 1
            if run_id == run.root:
                for other in wf.runs:
                    self._runs.pop(other, None)
                del self._workflows[run.root]
                self.workflows_finished += 1
                for reservation in self._reserved.pop(run.root, []):
                    if reservation.timer is not None:
                        reservation.timer.cancel()
                    self._close_reservation(reservation, "ended")
                    self._in_flight -= 1
                self._grant()

    def _better_waiting(self, waiter: _Waiter) -> bool:
        return any(not w.cancelled and not w.granted and w < waiter for w in self._waiters)

    def _grant(self) -> None:
        """Admit waiters in order while slots are free (caller holds the lock)."""
        while self._waiters and self._in_flight < (self.max_in_flight or 0):
            waiter = heapq.heappop(self._waiters)
            if waiter.cancelled or waiter.future.done():
                continue
            waiter.granted = True
            self._in_flight += 1
            try:
                waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
            except RuntimeError:   # its loop has closed: the slot goes to the next one
                self._in_flight -= 1

    def _keep_for_workflow(self, run: _Run) -> bool:
        if self.policy == "fcfs" or self.handoff_s <= 0 or run.root == run.run_id:
            return False
        wf = self._workflows.get(run.root)
        best = next((w for w in sorted(self._waiters) if not w.cancelled and not w.granted), None)
        if wf is None or best is None:
            return False
        now = self._clock()
        if self.ageing_s:
            mine = run.base * self.ageing_s + (now - self._epoch)
            return mine < best.key
        return run.base < best.key

    def _close_reservation(self, reservation: _Reservation, how: str) -> None:
        self._kept[how] += 1
        self._kept["idle_s"] += max(0.0, self._clock() - reservation.since)

    def _expire(self, reservation: _Reservation) -> None:
        with self._lock:
            kept = self._reserved.get(reservation.root, [])
            if reservation in kept:
                kept.remove(reservation)
                if not kept:
                    del self._reserved[reservation.root]
                self._close_reservation(reservation, "expired")
                self._in_flight -= 1
                self._grant()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _remaining_paths(graph: Any) -> tuple[dict[str, int], int]:
    """Per node: nodes on the longest path from it to the end (itself included); loops are counted once.

    The graph is drawn with subgraphs expanded (``xray``), whose nodes are named ``parent:child``.
    """
    try:
        drawn = graph.get_graph(xray=True)
    except TypeError:
        drawn = graph.get_graph()
    except AttributeError as exc:
        raise ConfigError(f"critical-path needs a compiled LangGraph graph, got {type(graph).__name__}") from exc
    nodes = [n for n in drawn.nodes if n not in _GRAPH_ENDS]
    succ: dict[str, set[str]] = {n: set() for n in nodes}
    for edge in drawn.edges:
        if edge.source in succ and edge.target in succ:
            succ[edge.source].add(edge.target)
    comp = _strongly_connected(nodes, succ)
    size: dict[int, int] = {}
    for c in comp.values():
        size[c] = size.get(c, 0) + 1
    csucc: dict[int, set[int]] = {c: set() for c in size}
    for n, targets in succ.items():
        csucc[comp[n]].update(comp[t] for t in targets if comp[t] != comp[n])
    memo: dict[int, int] = {}

    def longest(c: int) -> int:
        if c not in memo:
            memo[c] = size[c] + max((longest(d) for d in csucc[c]), default=0)
        return memo[c]

    remaining = {n: longest(comp[n]) for n in nodes}
    return remaining, max(remaining.values(), default=0)


def _strongly_connected(nodes: list[str], succ: dict[str, set[str]]) -> dict[str, int]:
    """Tarjan's algorithm, iteratively: node -> component number."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comp: dict[str, int] = {}
    counter = itertools.count()
    comps = itertools.count()
    for start in nodes:
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(succ[start])))]
        index[start] = low[start] = next(counter)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            child = next(it, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = next(counter)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(succ[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                c = next(comps)
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp[w] = c
                    if w == v:
                        break
    return comp


# Registered once, like langchain-core's usage callback: runs started inside ``with scheduler:`` get it.
_scheduler_var: ContextVar[WorkflowScheduler | None] = ContextVar("langchain_energy_scheduler", default=None)
register_configure_hook(_scheduler_var, inheritable=True)


@contextmanager
def scheduled(policy: str = "workflow-fcfs", **kwargs: Any) -> Iterator[WorkflowScheduler]:
    """A `WorkflowScheduler` that every run started in the block reports to.

    Example:
        .. code-block:: python

            with scheduled("least-attained", max_in_flight=8) as scheduler:
                llm = ServingLLM(scheduler=scheduler)
                chain.batch(inputs)
    """
    with WorkflowScheduler(policy, **kwargs) as scheduler:
        yield scheduler
