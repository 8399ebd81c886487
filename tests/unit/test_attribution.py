"""Property tests of the attribution rule: conservation, equal shares, token weights, nesting, phases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_energy.attribution import Span, active_energy, attribute, token_rate_weights
from langchain_energy.errors import ConfigError
from langchain_energy.meters.replay import PowerTrace

finite = dict(allow_nan=False, allow_infinity=False)


@st.composite
def timelines(draw):
    n = draw(st.integers(min_value=1, max_value=25))
    # sample instants on a 10 ms grid, like a real sampler's (no sub-normal spacings)
    times = [k / 100 for k in sorted(draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True)))]
    series = {}
    for comp in draw(st.sets(st.sampled_from(["cpu", "dram", "gpu:0", "gpu:1"]), min_size=1)):
        steps = draw(st.lists(st.floats(0, 500, **finite), min_size=n, max_size=n))
        acc, cum = 0.0, []
        for s in steps:
            acc += s
            cum.append(acc)
        series[comp] = cum
    return times, series


@st.composite
def span_sets(draw, max_spans=12):
    n = draw(st.integers(min_value=0, max_value=max_spans))
    spans = []
    for i in range(n):
        # + 0.0 turns -0.0 into 0.0: sorted() keeps (0.0, -0.0) as drawn, and floats(0.0, -0.0) is refused.
        a, b = sorted(x + 0.0 for x in draw(st.lists(st.floats(-10, 110, **finite), min_size=2, max_size=2)))
        is_call = draw(st.booleans())
        parent = draw(st.one_of(st.none(), st.integers(0, i - 1))) if i > 0 else None
        first = draw(st.one_of(st.none(), st.floats(a, b, **finite))) if is_call else None
        pw = draw(st.floats(0, 100, **finite))
        dw = draw(st.one_of(st.none(), st.floats(0, 100, **finite)))
        spans.append(Span(i, a, b, is_call=is_call, parent_id=parent, t_first_token=first,
                          prefill_weight=pw, decode_weight=dw))
    return spans


def close(a: float, b: float, scale: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9 * max(scale, 1e-12))


@settings(max_examples=150, deadline=None)
@given(timelines(), span_sets(), st.sampled_from(["equal", "tokens"]),
       st.one_of(st.none(), st.tuples(st.floats(-20, 120, **finite), st.floats(0, 60, **finite))))
def test_conservation_for_any_overlap(tl, spans, weighting, window):
    times, series = tl
    if window is not None:
        window = (window[0], window[0] + window[1])
    res = attribute(times, series, spans, window=window, weighting=weighting)
    for c in series:
        scale = max(abs(v) for v in series[c]) or 1.0
        per_run = math.fsum(res.direct[s.run_id][c] for s in spans)
        assert close(per_run + res.outside[c], res.total[c], scale)
        # the total is exactly what the timeline says for the window
        t0, t1 = res.window
        expected = _interp(times, series[c], t1) - _interp(times, series[c], t0)
        assert close(res.total[c], expected, scale)
        # cumulative counters never decrease, so no run gets negative energy
        assert all(res.direct[s.run_id][c] >= -1e-9 * scale for s in spans)


@settings(max_examples=100, deadline=None)
@given(timelines(), span_sets())
def test_nesting_inclusive_energy_sums_descendants(tl, spans):
    times, series = tl
    res = attribute(times, series, spans)
    inc = res.inclusive(spans)
    children = {s.run_id: [c for c in spans if c.parent_id == s.run_id] for s in spans}
    for s in spans:
        for c in series:
            scale = max(abs(v) for v in series[c]) or 1.0
            expect = res.direct[s.run_id][c] + math.fsum(inc[k.run_id][c] for k in children[s.run_id])
            assert close(inc[s.run_id][c], expect, scale)
    # roots partition everything that was attributed
    for c in series:
        scale = max(abs(v) for v in series[c]) or 1.0
        roots = math.fsum(inc[s.run_id][c] for s in spans if s.parent_id is None)
        assert close(roots + res.outside[c], res.total[c], scale)


@settings(max_examples=100, deadline=None)
@given(timelines(), span_sets())
def test_prefill_plus_decode_is_the_call_share(tl, spans):
    times, series = tl
    res = attribute(times, series, spans)
    for s in spans:
        if s.is_call and s.t_first_token is not None:
            for c in series:
                scale = max(abs(v) for v in series[c]) or 1.0
                assert close(res.prefill[s.run_id][c] + res.decode[s.run_id][c], res.direct[s.run_id][c], scale)
        else:
            assert s.run_id not in res.prefill


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20), st.floats(0.1, 1000, **finite), st.floats(0.5, 50, **finite))
def test_equal_shares_of_fully_overlapping_calls(n, watts, duration):
    spans = [Span(i, 0.0, duration) for i in range(n)]
    res = attribute([0.0, duration], {"cpu": [0.0, watts * duration]}, spans)
    for s in spans:
        assert math.isclose(res.direct[s.run_id]["cpu"], watts * duration / n, rel_tol=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.floats(0.01, 100, **finite), st.floats(0.01, 100, **finite))
def test_token_weights_split_in_proportion(w1, w2):
    spans = [Span("a", 0.0, 10.0, prefill_weight=w1), Span("b", 0.0, 10.0, prefill_weight=w2)]
    res = attribute([0.0, 10.0], {"gpu:0": [0.0, 1000.0]}, spans, weighting="tokens")
    assert math.isclose(res.direct["a"]["gpu:0"] / res.direct["b"]["gpu:0"], w1 / w2, rel_tol=1e-9)
    # equal weighting ignores the weights
    eq = attribute([0.0, 10.0], {"gpu:0": [0.0, 1000.0]}, spans, weighting="equal")
    assert math.isclose(eq.direct["a"]["gpu:0"], 500.0)


def test_calls_take_energy_before_chains_and_gaps_go_to_innermost_chain():
    # 10 W for 10 s. root chain [0, 10] > node chain [2, 8] > call [3, 5]; a second call in root [6, 7].
    spans = [
        Span("root", 0, 10, is_call=False),
        Span("node", 2, 8, is_call=False, parent_id="root"),
        Span("c1", 3, 5, parent_id="node"),
        Span("c2", 6, 7, parent_id="root"),
    ]
    res = attribute([0.0, 10.0], {"cpu": [0.0, 100.0]}, spans)
    d = {k: v["cpu"] for k, v in res.direct.items()}
    assert d["c1"] == pytest.approx(20.0) and d["c2"] == pytest.approx(10.0)
    # node is innermost during [2,3], [5,6] and [7,8]; root during [0,2] and [8,10]
    assert d["node"] == pytest.approx(30.0) and d["root"] == pytest.approx(40.0)
    inc = res.inclusive(spans)
    assert inc["root"]["cpu"] == pytest.approx(100.0)
    assert inc["node"]["cpu"] == pytest.approx(50.0)  # its 30 J of gaps plus c1's 20 J


def test_prefill_decode_split_at_first_token():
    res = attribute([0.0, 4.0], {"cpu": [0.0, 40.0]}, [Span("c", 0.0, 4.0, t_first_token=1.0)])
    assert res.prefill["c"]["cpu"] == pytest.approx(10.0)
    assert res.decode["c"]["cpu"] == pytest.approx(30.0)


def test_decode_weights_apply_after_first_token():
    # a: prefill weight 3 then decode weight 1; b: weight 1 throughout. Power 1 W, both on [0, 4].
    spans = [Span("a", 0.0, 4.0, t_first_token=2.0, prefill_weight=3.0, decode_weight=1.0),
             Span("b", 0.0, 4.0, prefill_weight=1.0)]
    res = attribute([0.0, 4.0], {"cpu": [0.0, 4.0]}, spans, weighting="tokens")
    assert res.direct["a"]["cpu"] == pytest.approx(2 * 0.75 + 2 * 0.5)
    assert res.prefill["a"]["cpu"] == pytest.approx(1.5)


def test_zero_weights_fall_back_to_equal_shares():
    spans = [Span("a", 0.0, 2.0, prefill_weight=0.0), Span("b", 0.0, 2.0, prefill_weight=0.0)]
    res = attribute([0.0, 2.0], {"cpu": [0.0, 2.0]}, spans, weighting="tokens")
    assert res.direct["a"]["cpu"] == pytest.approx(1.0) == res.direct["b"]["cpu"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.05, 3, **finite), st.floats(0, 300, **finite)), min_size=1, max_size=8),
       st.floats(0, 5, **finite), st.floats(0, 5, **finite))
def test_single_call_matches_a_replayed_trace_exactly(segments, a, length):
    # Sampling at every power change makes linear interpolation exact for piecewise-constant power.
    t, segs = 0.0, []
    for dur, w in segments:
        segs.append((t, w))
        t += dur
    trace = PowerTrace(segs)
    times = [s[0] for s in segs] + [t + 10.0]
    cum = [trace.energy_at(x) for x in times]
    span = Span("c", a, a + length)
    res = attribute(times, {"cpu": cum}, [span])
    assert math.isclose(res.direct["c"]["cpu"], trace.energy_between(a, a + length), rel_tol=1e-9, abs_tol=1e-9)


def test_token_rate_weights():
    assert token_rate_weights(100, 50, 0.0, 2.0, t_first_token=1.0) == (100.0, 50.0)
    assert token_rate_weights(100, 50, 0.0, 2.0, t_first_token=1.0, cached_tokens=60) == (40.0, 50.0)
    assert token_rate_weights(None, None, 0.0, 2.0) == (0.0, None)
    assert token_rate_weights(10, 10, 0.0, 2.0) == (10.0, None)


def test_bad_input_is_refused():
    with pytest.raises(ConfigError):
        Span("x", 2.0, 1.0)
    with pytest.raises(ConfigError):
        Span("x", 0.0, 1.0, prefill_weight=-1.0)
    with pytest.raises(ConfigError):
        attribute([0.0, 1.0], {"cpu": [0.0]}, [])
    with pytest.raises(ConfigError):
        attribute([1.0, 0.0], {"cpu": [0.0, 1.0]}, [])
    with pytest.raises(ConfigError):
        attribute([1.0, 1.0], {"cpu": [0.0, 1.0]}, [])
    with pytest.raises(ConfigError):
        attribute([0.0, 1.0], {"cpu": [0.0, 1.0]}, [], window=(1.0, 0.0))
    with pytest.raises(ConfigError):
        attribute([0.0, 1.0], {"cpu": [0.0, 1.0]}, [], weighting="tokenz")  # type: ignore[arg-type]


def test_active_energy():
    assert active_energy(100.0, 10.0, 4.0) == 60.0
    with pytest.raises(ConfigError):
        active_energy(1.0, -1.0, 1.0)


def _interp(ts, ys, t):
    if t <= ts[0]:
        return ys[0]
    if t >= ts[-1]:
        return ys[-1]
    for i in range(1, len(ts)):
        if ts[i] >= t:
            if ts[i] == ts[i - 1]:
                return ys[i]
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (t - ts[i - 1]) / (ts[i] - ts[i - 1])
    return ys[-1]


@st.composite
def disjoint_calls(draw):
    """Calls that never overlap (they may touch), each with or without a first token, in any order."""
    cuts = sorted(x + 0.0 for x in draw(st.lists(st.floats(-10, 110, **finite), min_size=0, max_size=16)))
    spans = []
    for i, (a, b) in enumerate(zip(cuts[::2], cuts[1::2])):
        first = draw(st.one_of(st.none(), st.floats(-0.5, 1.5)))
        spans.append(Span(i, a, b, t_first_token=None if first is None else a + first * (b - a)))
    return draw(st.permutations(spans))


@settings(max_examples=200, deadline=None)
@given(timelines(), disjoint_calls(), st.one_of(st.none(), st.tuples(st.floats(-20, 120, **finite),
                                                                     st.floats(0, 60, **finite))))
def test_calls_that_never_overlap_split_as_the_general_rule_does(tl, calls, window):
    # Calls that never overlap take a closed form; a chain around them sends them through the general rule (the
    # sweep), where chains never change a call's share and the chain receives exactly what was outside.
    times, series = tl
    window = None if window is None else (window[0], window[0] + window[1])
    if window is None and not calls:
        window = (times[0], times[-1])
    lo, hi = window if window is not None else (min(s.t_start for s in calls), max(s.t_end for s in calls))
    alone = attribute(times, series, calls, window=(lo, hi))
    chain = Span("chain", lo - 1.0, hi + 1.0, is_call=False)
    general = attribute(times, series, [*calls, chain], window=(lo, hi))
    scale = max(abs(v) for vs in series.values() for v in vs)
    for s in calls:
        for part in ("direct", "prefill", "decode"):
            got, want = getattr(alone, part).get(s.run_id, {}), getattr(general, part).get(s.run_id, {})
            assert got.keys() == want.keys() and all(close(got[k], want[k], scale) for k in want)
        assert close(alone.share_s[s.run_id], general.share_s[s.run_id], hi - lo)
    assert all(close(alone.outside[k], general.direct["chain"][k], scale) for k in series)
    assert close(alone.outside_s, general.share_s["chain"], hi - lo)
    assert all(close(alone.total[k], general.total[k], scale) for k in series)
