"""Share a device-wide energy timeline among overlapping runs, conserving every joule.

The rule: cut time at every sample and every run boundary (start, first token, end). Each piece's energy
(from interpolated cumulative joules) goes to

1. the LLM calls active during it, in equal shares or weighted by their token rates; else
2. the innermost non-call runs active during it (chains, graph nodes: the workflow's idle/orchestration
   time), in equal shares; else
3. nobody: it is reported as ``outside``.

Hence the conservation law checked by the tests: for any overlap pattern,
``sum(call joules) + sum(orchestration joules) + outside == metered total``, and a run's inclusive energy is
its own share plus its descendants'. A call's share is split into prefill (before its first token) and
decode (after) when the first-token time is known. Everything here is a pure function of its inputs.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from langchain_energy.errors import ConfigError

Weighting = Literal["equal", "tokens"]
Energy = dict[str, float]


@dataclass(frozen=True)
class Span:
    """A run's interval on the timeline.

    Attributes:
        run_id: any hashable id.
        t_start: start instant (the timeline's clock).
        t_end: end instant (>= t_start).
        is_call: True for LLM/chat-model calls, which take energy first.
        parent_id: the enclosing run's id, or None for a root.
        t_first_token: first-token instant of a call, when known (splits prefill from decode).
        prefill_weight: the call's weight before its first token (token weighting only).
        decode_weight: its weight after the first token; None reuses `prefill_weight`.
    """

    run_id: Hashable
    t_start: float
    t_end: float
    is_call: bool = True
    parent_id: Hashable | None = None
    t_first_token: float | None = None
    prefill_weight: float = 1.0
    decode_weight: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.t_start) and math.isfinite(self.t_end)) or self.t_end < self.t_start:
            raise ConfigError(f"span {self.run_id!r} needs finite t_start <= t_end, got {self.t_start}, {self.t_end}")
        if self.prefill_weight < 0 or (self.decode_weight is not None and self.decode_weight < 0):
            raise ConfigError(f"span {self.run_id!r} has a negative weight")


@dataclass
class Attribution:
    """The result of `attribute`.

    Attributes:
        total: metered joules per component over the window.
        direct: joules each run received itself (calls: their share; others: idle/orchestration share).
        prefill: per call with a known first token, the joules before it.
        decode: per call with a known first token, the joules after it.
        outside: joules in pieces where no run was active.
        window: the (t0, t1) that was attributed.
        components: the component keys, in input order.
        share_s: seconds each run received (a piece's length times the run's share of it): an idle baseline
            of P watts charges a run ``P * share_s`` joules, consistently with how energy was shared.
        outside_s: seconds of pieces where no run was active.
    """

    total: Energy
    direct: dict[Hashable, Energy]
    prefill: dict[Hashable, Energy]
    decode: dict[Hashable, Energy]
    outside: Energy
    window: tuple[float, float]
    components: tuple[str, ...] = field(default_factory=tuple)
    share_s: dict[Hashable, float] = field(default_factory=dict)
    outside_s: float = 0.0

    def calls_total(self, spans: Iterable[Span]) -> Energy:
        """Sum of the calls' shares per component."""
        return _sum_energies([self.direct[s.run_id] for s in spans if s.is_call], self.components)

    def inclusive(self, spans: Sequence[Span]) -> dict[Hashable, Energy]:
        """Each run's own share plus all its descendants' (a chain = its calls + its idle share)."""
        by_id = {s.run_id: s for s in spans}
        zero = {c: 0.0 for c in self.components}
        out = {rid: dict(self.direct.get(rid, zero)) for rid in by_id}
        for s in spans:
            own = self.direct.get(s.run_id, zero)
            p, seen = s.parent_id, {s.run_id}
            while p is not None and p in by_id and p not in seen:  # 'seen' guards against a cyclic parent map
                seen.add(p)
                tgt = out[p]
                for c, j in own.items():
                    tgt[c] = tgt.get(c, 0.0) + j
                p = by_id[p].parent_id
        return out


def _sum_energies(items: Iterable[Mapping[str, float]], components: Sequence[str]) -> Energy:
    return {c: math.fsum(e.get(c, 0.0) for e in items) for c in components}


def token_rate_weights(
    prompt_tokens: int | None,
    completion_tokens: int | None,
    t_start: float,
    t_end: float,
    t_first_token: float | None = None,
    cached_tokens: int | None = None,
) -> tuple[float, float | None]:
    """Token-rate weights of one call: (prefill, decode) tokens per second, for ``weighting="tokens"``.

    A call that processes more tokens per second while it overlaps others gets a larger share. Prompt tokens
    served from the prefix cache are not computed, so they do not count toward prefill. Unknown counts give 0,
    which falls back to equal shares when every active call has weight 0.

    Example:
        >>> token_rate_weights(100, 50, 0.0, 2.0, t_first_token=1.0)
        (100.0, 50.0)
    """
    p = max((prompt_tokens or 0) - (cached_tokens or 0), 0)
    c = completion_tokens or 0
    dur = t_end - t_start
    if t_first_token is None or not t_start <= t_first_token <= t_end:
        return ((p + c) / dur if dur > 0 else 0.0), None
    pre, dec = t_first_token - t_start, t_end - t_first_token
    return (p / pre if pre > 0 else 0.0), (c / dec if dec > 0 else 0.0)


def attribute(
    times: Sequence[float],
    cumulative: Mapping[str, Sequence[float]],
    spans: Sequence[Span],
    window: tuple[float, float] | None = None,
    weighting: Weighting = "equal",
    only: Collection[Hashable] | None = None,
) -> Attribution:
    """Share the energy of a cumulative-joules timeline among runs (see the module docstring for the rule).

    Args:
        times: sample instants, strictly increasing.
        cumulative: component -> cumulative joules at each sample (interpolated linearly between samples,
            held constant beyond both ends).
        spans: the runs.
        window: (t0, t1) to attribute; by default from the earliest span start to the latest span end.
        weighting: ``"equal"`` shares or ``"tokens"`` (each call's `prefill_weight`/`decode_weight`).
        only: the runs whose shares are wanted (default: all); the others still take theirs, but theirs are
            not added up (``direct``, ``prefill``, ``decode`` and ``share_s`` then hold only these runs).

    Returns:
        An `Attribution`; ``sum(direct) + outside == total`` per component.

    Example:
        >>> a = attribute([0.0, 10.0], {"cpu": [0.0, 100.0]},
        ...               [Span("a", 0.0, 6.0), Span("b", 4.0, 8.0)])
        >>> a.direct["a"]["cpu"], a.direct["b"]["cpu"], a.outside["cpu"]
        (50.0, 30.0, 0.0)
    """
    if weighting not in ("equal", "tokens"):
        raise ConfigError(f"weighting must be 'equal' or 'tokens', got {weighting!r}")
    components = tuple(cumulative)
    ts = [float(t) for t in times]
    if any(len(v) != len(ts) for v in cumulative.values()):
        raise ConfigError("every cumulative series must have one value per sample time")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise ConfigError("sample times must be strictly increasing")
    if window is None:
        if not spans:
            t0 = t1 = ts[0] if ts else 0.0
        else:
            t0, t1 = min(s.t_start for s in spans), max(s.t_end for s in spans)
    else:
        t0, t1 = float(window[0]), float(window[1])
    if t1 < t0:
        raise ConfigError(f"window must have t0 <= t1, got {t0} > {t1}")

    def clip(x: float) -> float:
        return min(max(x, t0), t1)

    clipped = sorted(((clip(s.t_start), clip(s.t_end), s) for s in spans), key=lambda x: x[0])
    if _disjoint_calls(clipped):
        return _split_disjoint(ts, cumulative, clipped, (t0, t1), only)

    # Cut points: the window, interior samples, and every run boundary inside the window.
    cuts = {t0, t1}
    cuts.update(float(t) for t in ts if t0 < t < t1)
    for s in spans:
        cuts.add(clip(s.t_start))
        cuts.add(clip(s.t_end))
        if s.t_first_token is not None:
            cuts.add(clip(s.t_first_token))
    grid = sorted(cuts)

    # Cumulative joules at the cuts, relative to t0 so that values stay near the window's total (precision).
    # Plain Python: most calls split a few pieces (one call's window), where array set-up would cost the most.
    seg: dict[str, list[float]] = {}
    total: Energy = {}
    for c in components:
        ys = [float(y) for y in cumulative[c]]
        at = _interpolate_sorted(ts, ys, grid)
        rel = [x - at[0] for x in at]
        seg[c] = [b - a for a, b in zip(rel, rel[1:])]
        total[c] = rel[-1]

    # The sweep works on span indices and component positions (run ids such as UUIDs hash slowly).
    n, width = len(spans), len(components)
    segs = [seg[c] for c in components]
    starts = [clip(s.t_start) for s in spans]
    ends = [clip(s.t_end) for s in spans]
    wanted = [only is None or s.run_id in only for s in spans]
    own = [[0.0] * width for _ in spans]
    phased = [s.is_call and s.t_first_token is not None for s in spans]
    pre = [[0.0] * width if p else None for p in phased]
    dec = [[0.0] * width if p else None for p in phased]
    seconds = [0.0] * n
    out_e = [0.0] * width
    outside_s = 0.0
    index_of = {s.run_id: i for i, s in enumerate(spans)}
    parent = [index_of.get(s.parent_id) if s.parent_id is not None else None for s in spans]

    order = sorted(range(n), key=starts.__getitem__)
    active: dict[int, None] = {}  # an ordered set
    nxt = 0
    for k in range(len(grid) - 1):
        a, b = grid[k], grid[k + 1]
        while nxt < n and starts[order[nxt]] <= a:
            active[order[nxt]] = None
            nxt += 1
        for i in [i for i in active if ends[i] <= a]:
            del active[i]
        if b <= a:
            continue
        calls = [i for i in active if spans[i].is_call]
        if calls:
            weights = _weights([spans[i] for i in calls], a, weighting)
            wsum = math.fsum(weights)
            for i, w in zip(calls, weights):
                if not wanted[i]:
                    continue
                share = w / wsum
                seconds[i] += (b - a) * share
                tgt = own[i]
                phase = (pre[i] if a < spans[i].t_first_token else dec[i]) if phased[i] else None  # type: ignore[operator]
                for j in range(width):
                    e = segs[j][k] * share
                    tgt[j] += e
                    if phase is not None:
                        phase[j] += e
            continue
        inner = _innermost(active, parent)
        if inner:
            share = 1.0 / len(inner)
            for i in inner:
                if not wanted[i]:
                    continue
                seconds[i] += (b - a) * share
                tgt = own[i]
                for j in range(width):
                    tgt[j] += segs[j][k] * share
        else:
            outside_s += b - a
            for j in range(width):
                out_e[j] += segs[j][k]

    direct: dict[Hashable, Energy] = {}
    prefill: dict[Hashable, Energy] = {}
    decode: dict[Hashable, Energy] = {}
    share_s: dict[Hashable, float] = {}
    for i, s in enumerate(spans):
        if not wanted[i]:
            continue
        _add_at(direct.setdefault(s.run_id, dict.fromkeys(components, 0.0)), components, own[i])
        share_s[s.run_id] = share_s.get(s.run_id, 0.0) + seconds[i]
        if phased[i]:
            _add_at(prefill.setdefault(s.run_id, dict.fromkeys(components, 0.0)), components, pre[i])  # type: ignore[arg-type]
            _add_at(decode.setdefault(s.run_id, dict.fromkeys(components, 0.0)), components, dec[i])  # type: ignore[arg-type]
    outside = dict(zip(components, out_e))
    return Attribution(total=total, direct=direct, prefill=prefill, decode=decode, outside=outside,
                       window=(t0, t1), components=components, share_s=share_s, outside_s=outside_s)


def _disjoint_calls(clipped: Sequence[tuple[float, float, Span]]) -> bool:
    """Whether every run that covers time (clipped to the window, in start order) is a call, and no two overlap."""
    last_end = -math.inf
    for a, b, s in clipped:
        if b > a:
            if not s.is_call or a < last_end:
                return False
            last_end = b
    return True


def _split_disjoint(ts: list[float], cumulative: Mapping[str, Sequence[float]],
                    clipped: Sequence[tuple[float, float, Span]], window: tuple[float, float],
                    only: Collection[Hashable] | None) -> Attribution:
    """`attribute` when no two calls overlap and nothing else runs (the common case: calls one after another):
    each call takes every joule of its time, the rest is outside. Closed form, no sweep."""
    t0, t1 = window
    components = tuple(cumulative)
    points = [t0]  # sorted: the calls are disjoint and in order, each first token within its own call
    for a, b, s in clipped:
        first = b if s.t_first_token is None else min(max(s.t_first_token, a), b)
        points += (a, first, b)
    points.append(t1)
    at = {c: _interpolate_sorted(ts, cumulative[c], points) for c in components}
    total = {c: v[-1] - v[0] for c, v in at.items()}
    direct: dict[Hashable, Energy] = {}
    prefill: dict[Hashable, Energy] = {}
    decode: dict[Hashable, Energy] = {}
    share_s: dict[Hashable, float] = {}
    taken = dict.fromkeys(components, 0.0)
    covered = 0.0
    for k, (a, b, s) in enumerate(clipped):
        i = 1 + 3 * k  # this call's (start, first token, end) in `points`
        for c, v in at.items():
            taken[c] += v[i + 2] - v[i]
        covered += b - a
        if only is not None and s.run_id not in only:
            continue
        _add_difference(direct.setdefault(s.run_id, dict.fromkeys(components, 0.0)), at, i, i + 2)
        share_s[s.run_id] = share_s.get(s.run_id, 0.0) + (b - a)
        if s.t_first_token is not None:
            _add_difference(prefill.setdefault(s.run_id, dict.fromkeys(components, 0.0)), at, i, i + 1)
            _add_difference(decode.setdefault(s.run_id, dict.fromkeys(components, 0.0)), at, i + 1, i + 2)
    outside = {c: total[c] - taken[c] for c in components}
    return Attribution(total=total, direct=direct, prefill=prefill, decode=decode, outside=outside,
                       window=window, components=components, share_s=share_s, outside_s=(t1 - t0) - covered)


def _weights(calls: list[Span], a: float, weighting: Weighting) -> list[float]:
    if weighting == "equal":
        return [1.0] * len(calls)
    ws = []
    for s in calls:
        in_decode = s.t_first_token is not None and a >= s.t_first_token and s.decode_weight is not None
        ws.append(s.decode_weight if in_decode else s.prefill_weight)  # type: ignore[arg-type]
    if math.fsum(ws) <= 0:
        return [1.0] * len(calls)
    return ws


def _innermost(active: Iterable[int], parent: Sequence[int | None]) -> list[int]:
    """Active runs (span indices) none of whose active descendants exist: the deepest open scopes."""
    ancestors: set[int] = set()
    for i in active:
        p, seen = parent[i], {i}
        while p is not None and p not in seen:  # 'seen' guards against a cyclic parent map
            seen.add(p)
            ancestors.add(p)
            p = parent[p]
    return [i for i in active if i not in ancestors]


def _add_difference(target: dict[str, float], at: Mapping[str, Sequence[float]], lo: int, hi: int) -> None:
    for c, v in at.items():
        target[c] += v[hi] - v[lo]


def _add_at(target: dict[str, float], components: Sequence[str], values: Sequence[float]) -> None:
    for c, v in zip(components, values):
        target[c] += v


def _interpolate_sorted(ts: Sequence[float], ys: Sequence[float], grid: Sequence[float]) -> list[float]:
    """`interpolate` at every point of a sorted grid, in one walk along the samples (found by bisection first)."""
    if not ts:
        return [0.0] * len(grid)
    last = len(ts) - 1
    i = min(max(bisect.bisect_right(ts, grid[0]) - 1, 0), max(last - 1, 0)) if grid else 0
    out = []
    for g in grid:
        if g <= ts[0]:
            out.append(ys[0])
            continue
        if g >= ts[last]:
            out.append(ys[last])
            continue
        while ts[i + 1] <= g:  # afterwards ts[i] <= g < ts[i + 1]
            i += 1
        out.append(ys[i] + (ys[i + 1] - ys[i]) * (g - ts[i]) / (ts[i + 1] - ts[i]))
    return out


def interpolate(ts: Sequence[float], ys: Sequence[float], t: float) -> float:
    """Piecewise-linear value of the series (ts, ys) at t, held constant beyond both ends.

    Example:
        >>> interpolate([0.0, 2.0], [0.0, 10.0], 0.5)
        2.5
    """
    return _interpolate_sorted(ts, ys, (t,))[0]


def active_energy(total_j: float, duration_s: float, idle_power_w: float) -> float:
    """Energy above an idle baseline: ``total - idle_power * duration``.

    Example:
        >>> active_energy(100.0, 10.0, 4.0)
        60.0
    """
    if duration_s < 0 or idle_power_w < 0:
        raise ConfigError("duration and idle power must be >= 0")
    return total_j - idle_power_w * duration_s
