"""`EnergyCallbackHandler`: per-run latency, tokens and attributed energy for any LangChain/LangGraph code.

The handler records runs (timestamps on the timeline's clock, token counts) into the process-wide `Ledger`
of its timeline, which every handler on that meter shares: a call shares each interval with every call in
the process, whichever handler recorded it. Tables are built by `langchain_energy.accounting` once per change.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, get_buffer_string
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.tracers.context import register_configure_hook

from langchain_energy.accounting import (
    RUN_COLUMNS,
    SUMMARY_COLUMNS,
    Accounts,
    account,
    group_provenance,
)
from langchain_energy.attribution import Weighting
from langchain_energy.errors import ConfigError
from langchain_energy.ledger import CALL_KINDS, RunRecord
from langchain_energy.meters.base import Meter
from langchain_energy.timeline import Timeline, shared_timeline

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "CALL_KINDS", "RUN_COLUMNS", "SUMMARY_COLUMNS", "EnergyCallbackHandler", "RunRecord", "energy_callback",
    "get_energy_callback",
]

_NAN = float("nan")

#: A sample this young already stands at a run's edge.
_EDGE_FRESH_S = 0.002

#: Integer token fields accepted from a response's accounting.
_TOKEN_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens")

# Run ids of the calls recorded outside LangChain's callbacks (`start_call`): text, unique across processes (a
# random tag and the pid) and within one (a counter). Text rather than a UUID object: the record is looked up a
# few dozen times per call, and a string hashes once where a UUID hashes in Python at every lookup.
_call_tag = ""
_call_numbers = itertools.count(1)


def _new_call_tag() -> None:
    global _call_tag, _call_numbers
    _call_tag, _call_numbers = f"call-{os.urandom(4).hex()}-{os.getpid()}-", itertools.count(1)


_new_call_tag()
os.register_at_fork(after_in_child=_new_call_tag)  # (a forked child names its calls anew)


class _Lease:
    """One hold on a timeline, released at most once (explicitly or when the handler is collected)."""

    def __init__(self, timeline: Timeline) -> None:
        self._tl: Timeline | None = timeline
        self._lock = threading.Lock()
        timeline.acquire()

    def release(self) -> None:
        with self._lock:
            tl, self._tl = self._tl, None
        if tl is not None:
            tl.release()


def _run_name(serialized: Mapping[str, Any] | None, kwargs: Mapping[str, Any], default: str) -> str:
    # LangGraph passes serialized=None for nodes and puts the node name in kwargs["name"].
    name = kwargs.get("name")
    if name:
        return str(name)
    if serialized:
        if serialized.get("name"):
            return str(serialized["name"])
        ids = serialized.get("id")
        if isinstance(ids, list) and ids:
            return str(ids[-1])
    return default


def _as_int(x: Any) -> int | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _as_uuid(x: str) -> UUID | None:
    try:
        return UUID(x)
    except ValueError:
        return None


def _as_seconds(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v >= 0 else None


class EnergyCallbackHandler(BaseCallbackHandler):
    """Records every run's timing, tokens and attributed CPU/GPU/DRAM energy.

    Pass it as a callback to any chain, graph, LLM or chat model (sync or async, `batch`/`abatch`, concurrent
    graphs). Energy is sampled by one shared background timeline (started at the first run, stopped by
    `close()`) and shared among overlapping calls by the timeline's ledger, which all handlers on the same
    meter share: per-run joules add up to what the meter saw, however many handlers are alive.

    Args:
        meter: where joules come from; the process-wide automatic meter (`auto_meter()`) by default.
        sample_interval_s: sampling period of the timeline when this handler creates it.
        weighting: ``"equal"`` shares among overlapping calls, or ``"tokens"`` (by each call's token rate).
        idle_power_w: idle baseline in watts (a number, or watts per component), ``"measure"`` to measure it
            now for `idle_measure_s` seconds, ``"model"`` for the meter's own idle model (estimates have one),
            or None for no baseline (active/idle energy are then NaN).
        token_counter: counts tokens of a text when a run reports none (e.g. ``llm.get_num_tokens``);
            such counts are flagged ``token_source="counted"``.
        timeline: a timeline to use instead of the shared one for `meter`.
        idle_measure_s: seconds of idle measurement for ``idle_power_w="measure"``.

    Example:
        ```python
        with EnergyCallbackHandler() as handler:
            chain.invoke({"text": doc}, config={"callbacks": [handler]})
        handler.to_dataframe()   # one row per run: energy_j, energy_measured_j, provenance_gpu, ...
        print(handler.report())
        ```
    """

    raise_error: bool = False
    # Not inline: langchain-core's async `on_llm_start` hands the event only to inline handlers whenever one is
    # present, so an inline handler here would silence the user's other handlers. Our timestamps stay sharp
    # regardless: LangChain awaits start events before the request is sent, and the package's models carry
    # each call's own latency and first-token time in the response.
    run_inline: bool = False

    def __init__(
        self,
        meter: Meter | None = None,
        sample_interval_s: float = 0.1,
        weighting: Weighting = "equal",
        idle_power_w: float | Mapping[str, float] | str | None = None,
        token_counter: Callable[[str], int] | None = None,
        timeline: Timeline | None = None,
        idle_measure_s: float = 2.0,
    ) -> None:
        super().__init__()
        if weighting not in ("equal", "tokens"):
            raise ConfigError(f"weighting must be 'equal' or 'tokens', got {weighting!r}")
        self.weighting: Weighting = weighting
        self.timeline = timeline if timeline is not None else shared_timeline(meter, sample_interval_s)
        self.ledger = self.timeline.ledger
        self.ledger.use(weighting)
        self.timeline.add_handler(self)
        self._clock = self.timeline.clock
        self.token_counter = token_counter
        self._lock = threading.RLock()
        self._runs: dict[Hashable, RunRecord] = {}
        self._batches: dict[tuple[str, int], tuple[Hashable, int]] = {}
        self._batch_responses: dict[Hashable, list[tuple[LLMResult, RunRecord]]] = {}
        self._lease: _Lease | None = None
        self._finalizer: weakref.finalize | None = None
        self._cache: tuple[tuple[int, float], Accounts] | None = None
        self._final_calls: dict[Hashable, dict[str, Any]] = {}  # a call's split once final: it cannot change
        self._frozen: tuple[list[RunRecord], Accounts] | None = None
        self._warned_end_only = False
        self._also: EnergyCallbackHandler | None = None  # an enclosing `energy_callback()` block's handler
        self.idle_power_w: dict[str, float] | None = self._resolve_idle(idle_power_w, idle_measure_s)

    # -- set-up ------------------------------------------------------------------------------------------
    def _resolve_idle(self, idle: Any, measure_s: float) -> dict[str, float] | None:
        if idle is None:
            return None
        if isinstance(idle, str):
            if idle == "measure":
                return self.measure_idle(measure_s)
            if idle == "model":
                fn = getattr(self.timeline.meter, "idle_power_w", None)
                known = fn() if fn else None
                if not known:
                    raise ConfigError("idle_power_w='model' needs a meter with an idle model (an estimated one)")
                return dict(known)
            raise ConfigError(f"idle_power_w must be watts, a dict, 'measure', 'model' or None, got {idle!r}")
        if isinstance(idle, Mapping):
            out = {str(k): float(v) for k, v in idle.items()}
        else:
            out = {"total": float(idle)}
        if any(not math.isfinite(v) or v < 0 for v in out.values()):
            raise ConfigError(f"idle power must be finite and >= 0 watts, got {idle!r}")
        return out

    def measure_idle(self, duration_s: float = 2.0) -> dict[str, float]:
        """Measure the idle baseline now (nothing should run meanwhile) and use it from here on.

        Returns:
            Watts per component over the measurement.
        """
        if not duration_s > 0:
            raise ConfigError(f"idle measurement needs a positive duration, got {duration_s}")
        self._ensure_started()
        # Measure between two samples (not clock reads) so the window's edges are exact.
        self.timeline.sample_now()
        t0 = self.timeline.last_sample_t
        time.sleep(duration_s)
        self.timeline.sample_now()
        t1 = self.timeline.last_sample_t
        if t0 is None or t1 is None or t1 <= t0:
            raise ConfigError("the meter's clock did not advance during the idle measurement")
        watts = {k: j / (t1 - t0) for k, j in self.timeline.energy_between(t0, t1).items()}
        self.idle_power_w = watts
        self._cache = None
        return watts

    def _ensure_started(self) -> None:
        if self._lease is None:
            with self._lock:
                if self._lease is None:
                    self._lease = _Lease(self.timeline)
                    self._finalizer = weakref.finalize(self, self._lease.release)

    def close(self) -> None:
        """Stop holding the timeline and freeze the results at this instant.

        Results stay readable and no longer change: a run still open now is reported with status
        ``"open_at_close"`` and the joules it had received so far. A run started later reopens the handler.
        """
        with self._lock:
            if self._lease is not None and self._frozen is None and self._runs:
                self.timeline.sample_now()
                t = self._clock()
                records = self.runs
                self._frozen = (records, self._account(records, t, open_status="open_at_close"))
            lease, self._lease = self._lease, None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        if lease is not None:
            lease.release()

    def __enter__(self) -> EnergyCallbackHandler:
        self._ensure_started()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recording ---------------------------------------------------------------------------------------
    def _start(self, run_id: UUID, parent_run_id: UUID | None, kind: str, name: str,
               tags: list[str] | None, metadata: Mapping[str, Any] | None, prompt_text: str | None = None,
               batch_size: int = 1) -> None:
        if self._also is not None:
            self._also._start(run_id, parent_run_id, kind, name, tags, metadata, prompt_text, batch_size)
        if self._lease is None:
            self._ensure_started()
        # Stamp the start under the ledger's lock: a fold can then never pass a start it has not seen.
        with self._lock, self.ledger.lock:
            t = self._clock()
            if run_id in self._runs:
                return  # the same run seen twice (a handler passed explicitly inside its own block)
            self._frozen = None
            parent = self._runs.get(parent_run_id) if parent_run_id is not None else None
            rec = RunRecord(
                run_id=run_id, parent_run_id=parent_run_id,
                root_run_id=parent.root_run_id if parent is not None else run_id,
                name=name, kind=kind, tags=list(tags or []), metadata=dict(metadata or {}), t_start=t,
                prompt_text=prompt_text if self.token_counter is not None else None, batch_size=batch_size,
            )
            if rec.is_call and batch_size > 1:
                rec.batch_key = self._batch_key(name, batch_size, run_id)
            rec = self.ledger.open(rec, started_now=True)
            self._runs[run_id] = rec
        if (rec.is_call or parent is None) and self.timeline.counters_step:
            self._sample_edge()  # (an estimate needs no read at a start: `Timeline.counters_step`)

    def _sample_edge(self) -> None:
        """Sample at a call's start (and a workflow's edges), not interpolate across a counter step: on a GPU
        a call that follows idle time would otherwise lose part of its first interval to the time before it. A
        sample younger than `_EDGE_FRESH_S` is that edge already (rapid-fire calls cost one read, not one each).
        A call's end is always covered by a sample (`Timeline.sample_covering`): its split is final when it
        ends."""
        self.timeline.sample_if_stale(_EDGE_FRESH_S, edge=True)

    def _end_only_call(self, run_id: UUID, parent_run_id: UUID | None, t: float, response: LLMResult) -> RunRecord:
        """A call whose start event never came (langchain-core's async `on_llm_start` skips non-inline
        handlers when an inline one, such as LangSmith's tracer, is present): rebuilt from its end."""
        if not self._warned_end_only:
            self._warned_end_only = True
            logger.warning("an LLM call ended whose start this handler never saw (LangChain skips non-inline "
                           "handlers' async on_llm_start beside an inline handler); recorded from its end, "
                           "with timing='end-only'. See the README: 'Other callback handlers'.")
        info = next((g.generation_info or {} for c in response.generations for g in c), {})
        took = (_as_seconds(info.get("sent_after_s")) or 0.0) + (_as_seconds(info.get("latency_s")) or 0.0)
        with self._lock, self.ledger.lock:
            parent = self._runs.get(parent_run_id) if parent_run_id is not None else None
            rec = RunRecord(run_id=run_id, parent_run_id=parent_run_id,
                            root_run_id=parent.root_run_id if parent is not None else run_id, name="llm",
                            kind="llm", tags=[], metadata={}, t_start=max(t - took, self.ledger.folded_to),
                            timing="end-only")
            rec = self.ledger.open(rec)
            self._runs[run_id] = rec
        return rec

    def _batch_key(self, name: str, size: int, run_id: Hashable) -> Hashable:
        # LangChain starts a batch's calls one after another, each with batch_size; group consecutive ones.
        key, members = self._batches.get((name, size), (None, size))
        if key is None or members >= size:
            key, members = run_id, 0
        self._batches[(name, size)] = (key, members + 1)
        return key

    def _finish(self, run_id: UUID, status: str, error: BaseException | None = None,
                response: LLMResult | None = None, parent_run_id: UUID | None = None) -> None:
        """Record the end of a run reported by LangChain (a call brings its `response`)."""
        if self._also is not None:
            self._also._finish(run_id, status, error, response, parent_run_id)
        t = self._clock()
        with self._lock:
            rec = self._runs.get(run_id)
        if rec is None:
            if response is None:
                return
            rec = self._end_only_call(run_id, parent_run_id, t, response)
        self._close(rec, t, status, error, response)

    def _close(self, rec: RunRecord, t: float, status: str, error: BaseException | None = None,
               response: LLMResult | None = None, answers: Sequence[AIMessage] = ()) -> dict[str, Any] | None:
        """Record a run's end at `t`. A call reported by LangChain brings its `response`; one recorded outside the
        callbacks (`end_call`) brings its AI messages, `answers`.

        Returns:
            The joules put on the answers (this package's models), else None.
        """
        with self.ledger.lock:
            if rec.t_end is not None:
                return None  # another handler already recorded this run's end
            rec.t_end = t
            rec.status = status
            if error is not None:
                rec.error = f"{type(error).__name__}: {error}"
            if response is not None:
                self._read_response(rec, response)
            elif answers:
                self._read_answers(rec, answers)
            rec.prompt_text = None
        is_call = rec.is_call
        if is_call:
            self.timeline.sample_covering(t)  # the split is final, and on the response, at the call's end
        elif rec.root_run_id == rec.run_id:
            self._sample_edge()
        self.ledger.changed()
        if response is not None and is_call:
            if rec.batch_key is None:
                self._put_energy_on(response, rec)
            else:
                self._put_energy_on_batch(response, rec)
        elif answers and is_call and any("latency_s" in m.response_metadata for m in answers):
            energy = self._final_energy(rec)  # (this package's models: see `_put_energy_on`)
            for m in answers if energy is not None else ():
                m.response_metadata["energy"] = energy
            return energy
        return None

    def _put_energy_on_batch(self, response: LLMResult, rec: RunRecord) -> None:
        # A batch's calls end (by their own edges) before LangChain reports the last of them: their split is
        # final once every member has been reported.
        with self._lock:
            members = self._batch_responses.setdefault(rec.batch_key, [])
            members.append((response, rec))
            if len(members) < rec.batch_size:
                return
            del self._batch_responses[rec.batch_key]
        for member_response, member in members:
            self._put_energy_on(member_response, member)

    def _put_energy_on(self, response: LLMResult, rec: RunRecord) -> None:
        """Give a call's joules to the user where LangChain users look, once its split is final.

        Only for this package's models (their responses carry ``latency_s``); any class: `energy_of`.
        """
        if not any("latency_s" in (g.generation_info or {})
                   or "latency_s" in getattr(getattr(g, "message", None), "response_metadata", {})
                   for c in response.generations for g in c):
            return
        energy = self._final_energy(rec)
        if energy is None:
            return
        for candidates in response.generations:
            for g in candidates:
                if isinstance(g, ChatGeneration):
                    g.message.response_metadata["energy"] = energy
                else:
                    g.generation_info = {**(g.generation_info or {}), "energy": energy}

    def _final_energy(self, rec: RunRecord) -> dict[str, Any] | None:
        energy = self._call_energy(rec)
        return energy if energy is not None and energy["final"] else None

    def _call_energy(self, rec: RunRecord) -> dict[str, Any] | None:
        known = self._final_calls.get(rec.run_id)
        if known is not None:
            return {**known, "provenance": dict(known["provenance"])}
        split = self.ledger.call_split(self.weighting, rec.run_id)
        if split is None:
            return None
        received, final = split
        cols = self.timeline.attributed_columns()
        out: dict[str, Any] = cols.columns(received.energy)
        if received.prefill is not None:
            out["prefill_energy_j"] = cols.total(received.prefill)
            out["decode_energy_j"] = cols.total(received.decode or {})
        out["provenance"] = dict(cols.groups)
        out["final"] = final
        if out["final"] and rec.run_id in self._runs:  # (kept in the table: `energy_of` may ask again)
            self._final_calls[rec.run_id] = {**out, "provenance": dict(out["provenance"])}
        return out

    def _read_response(self, rec: RunRecord, response: LLMResult) -> None:
        gens = [g for candidates in response.generations for g in candidates]
        infos = [g.generation_info or {} for g in gens]
        first = infos[0] if infos else {}
        if any(k in first for k in _TOKEN_KEYS):
            # Per-call accounting placed by the serving model in the generation (one call = one prompt).
            rec.prompt_tokens = _as_int(first.get("prompt_tokens"))
            rec.completion_tokens = _as_int(first.get("completion_tokens"))
            rec.cached_tokens = _as_int(first.get("cached_tokens"))
            rec.token_source = str(first.get("token_source") or "generation_info")
            self._read_timing(rec, first)
            return
        usage = next((g.message.usage_metadata for g in gens
                      if isinstance(g, ChatGeneration) and getattr(g.message, "usage_metadata", None)), None)
        token_usage = (response.llm_output or {}).get("token_usage") or {}
        if usage:
            self._read_usage(rec, usage)
        elif rec.batch_size == 1 and (token_usage.get("prompt_tokens") is not None
                                      or token_usage.get("completion_tokens") is not None):
            rec.prompt_tokens = _as_int(token_usage.get("prompt_tokens"))
            rec.completion_tokens = _as_int(token_usage.get("completion_tokens"))
            details = token_usage.get("prompt_tokens_details") or {}
            rec.cached_tokens = _as_int(token_usage.get("cached_tokens", details.get("cached_tokens")))
            rec.token_source = "llm_output"
        elif self.token_counter is not None:
            # Also for a batch, whose llm_output holds only the batch's sum: an aggregate is never one call's.
            self._count_tokens(rec, [g.text for g in gens])
        elif rec.batch_size > 1:
            rec.token_source = "unavailable:batch-aggregate"
        if rec.batch_size > 1:
            rec.timing = "batch"
        ttft = _as_seconds(first.get("ttft_s"))
        if rec.t_first_token is None and ttft is not None:
            rec.t_first_token = min(rec.t_start + ttft, rec.t_end or math.inf)

    @staticmethod
    def _read_usage(rec: RunRecord, usage: Mapping[str, Any]) -> None:
        # A response's usage is on every choice (n > 1): read it once, never sum it over choices.
        rec.prompt_tokens = _as_int(usage.get("input_tokens"))
        rec.completion_tokens = _as_int(usage.get("output_tokens"))
        rec.cached_tokens = _as_int((usage.get("input_token_details") or {}).get("cache_read"))
        rec.token_source = "usage_metadata"

    def _read_answers(self, rec: RunRecord, answers: Sequence[AIMessage]) -> None:
        """Tokens of a call recorded outside the callbacks, from its AI messages (as `_read_response` reads a
        chat response's)."""
        for m in answers:
            if m.usage_metadata:
                self._read_usage(rec, m.usage_metadata)
                return
        if self.token_counter is not None:
            self._count_tokens(rec, [m.text for m in answers])

    def _count_tokens(self, rec: RunRecord, answers: Sequence[str]) -> None:
        """Count a call's prompt and answers with the handler's `token_counter` (none was reported)."""
        assert self.token_counter is not None
        try:
            rec.prompt_tokens = self.token_counter(rec.prompt_text or "")
            rec.completion_tokens = sum(self.token_counter(text) for text in answers)
            rec.token_source = "counted"
        except Exception as exc:  # a tokenizer failure must not break the user's chain
            logger.warning("token counting failed for run %s: %s", rec.run_id, exc)

    def _read_timing(self, rec: RunRecord, info: Mapping[str, Any]) -> None:
        """Use the call's own edges from the response (one prompt of a batch ends before the batch does).

        The package's models report ``sent_after_s`` (from the call's start to its request being sent),
        ``engine_start_s`` (the part of it spent starting the managed engine), ``latency_s`` and ``ttft_s``.
        """
        assert rec.t_end is not None
        engine_start = _as_seconds(info.get("engine_start_s")) or 0.0
        sent_after = max(_as_seconds(info.get("sent_after_s")) or 0.0, engine_start)
        latency = _as_seconds(info.get("latency_s"))
        ttft = _as_seconds(info.get("ttft_s"))
        rec.ttft_s = ttft
        if rec.timing == "end-only":
            return
        if engine_start > 0:
            # The managed engine started inside this call: that time is a run of its own, never the call's.
            self._engine_start_run(rec, min(rec.t_start + engine_start, rec.t_end))
        if engine_start > 0:
            rec.t_start = min(rec.t_start + engine_start, rec.t_end)
        if latency is not None and rec.batch_size > 1:
            # One prompt of a batch: LangChain ends it at the batch's end, the response knows its own end.
            start = min(rec.t_start + sent_after - engine_start, rec.t_end)
            rec.t_start, rec.t_end = start, min(rec.t_end, start + latency)
            rec.timing = "response"
        elif rec.batch_size > 1:
            rec.timing = "batch"
        else:
            # A lone call keeps LangChain's edges: they are stamped as they happen, so the split of every
            # call that overlapped it is final at that call's own end (no edge moves into the past).
            rec.t_first_token = min(rec.t_start + sent_after - engine_start + (ttft or 0.0), rec.t_end)
        if ttft is not None and rec.timing != "callback":
            rec.t_first_token = min(rec.t_start + ttft, rec.t_end)

    def _engine_start_run(self, call: RunRecord, t_end: float) -> None:
        run_id = f"engine_start:{call.run_id}"
        rec = RunRecord(run_id=run_id, parent_run_id=None, root_run_id=run_id, name="engine_start",
                        kind="engine_start", tags=[], metadata={"during_run_id": str(call.run_id)},
                        t_start=call.t_start, t_end=t_end, status="ok")
        with self._lock:
            self._runs[run_id] = self.ledger.open(rec)

    # Calls metered from outside LangChain's callbacks ---------------------------------------------------------
    def start_call(self, name: str, metadata: Mapping[str, Any] | None = None, *, keep: bool = True) -> RunRecord:
        """Record the start of a chat-model call that no callback reports (a middleware around the call).

        Args:
            name: the model's name.
            metadata: the record's metadata.
            keep: keep the call in this handler's table. Without it, `end_call` returns the call's joules and
                nothing of the call is kept afterwards (a meter that lives for months holds nothing per call).

        Returns:
            The call's record, for `end_call` (its ``run_id`` names it, for `energy_of`, while it is kept).
        """
        if self._lease is None:
            self._ensure_started()
        run_id = f"{_call_tag}{next(_call_numbers)}"
        rec = RunRecord(run_id=run_id, parent_run_id=None, root_run_id=run_id, name=name, kind="chat_model",
                        tags=[], metadata=dict(metadata or {}), t_start=0.0)
        with self._lock, self.ledger.lock:  # (stamped under the ledger's lock, as `_start` does)
            rec.t_start = self._clock()
            self.ledger.open(rec, started_now=True)
            if keep:
                self._frozen = None
                self._runs[run_id] = rec
        if self.timeline.counters_step:
            self._sample_edge()
        return rec

    def end_call(self, call: RunRecord, messages: Sequence[BaseMessage] = (),
                 error: BaseException | None = None) -> dict[str, Any] | None:
        """Record the end of a call from `start_call`: tokens from its AI messages' usage, and for this
        package's models the call's joules on the message, as the callbacks would.

        Returns:
            The call's joules as `energy_of` gives them (None if it failed).
        """
        t = self._clock()
        if error is not None:
            self._close(call, t, "error", error=error)
            energy = None
        else:
            answers = [m for m in messages if isinstance(m, AIMessage)]
            energy = self._close(call, t, "ok", answers=answers) or self._call_energy(call)
        if call.run_id not in self._runs:
            self.ledger.release((call.run_id,))  # (not kept: the ledger drops it once folded)
        return energy

    # LangChain callback methods -------------------------------------------------------------------------
    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     parent_run_id: UUID | None = None, tags: list[str] | None = None,
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Record the start of an LLM call."""
        self._start(run_id, parent_run_id, "llm", _run_name(serialized, kwargs, "llm"), tags, metadata,
                    "\n".join(prompts) if self.token_counter is not None else None,
                    batch_size=_as_int(kwargs.get("batch_size")) or 1)

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *,
                            run_id: UUID, parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Record the start of a chat-model call."""
        text = "\n".join(get_buffer_string(m) for m in messages) if self.token_counter is not None else None
        self._start(run_id, parent_run_id, "chat_model", _run_name(serialized, kwargs, "chat_model"), tags,
                    metadata, text, batch_size=_as_int(kwargs.get("batch_size")) or 1)

    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        """Note the first streamed token's time."""
        if self._also is not None:
            self._also.on_llm_new_token(token, run_id=run_id, **kwargs)
        rec = self._runs.get(run_id)
        if rec is not None and rec.t_first_token is None:
            t = self._clock()
            with self._lock:
                if rec.t_first_token is None:
                    rec.t_first_token = t

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None,
                   **kwargs: Any) -> None:
        """Record the end of an LLM or chat-model call and its tokens."""
        self._finish(run_id, "ok", response=response, parent_run_id=parent_run_id)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record a failed LLM call (the error is kept; the chain goes on as LangChain decides)."""
        self._finish(run_id, "error", error=error)

    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *, run_id: UUID,
                       parent_run_id: UUID | None = None, tags: list[str] | None = None,
                       metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Record the start of a chain, runnable or graph node."""
        self._start(run_id, parent_run_id, "chain", _run_name(serialized, kwargs, "chain"), tags, metadata)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the end of a chain."""
        self._finish(run_id, "ok")

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record a failed chain."""
        self._finish(run_id, "error", error=error)

    def on_tool_start(self, serialized: dict[str, Any], input_str: str, *, run_id: UUID,
                      parent_run_id: UUID | None = None, tags: list[str] | None = None,
                      metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Record the start of a tool run."""
        self._start(run_id, parent_run_id, "tool", _run_name(serialized, kwargs, "tool"), tags, metadata)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the end of a tool run."""
        self._finish(run_id, "ok")

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record a failed tool run."""
        self._finish(run_id, "error", error=error)

    def on_retriever_start(self, serialized: dict[str, Any], query: str, *, run_id: UUID,
                           parent_run_id: UUID | None = None, tags: list[str] | None = None,
                           metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Record the start of a retriever run."""
        self._start(run_id, parent_run_id, "retriever", _run_name(serialized, kwargs, "retriever"), tags, metadata)

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the end of a retriever run."""
        self._finish(run_id, "ok")

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record a failed retriever run."""
        self._finish(run_id, "error", error=error)

    # -- results -----------------------------------------------------------------------------------------
    @property
    def runs(self) -> list[RunRecord]:
        """A copy of the run records, in start order (as frozen at `close()` once closed)."""
        with self._lock:
            if self._frozen is not None:
                return [_copy(r) for r in self._frozen[0]]
            return sorted((_copy(r) for r in self._runs.values()), key=lambda r: r.t_start)

    def reset(self) -> None:
        """Forget recorded runs (the timeline keeps sampling)."""
        with self._lock:
            self._frozen = None
            ids = list(self._runs)
        self.forget(ids)

    def forget(self, run_ids: Iterable[Hashable]) -> None:
        """Forget these runs' records (their joules stay counted in the ledger's totals; a run still open is
        dropped there once it is folded)."""
        with self._lock:
            ids = [rid for rid in run_ids if self._runs.pop(rid, None) is not None]
            for rid in ids:
                self._final_calls.pop(rid, None)
            self._cache = None
        self.ledger.release(ids)

    def _account(self, records: list[RunRecord], t: float, open_status: str = "running") -> Accounts:
        view = self.ledger.view(self.weighting, t=t, runs=[r.run_id for r in records])
        return account(records, view, self.timeline.attributed_provenance(), self.idle_power_w, open_status=open_status,
                       resolution_s=getattr(self.timeline.meter, "resolution_s", None))

    def _accounts(self) -> Accounts:
        """The tables, computed once per change of the ledger (or frozen at close)."""
        with self._lock:
            if self._frozen is not None:
                return self._frozen[1]
        records = self.runs
        if records and any(r.t_end is None for r in records):
            self.timeline.sample_now()  # cover open runs up to now
        last = self.timeline.last_sample_t or 0.0
        t = max(last, max((r.t_end for r in records if r.t_end is not None), default=last))
        key = (self.ledger.version, t)
        cached = self._cache
        if cached is not None and cached[0] == key:
            return cached[1]
        accounts = self._account(records, t)
        self._cache = (key, accounts)
        return accounts

    def energy_of(self, run_id: UUID | str) -> dict[str, Any] | None:
        """One run's energy as soon as it is known: joules by component, provenance, and whether final.

        Works for any run this handler recorded, from any LangChain class. A call's split is final at its end
        with equal weighting; with token weighting, once every call that overlapped it has ended. For calls
        (which have no children) this is cheap; for a chain it builds the tables.

        Returns:
            ``{"energy_j", "energy_cpu_j", "energy_gpu_j", "energy_dram_j", "energy_measured_j",
            "energy_gpu<i>_j"..., "prefill_energy_j", "decode_energy_j", "provenance", "final"}``, or None
            for a run this handler did not record.
        """
        with self._lock:
            rec = self._runs.get(run_id)
            if rec is None and isinstance(run_id, str):
                rec = self._runs.get(_as_uuid(run_id))
        if rec is None:
            return None
        if rec.is_call and self._frozen is None:
            return self._call_energy(rec)
        key = str(run_id)
        for row in self._accounts().runs:
            if row["run_id"] == key:
                out = {k: v for k, v in row.items() if k.startswith("energy_") or k.endswith("_energy_j")}
                out["provenance"] = {g: row[f"provenance_{g}"] for g in ("cpu", "gpu", "dram")}
                out["final"] = row["final"]
                return out
        return None

    def to_dataframe(self) -> pd.DataFrame:
        """One row per run with timing, tokens, energy by component and provenance (columns: `RUN_COLUMNS`).

        Per-GPU joules follow as ``energy_gpu<index>_j``; ``df.attrs["provenance"]`` says where every energy
        column comes from.
        """
        import pandas as pd

        accounts = self._accounts()
        extra = sorted({k for row in accounts.runs for k in row} - set(RUN_COLUMNS))
        df = pd.DataFrame(accounts.runs, columns=[*RUN_COLUMNS, *extra])
        for col in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            df[col] = df[col].astype("Int64")
        df.attrs["provenance"] = dict(accounts.column_provenance)
        return df

    def summary(self) -> pd.DataFrame:
        """One row per workflow (root run): latency, tokens, throughput, energy, energy per token, cache hits.

        Energy per token leaves out calls without a completion count on both sides (``calls_without_tokens``
        says how many); ``energy_per_token_measured_j`` divides only measured joules.
        """
        import pandas as pd

        accounts = self._accounts()
        extra = sorted({k for row in accounts.workflows for k in row} - set(SUMMARY_COLUMNS))
        df = pd.DataFrame(accounts.workflows, columns=[*SUMMARY_COLUMNS, *extra])
        for col in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            df[col] = df[col].astype("Int64")
        df.attrs["provenance"] = dict(accounts.column_provenance)
        return df

    def totals(self, group: str | None = None) -> dict[str, float]:
        """Metered joules over the recorded runs' window, and how they were received.

        Args:
            group: ``"cpu"``, ``"gpu"`` or ``"dram"`` for that group's joules only; None for all components.

        Returns:
            ``{"metered_j", "calls_j", "orchestration_j", "outside_j"}``: calls + orchestration + outside
            equals metered. ``outside_j`` is what no run of this handler received in its window (gaps between
            runs, and calls recorded by other handlers at the same time).
        """
        totals = self._accounts().totals
        if group is not None and group not in ("cpu", "gpu", "dram"):
            raise ConfigError(f"group must be 'cpu', 'gpu' or 'dram', got {group!r}")
        if group is not None and group not in totals:
            return {"metered_j": _NAN, "calls_j": _NAN, "orchestration_j": _NAN, "outside_j": _NAN}
        return dict(totals["" if group is None else group])

    def timeline_frame(self) -> pd.DataFrame:
        """The sampled timeline: one row per sample with cumulative joules and mean watts since the previous one.

        Columns: ``t``, ``energy_<component>_j`` (cumulative), ``power_<component>_w`` and
        ``gpu_util_<index>`` where reported and ``cpu_util`` (the machine's, percent since the previous sample).
        """
        import pandas as pd

        snap = self.timeline.snapshot()
        data: dict[str, list[float]] = {"t": list(snap.t)}
        for key, cum in snap.energy_j.items():
            name = key.replace(":", "")
            data[f"energy_{name}_j"] = list(cum)
            watts = [_NAN]
            for i in range(1, len(cum)):
                dt = snap.t[i] - snap.t[i - 1]
                watts.append((cum[i] - cum[i - 1]) / dt if dt > 0 else _NAN)
            data[f"power_{name}_w"] = watts
        for idx, util in snap.gpu_util.items():
            data[f"gpu_util_{idx}"] = list(util)
        if len(snap.cpu_util) == len(snap.t):
            data["cpu_util"] = list(snap.cpu_util)
        return pd.DataFrame(data)

    def report(self) -> str:
        """A readable text report: one block per workflow, then where every number comes from."""
        s = self.summary()
        lines = ["Energy report", "============="]
        if s.empty:
            lines.append("(no runs recorded)")
        for _, row in s.iterrows():
            lines.append(f"workflow {row.workflow} [{row.status}]  run {row.root_run_id}")
            lines.append(f"  latency {row.latency_s:.3f} s, {row.llm_calls} LLM calls, "
                         f"tokens in/out/cached {_fmt_int(row.prompt_tokens)}/{_fmt_int(row.completion_tokens)}/"
                         f"{_fmt_int(row.cached_tokens)}, throughput {_fmt(row.throughput_tok_s)} tok/s")
            lines.append(f"  energy {_fmt(row.energy_j)} J (cpu {_fmt(row.energy_cpu_j)}, gpu {_fmt(row.energy_gpu_j)}, "
                         f"dram {_fmt(row.energy_dram_j)}), of which measured {_fmt(row.energy_measured_j)} J; "
                         f"active {_fmt(row.active_energy_j)} J, idle {_fmt(row.idle_energy_j)} J; "
                         f"{_fmt(row.energy_per_token_j, 4)} J/token; cache hit rate {_fmt(row.cache_hit_rate, 3)}")
            if row.calls_without_tokens:
                lines.append(f"  {row.calls_without_tokens} call(s) reported no token counts: left out of J/token")
        prov = group_provenance(self.timeline.attributed_provenance())
        lines.append("provenance: " + "; ".join(f"{g}={p}" for g, p in prov.items()))
        lines.append(f"meter: {self.timeline.meter.describe()}")
        lines.append(f"sampling every {self.timeline.interval_s:.3f} s (and at every call's edges), "
                     f"weighting={self.weighting}, idle baseline="
                     f"{'none' if self.idle_power_w is None else f'{math.fsum(self.idle_power_w.values()):.2f} W'}")
        if self.timeline.errors:
            lines.append(f"meter read failures: {self.timeline.errors} (last: {self.timeline.last_error})")
        return "\n".join(lines)


def _copy(r: RunRecord) -> RunRecord:
    return RunRecord(**{k: getattr(r, k) for k in r.__dataclass_fields__})


def _fmt(x: Any, digits: int = 2) -> str:
    try:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return "n/a"


def _fmt_int(x: Any) -> str:
    try:
        return "n/a" if x is None or x is getattr(__import__("pandas"), "NA") else str(int(x))
    except (TypeError, ValueError):
        return "n/a"


# Registered once, like langchain-core's usage callback: runs started inside `energy_callback()` pick the
# handler up without passing callbacks explicitly. A nested block's handler also feeds the enclosing one.
_energy_callback_var: ContextVar[EnergyCallbackHandler | None] = ContextVar("langchain_energy_callback", default=None)
register_configure_hook(_energy_callback_var, inheritable=True)


@contextmanager
def energy_callback(**handler_kwargs: Any) -> Iterator[EnergyCallbackHandler]:
    """Meter every LangChain run started in this context (and its threads/tasks) with one handler.

    Blocks nest: runs inside an inner block are recorded by the inner handler and by every enclosing one.

    Args:
        **handler_kwargs: passed to `EnergyCallbackHandler`.

    Yields:
        The handler; read its results inside or after the block.

    Example:
        ```python
        with energy_callback() as cb:
            chain.invoke({"text": doc})
        print(cb.report())
        ```
    """
    cb = EnergyCallbackHandler(**handler_kwargs)
    yield from _in_block(cb)


def _in_block(cb: EnergyCallbackHandler) -> Iterator[EnergyCallbackHandler]:
    cb._also = _energy_callback_var.get()
    token = _energy_callback_var.set(cb)
    try:
        cb._ensure_started()
        yield cb
    finally:
        _energy_callback_var.reset(token)
        cb.close()


class ModelEnergyCallbackHandler(EnergyCallbackHandler):
    """An `EnergyCallbackHandler` that also sums energy and tokens per model name (`energy_by_model`).

    Example:
        ```python
        with get_energy_callback() as cb:
            llm.invoke("Hello")
        cb.energy_by_model   # {"SmolLM2-135M-Instruct": {"energy_j": 3.2, "calls": 1, ...}}
        ```
    """

    @property
    def energy_by_model(self) -> dict[str, dict[str, float]]:
        """Per model name: calls, tokens, joules (total, measured, per component) and provenance."""
        accounts = self._accounts()
        names = {str(r.run_id): _model_name(r) for r in self.runs if r.is_call}
        out: dict[str, dict[str, Any]] = {}
        for row in accounts.runs:
            name = names.get(row["run_id"])
            if name is None:
                continue
            agg = out.setdefault(name, {"calls": 0, "input_tokens": 0, "output_tokens": 0, "energy_j": 0.0,
                                        "energy_measured_j": 0.0, "energy_cpu_j": 0.0, "energy_gpu_j": 0.0,
                                        "energy_dram_j": 0.0})
            agg["calls"] += 1
            agg["input_tokens"] += int(row["prompt_tokens"] or 0)
            agg["output_tokens"] += int(row["completion_tokens"] or 0)
            for k in ("energy_j", "energy_measured_j", "energy_cpu_j", "energy_gpu_j", "energy_dram_j"):
                agg[k] += row[k]
            agg["provenance"] = {g: row[f"provenance_{g}"] for g in ("cpu", "gpu", "dram")}
        return out


def _model_name(r: RunRecord) -> str:
    return str(r.metadata.get("ls_model_name") or r.name)


@contextmanager
def get_energy_callback(**handler_kwargs: Any) -> Iterator[ModelEnergyCallbackHandler]:
    """Like langchain-core's `get_usage_metadata_callback()`, for joules: energy per model name in a block.

    Args:
        **handler_kwargs: passed to the handler.

    Yields:
        A `ModelEnergyCallbackHandler`; read ``energy_by_model`` inside or after the block.

    Example:
        ```python
        with get_energy_callback() as cb:
            chain.invoke({"text": doc})
        print(cb.energy_by_model)
        ```
    """
    cb = ModelEnergyCallbackHandler(**handler_kwargs)
    yield from _in_block(cb)
