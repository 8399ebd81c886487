"""The process-wide ledger of runs on one timeline, and the joules folded into them as time passes.

Every handler, model and middleware that meters the same device records its runs here, so a call shares
each interval with every call in the process, whichever handler recorded it: two handlers never double
count. The ledger keeps the timeline's samples only back to the oldest open LLM call. Anything older can no
longer change its split (every call active in it has ended, so its weights and edges are final), so it is
*folded*: shared among the runs by the pure `attribute` and added to per-run totals, then dropped. Results
are therefore exact for a run of any length, and memory is bounded by what is still open, not by elapsed
time. `attribute` stays the reference: folding in pieces gives the same joules as attributing the whole
history at once (a property test checks it).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from langchain_energy.attribution import Span, Weighting, attribute, token_rate_weights

#: Run kinds that take energy first. ``engine_start`` is a managed engine starting inside a call: its joules
#: are shown on a run of their own and never in a call's.
CALL_KINDS = ("llm", "chat_model")
ENERGY_FIRST_KINDS = (*CALL_KINDS, "engine_start")

#: How many changes, or samples beyond those held after the last fold, make the ledger try a fold.
_FOLD_EVERY = 64


@dataclass(slots=True)
class RunRecord:
    """What is known about one run (LLM call, chat-model call, chain, graph node, tool, engine start).

    ``timing`` says where the call's edges come from: ``"callback"`` (LangChain's start/end events),
    ``"response"`` (the serving model's own per-call latency, e.g. one prompt of a batch), or ``"batch"``
    (a batch whose calls all end at the batch's end; the batch's joules are then split by tokens).
    """

    run_id: Hashable
    parent_run_id: Hashable | None
    root_run_id: Hashable
    name: str
    kind: str
    tags: list[str]
    metadata: dict[str, Any]
    t_start: float
    status: str = "running"
    t_first_token: float | None = None
    t_end: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    token_source: str | None = None
    ttft_s: float | None = None
    error: str | None = None
    timing: str = "callback"
    batch_key: Hashable | None = None
    batch_size: int = 1
    prompt_text: str | None = field(default=None, repr=False)

    @property
    def is_call(self) -> bool:
        """LLM and chat-model runs."""
        return self.kind in CALL_KINDS

    @property
    def takes_energy_first(self) -> bool:
        """Runs that receive an interval's joules before any enclosing chain does."""
        return self.kind in ENERGY_FIRST_KINDS

    @property
    def tokens(self) -> int | None:
        """Prompt (not cached) plus completion tokens, or None when neither is known."""
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return max((self.prompt_tokens or 0) - (self.cached_tokens or 0), 0) + (self.completion_tokens or 0)


@dataclass(slots=True)
class Received:
    """What one run received: joules per component, split at the first token for calls, and seconds."""

    energy: dict[str, float]
    prefill: dict[str, float] | None = None
    decode: dict[str, float] | None = None
    share_s: float = 0.0

    def add(self, energy: Mapping[str, float], prefill: Mapping[str, float] | None,
            decode: Mapping[str, float] | None, share_s: float) -> None:
        """Accumulate another piece of the timeline's split into this run."""
        _add_into(self.energy, energy)
        if prefill is not None:
            self.prefill = _add_into(self.prefill if self.prefill is not None else {}, prefill)
            self.decode = _add_into(self.decode if self.decode is not None else {}, decode or {})
        self.share_s += share_s

    def copy(self) -> Received:
        """An independent copy."""
        return Received(dict(self.energy), None if self.prefill is None else dict(self.prefill),
                        None if self.decode is None else dict(self.decode), self.share_s)


def _add_into(target: dict[str, float], more: Mapping[str, float]) -> dict[str, float]:
    for c, j in more.items():
        target[c] = target.get(c, 0.0) + j
    return target


@dataclass
class LedgerView:
    """The ledger's split at one instant, for one weighting: read by handlers to build their tables.

    Attributes:
        received: run id -> what it received (folded plus pending) up to `t`.
        cumulative: run id -> the meter's cumulative joules at the run's start and end (end: at `t` if open).
        t: the instant the view covers up to.
        final: run ids whose split can no longer change.
        outside: joules no run received, over the ledger's life up to `t`.
    """

    received: dict[Hashable, Received]
    cumulative: dict[Hashable, tuple[dict[str, float], dict[str, float]]]
    t: float
    final: set[Hashable]
    outside: dict[str, float] = field(default_factory=dict)


class Ledger:
    """Open and finished runs on one timeline, with the joules folded into them.

    One ledger belongs to one `Timeline` (``timeline.ledger``); handlers register runs in it and read their
    shares back. Thread-safe.

    Args:
        components: the meter's component keys (``"cpu"``, ``"gpu:0"``, ...).

    Example:
        ```python
        ledger = Ledger(("gpu:0",))
        ledger.add_sample(0.0, {"gpu:0": 0.0})
        ledger.open(RunRecord("a", None, "a", "llm", "llm", [], {}, t_start=0.0))
        ledger.add_sample(2.0, {"gpu:0": 200.0})
        ledger.close_run("a", t_end=2.0)
        ledger.view("equal").received["a"].energy   # {"gpu:0": 200.0}
        ```
    """

    def __init__(self, components: Iterable[str]) -> None:
        self.components = tuple(components)
        self._lock = threading.RLock()
        self.lock = self._lock  # held by recorders while they change a live record
        self._t: list[float] = []
        self._e: dict[str, list[float]] = {c: [] for c in self.components}
        self._offset: dict[str, float] = {}  # joules of held components, never attributed
        self._live: dict[Hashable, RunRecord] = {}  # runs that can still receive joules
        self._calls: dict[Hashable, RunRecord] = {}  # the live runs that take energy first (calls)
        self._unmarked: dict[Hashable, RunRecord] = {}  # live runs whose edge marks are not both fixed yet
        self._crowded: set[Hashable] = set()  # live calls that overlapped another call (the others ran alone)
        self._links: dict[Hashable, Hashable | None] = {}  # folded run -> its parent, where it links live runs
        self._holders: dict[Hashable, int] = {}
        # One table per weighting someone reads (`use`): a fold computes only the splits that are asked for. A run
        # has an entry once a fold gives it joules (a live run without one has received nothing folded yet).
        self._received: dict[str, dict[Hashable, Received]] = {"equal": {}}
        self._cum: dict[Hashable, list[dict[str, float] | None]] = {}  # run -> [at start, at end]
        self._folded_to: float | None = None
        self.outside_j: dict[str, float] = {c: 0.0 for c in self.components}
        self.version = 0
        self._changes = 0  # changes since the last fold was tried
        self._held_after_fold = 0  # samples held when it ended

    def use(self, weighting: Weighting) -> None:
        """Keep the split by `weighting` from now on (runs opened later are shared by it too)."""
        with self._lock:
            if weighting not in self._received:
                self._received[weighting] = {}

    # -- samples -----------------------------------------------------------------------------------------
    def add_sample(self, t: float, cumulative: Mapping[str, float], held: frozenset[str] = frozenset()) -> None:
        """Append the meter's cumulative joules at `t` (later than the last sample; earlier ones are ignored).

        Args:
            t: the sample's instant.
            cumulative: joules per component.
            held: components whose joules are not shared (a GPU no engine of this process serves on): they
                keep their previous value, so no run receives their energy.
        """
        with self._lock:
            if self._t and t <= self._t[-1]:
                return
            self._t.append(t)
            offset = self._offset
            for c, ys in self._e.items():  # (a stored value is the meter's minus the component's offset)
                raw = cumulative.get(c)
                if ys and (raw is None or c in held):
                    # Unread, it holds its value. Held, what it spends is subtracted for good, so it never
                    # reaches a run: the offset grows by it.
                    if raw is not None:
                        offset[c] = float(raw) - ys[-1]
                    ys.append(ys[-1])
                else:
                    ys.append(float(raw or 0.0) - offset.get(c, 0.0))
            if self._folded_to is None:
                self._folded_to = t
            if self._unmarked:
                self._resolve_marks()
            if self._fold_due():
                self._try_fold()

    @property
    def folded_to(self) -> float:
        """Everything before this instant is folded into per-run totals (-inf before the first sample)."""
        return self._folded_to if self._folded_to is not None else -math.inf

    @property
    def samples_held(self) -> int:
        """Samples kept for open runs (the ledger's memory)."""
        return len(self._t)

    @property
    def last_sample_t(self) -> float | None:
        """The newest sample's instant."""
        with self._lock:
            return self._t[-1] if self._t else None

    # -- runs --------------------------------------------------------------------------------------------
    def open(self, rec: RunRecord, started_now: bool = False) -> RunRecord:
        """Register a run (or one more holder of an already registered run) and return its one record.

        Args:
            rec: the run.
            started_now: its start was stamped under this ledger's lock just now (not a run recorded late), so
                only calls still open can overlap it.
        """
        with self._lock:
            known = self._live.get(rec.run_id)
            if known is not None or rec.run_id in self._holders:
                self._holders[rec.run_id] = self._holders.get(rec.run_id, 0) + 1
                return known if known is not None else rec
            self._live[rec.run_id] = rec
            if rec.takes_energy_first:
                # (Every open run's end mark is pending: the open calls are among the few `_unmarked` runs.)
                self._note_overlaps(rec, self._unmarked.values() if started_now else self._calls.values())
                self._calls[rec.run_id] = rec
            self._unmarked[rec.run_id] = rec
            self._holders[rec.run_id] = 1
            self._cum[rec.run_id] = [None, None]
            self.version += 1
            if self._t and rec.t_start <= self._t[-1]:  # (a run recorded late: a sample covers an edge already)
                self._resolve_marks()
            return rec

    def _note_overlaps(self, rec: RunRecord, candidates: Iterable[RunRecord]) -> None:
        """Mark `rec` and the live calls among `candidates` it overlaps as crowded. Edges only ever move inward
        after a run opens (a batch member's own latency, an engine start cut off), so what overlaps now is all
        that ever will."""
        end = rec.t_end if rec.t_end is not None else math.inf
        for other in candidates:
            if other.takes_energy_first and other.t_start < end and (other.t_end is None or other.t_end > rec.t_start):
                self._crowded.add(other.run_id)
                self._crowded.add(rec.run_id)

    def get(self, run_id: Hashable) -> RunRecord | None:
        """The live record of a run, or None once it is folded away or unknown."""
        return self._live.get(run_id)

    def changed(self) -> None:
        """Note that a live record changed (its end, tokens or edges); fold once enough became final."""
        with self._lock:
            self.version += 1
            if self._unmarked:
                self._resolve_marks()
            self._changes += 1
            if self._fold_due():
                self._try_fold()

    def close_run(self, run_id: Hashable, t_end: float) -> None:
        """End a run at `t_end` (a convenience over setting the record's fields and `changed()`)."""
        with self._lock:
            rec = self._live.get(run_id)
            if rec is not None and rec.t_end is None:
                rec.t_end = max(t_end, rec.t_start)
                if rec.status == "running":
                    rec.status = "ok"
            self.changed()

    def release(self, run_ids: Iterable[Hashable]) -> None:
        """A holder forgets these runs; a run's totals are dropped once no holder is left and it has ended."""
        with self._lock:
            for rid in run_ids:
                n = self._holders.get(rid, 0) - 1
                if n > 0:
                    self._holders[rid] = n
                    continue
                self._holders.pop(rid, None)
                if rid not in self._live:
                    self._drop(rid)
            self.version += 1

    def _nothing(self) -> Received:
        return Received(dict.fromkeys(self.components, 0.0))

    def _entry(self, table: dict[Hashable, Received], rid: Hashable) -> Received:
        """A run's entry in a weighting's table, made on its first folded joules."""
        entry = table.get(rid)
        if entry is None:
            entry = table[rid] = self._nothing()
        return entry

    def _drop(self, rid: Hashable) -> None:
        for table in self._received.values():
            table.pop(rid, None)
        self._cum.pop(rid, None)

    # -- folding -----------------------------------------------------------------------------------------
    def _fold_limit(self) -> float | None:
        if not self._t:
            return None
        limit = self._t[-1]
        for r in self._calls.values():
            if r.t_end is None:
                limit = min(limit, r.t_start)
        return limit

    def _resolve_marks(self) -> None:
        """Fix each run's cumulative joules at its edges once a sample at or after the edge exists."""
        if not self._t:
            return
        last = self._t[-1]
        for rid, rec in list(self._unmarked.items()):
            marks = self._cum.get(rid)
            if marks is None:
                del self._unmarked[rid]
                continue
            if marks[0] is None and rec.t_start <= last:
                marks[0] = self._cumulative_at(rec.t_start)
            if marks[1] is None and rec.t_end is not None and rec.t_end <= last:
                marks[1] = self._cumulative_at(rec.t_end)
            if marks[0] is not None and marks[1] is not None:
                del self._unmarked[rid]

    def _cumulative_at(self, t: float) -> dict[str, float]:
        ts = self._t
        if not ts:
            return dict.fromkeys(self.components, 0.0)
        i = bisect.bisect_right(ts, t)  # one search for every component
        if i == 0 or i == len(ts):
            return {c: self._e[c][0 if i == 0 else -1] for c in self.components}
        f = (t - ts[i - 1]) / (ts[i] - ts[i - 1])
        out = {}
        for c, ys in self._e.items():  # (a loop, not a comprehension: this runs at every call's edges)
            before = ys[i - 1]
            out[c] = before + (ys[i] - before) * f
        return out

    def fold(self) -> None:
        """Fold everything that can no longer change now (it otherwise happens in batches, on its own)."""
        with self._lock:
            self._fold()

    def _fold_due(self) -> bool:
        """Whether to try a fold: after `_FOLD_EVERY` changes, or once the samples held doubled since the last
        try. A fold walks every live run, and runs that stay open (workflows' chains, a long call) hold back
        what it can drop: counting changes and samples, not live runs, keeps trying cheap on average."""
        return self._changes >= _FOLD_EVERY or len(self._t) > max(_FOLD_EVERY, 2 * self._held_after_fold)

    def _try_fold(self) -> None:
        self._changes = 0
        self._fold()
        self._held_after_fold = len(self._t)

    def _fold(self) -> None:
        """Attribute everything before the oldest open call and drop those samples."""
        upto = self._fold_limit()
        t0 = self._folded_to
        if upto is None or t0 is None or upto <= t0:
            return
        lone = self._lone_calls_within(t0, upto)
        if lone is not None:
            self._fold_lone_calls(lone, t0, upto)
        else:
            self._fold_by_attribution(t0, upto)
        # Keep one (interpolated) sample at the fold point so later pieces interpolate exactly as before.
        at = self._cumulative_at(upto)
        keep = bisect.bisect_right(self._t, upto)
        self._t = [upto] + self._t[keep:]
        for c in self.components:
            self._e[c] = [at[c]] + self._e[c][keep:]
        self._folded_to = upto
        ended = {rid: r for rid, r in self._live.items() if r.t_end is not None and r.t_end <= upto}
        for rid in ended:
            del self._live[rid]
            self._calls.pop(rid, None)
            self._unmarked.pop(rid, None)
            self._crowded.discard(rid)
            if rid not in self._holders:
                self._drop(rid)
        self._keep_links(ended)

    def _keep_links(self, ended: Mapping[Hashable, RunRecord]) -> None:
        """Remember the parents of folded runs that still link live runs: a chain's time goes to its innermost
        open runs, so a run whose parent has ended still yields to the grandparent (an ended run between them
        does not make them strangers)."""
        parent_of = {**self._links, **{rid: r.parent_run_id for rid, r in ended.items()}}
        links: dict[Hashable, Hashable | None] = {}
        for r in self._live.values():
            p = r.parent_run_id
            while p is not None and p not in self._live and p in parent_of and p not in links:
                links[p] = parent_of[p]
                p = links[p]
        self._links = links

    def _enclosing(self, parent: Hashable | None) -> Hashable | None:
        """The nearest live run among a run's ancestors, from its parent's id."""
        if parent is None or parent in self._live:
            return parent
        seen = set()
        while parent is not None and parent not in self._live and parent not in seen:
            seen.add(parent)
            parent = self._links.get(parent)
        return parent if parent in self._live else None

    def _fold_by_attribution(self, t0: float, upto: float) -> None:
        spans_by_w = {w: self._spans(t0, upto, w) for w in self._received}
        cut = bisect.bisect_right(self._t, upto) + 1  # the first sample after `upto` interpolates up to it
        times = self._t[:cut]
        cumulative = {c: v[:cut] for c, v in self._e.items()}
        for n, (w, spans) in enumerate(spans_by_w.items()):
            result = attribute(times, cumulative, spans, window=(t0, upto), weighting="tokens")
            table = self._received[w]
            for s in spans:
                self._entry(table, s.run_id).add(result.direct[s.run_id], result.prefill.get(s.run_id),
                                    result.decode.get(s.run_id), result.share_s[s.run_id])
            if n == 0:  # what nobody received is the same under every weighting: count it once
                _add_into(self.outside_j, result.outside)

    def _lone_calls_within(self, t0: float, upto: float) -> list[RunRecord] | None:
        """The live runs that cover time in [t0, upto] when all are calls that ran alone, inside it, with both
        edge marks fixed (calls one after another, metered on their own); else None."""
        calls = []
        for r in self._live.values():
            end = r.t_end if r.t_end is not None else math.inf
            if min(end, upto) <= max(r.t_start, t0):
                continue  # no time inside the window
            if (not r.takes_energy_first or r.run_id in self._crowded or r.t_start < t0 or end > upto
                    or None in self._cum[r.run_id]):
                return None
            calls.append(r)
        return calls

    def _fold_lone_calls(self, calls: list[RunRecord], t0: float, upto: float) -> None:
        """Fold [t0, upto] in closed form: each call takes every joule between its edge marks (what `attribute`
        gives calls that never overlap, under any weighting), and the rest of the window is outside."""
        at_end = self._cumulative_at(upto)
        outside = {c: at_end[c] - self._e[c][0] for c in self.components}  # (the first sample is at t0)
        for r in calls:
            energy, prefill, decode = self._lone_split(r)
            for c in self.components:
                outside[c] -= energy[c]
            if r.run_id in self._holders:  # (a run nobody holds any more is dropped below: nothing to keep)
                for table in self._received.values():
                    self._entry(table, r.run_id).add(energy, prefill, decode, r.t_end - r.t_start)
        _add_into(self.outside_j, outside)

    def _lone_split(self, rec: RunRecord) -> tuple[dict[str, float], dict[str, float] | None,
                                                   dict[str, float] | None]:
        """Joules of an ended call that ran alone, from its edge marks: in all, before and after its first token
        (None when that is not known)."""
        start, end = self._cum[rec.run_id]
        assert start is not None and end is not None and rec.t_end is not None
        energy = {}
        for c, j in end.items():  # (a loop, not a comprehension: this runs at every call's end)
            energy[c] = j - start[c]
        if rec.t_first_token is None:
            return energy, None, None
        at_first = self._cumulative_at(min(max(rec.t_first_token, rec.t_start), rec.t_end))
        return (energy, {c: at_first[c] - start[c] for c in self.components},
                {c: end[c] - at_first[c] for c in self.components})

    def _spans(self, t0: float, t1: float, weighting: str, calls_only: bool = False,
               within: tuple[float, float] | None = None) -> list[Span]:
        """Spans of the live runs (or only the calls) that overlap [t0, t1] (or `within`), open ones clipped at
        t1, with their weights."""
        lo, hi = within if within is not None else (t0, t1)
        spans = []
        batch_tokens: dict[Hashable, list[int | None]] | None = None  # gathered when a batch member needs it
        for r in (self._calls if calls_only else self._live).values():
            end = r.t_end if r.t_end is not None else max(t1, r.t_start)
            if r.t_start > hi or end < lo:
                continue
            if batch_tokens is None and r.timing == "batch":
                batch_tokens = {}
                for c in self._calls.values():  # batch members are calls
                    if c.timing == "batch" and c.batch_key is not None:
                        batch_tokens.setdefault(c.batch_key, []).append(c.tokens)
            pw, dw = self._weights(r, end, weighting, batch_tokens or {})
            first = r.t_first_token if r.takes_energy_first else None
            parent = self._enclosing(r.parent_run_id)
            spans.append(Span(run_id=r.run_id, t_start=r.t_start, t_end=end, is_call=r.takes_energy_first,
                              parent_id=parent, t_first_token=first, prefill_weight=pw, decode_weight=dw))
        return spans

    @staticmethod
    def _weights(r: RunRecord, end: float, weighting: str,
                 batch_tokens: Mapping[Hashable, list[int | None]]) -> tuple[float, float | None]:
        if not r.takes_energy_first:
            return 1.0, None
        if weighting == "tokens" and r.is_call:
            return token_rate_weights(r.prompt_tokens, r.completion_tokens, r.t_start, end,
                                      r.t_first_token, r.cached_tokens)
        if r.timing == "batch" and r.batch_key is not None:
            # Calls of one batch all end at the batch's end: their shared span says nothing about who ran
            # longer, so the batch's share is split by tokens (the batch as a whole weighs its size).
            members = batch_tokens.get(r.batch_key, [])
            known = [n for n in members if n is not None]
            if r.tokens is not None and len(known) == len(members) and sum(known) > 0:
                return len(members) * r.tokens / sum(known), None
        return 1.0, None

    # -- reading -----------------------------------------------------------------------------------------
    def view(self, weighting: Weighting, t: float | None = None, runs: Iterable[Hashable] | None = None) -> LedgerView:
        """Each run's joules up to `t` (default: the newest sample): folded totals plus the pending split.

        Args:
            weighting: ``"equal"`` or ``"tokens"``.
            t: the instant to cover up to; open runs count as running until then.
            runs: the run ids wanted (all known ones by default); for live calls, only the time they cover is
                split, and `outside` then holds only what is folded.
        """
        with self._lock:
            folded = self._received[weighting]
            known = self._cum  # (every run from its opening to its drop)
            wanted = list(known) if runs is None else [r for r in runs if r in known]
            received = {rid: folded[rid].copy() if rid in folded else self._nothing() for rid in wanted}
            t_cut = t if t is not None else (self._t[-1] if self._t else 0.0)
            t0 = self._folded_to
            outside = dict(self.outside_j)
            lo, hi = t0, t_cut
            narrowed = runs is not None and t0 is not None and bool(wanted) and all(r in self._calls for r in wanted)
            if narrowed:
                # Only these calls' shares: splitting the time they cover gives them what the whole window
                # would (splits compose over pieces, and a call's share depends only on the calls beside it),
                # at a cost that does not grow with everything else open. `outside` then covers what is folded
                # only. (A chain's share depends on its descendants' ancestry, so chains take the whole window.)
                lo = max(t0, min(self._calls[r].t_start for r in wanted))
                hi = min(t_cut, max(t_cut if self._calls[r].t_end is None else self._calls[r].t_end for r in wanted))
            if lo is not None and self._t and hi > lo:
                # Weights as the whole view has them (an open call's token rate runs to t_cut), then only the
                # spans inside [lo, hi] (only the calls', when narrowed: chains cannot change a call's share).
                spans = self._spans(t0, t_cut, weighting, calls_only=narrowed, within=(lo, hi))
                # The samples that bracket [lo, hi] interpolate it exactly as all of them would.
                first = max(bisect.bisect_right(self._t, lo) - 1, 0)
                last = bisect.bisect_left(self._t, hi) + 1
                result = attribute(self._t[first:last], {c: v[first:last] for c, v in self._e.items()}, spans,
                                   window=(lo, hi), weighting="tokens", only=None if runs is None else set(wanted))
                if not narrowed:
                    _add_into(outside, result.outside)
                for s in spans:
                    if s.run_id in received:
                        received[s.run_id].add(result.direct[s.run_id], result.prefill.get(s.run_id),
                                               result.decode.get(s.run_id), result.share_s[s.run_id])
            cumulative = {}
            for rid in wanted:
                marks = self._cum.get(rid) or [None, None]
                rec = self._live.get(rid)
                start = marks[0] if marks[0] is not None else (
                    self._cumulative_at(rec.t_start) if rec is not None and self._t else None)
                end = marks[1]
                if end is None and self._t:
                    t_end = rec.t_end if rec is not None and rec.t_end is not None else t_cut
                    end = self._cumulative_at(min(t_end, t_cut))
                if start is not None and end is not None:
                    cumulative[rid] = (start, end)
            final = {rid for rid in wanted if rid not in self._live or self._is_final(self._live[rid], weighting)}
            return LedgerView(received=received, cumulative=cumulative, t=t_cut, final=final, outside=outside)

    def call_split(self, weighting: Weighting, run_id: Hashable) -> tuple[Received, bool] | None:
        """One call's joules up to the newest sample, and whether they are final: what a handler puts on the
        call's message at its end. None for a run the ledger does not hold."""
        with self._lock:
            alone = self._lone_call_received(run_id)
            if alone is not None:
                return alone, True
            view = self.view(weighting, runs=[run_id])
            received = view.received.get(run_id)
            return None if received is None else (received, run_id in view.final)

    def _lone_call_received(self, run_id: Hashable) -> Received | None:
        """What an ended call that overlapped no other call received, in closed form: every joule between its
        edge marks is its own (what the split gives it under any weighting, at a cost that does not grow with
        what else is live). None when that does not apply."""
        rec = self._calls.get(run_id)
        if rec is None or rec.t_end is None or run_id in self._crowded or self._folded_to is None \
                or self._folded_to > rec.t_start:
            return None
        marks = self._cum.get(run_id)
        if marks is None or marks[0] is None or marks[1] is None:  # (fixed once a sample covers the edge)
            return None
        # Nothing of it is folded yet (the fold has not reached its start): its split is all it has received.
        return Received(*self._lone_split(rec), share_s=rec.t_end - rec.t_start)

    def _is_final(self, rec: RunRecord, weighting: str) -> bool:
        """A run's split is final once it has ended, a sample covers its end, and every call that overlapped
        it has ended too or (equal weights) is a lone call, whose end can only come later."""
        if rec.t_end is None or not self._t or self._t[-1] < rec.t_end:
            return False
        others = [o for o in self._calls.values() if o.t_start < rec.t_end and o is not rec]
        if weighting == "equal" and rec.timing != "batch":
            # Open lone calls will end after now; an open batch member may still end in the past.
            return all(o.t_end is not None or o.batch_size == 1 for o in others)
        return all(o.t_end is not None for o in others)

    def open_calls(self) -> int:
        """How many calls are open now."""
        with self._lock:
            return sum(1 for r in self._calls.values() if r.t_end is None)
