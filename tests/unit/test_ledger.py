"""The ledger folds the timeline in pieces; the pure `attribute` over the whole history is the reference."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from langchain_energy.attribution import Span, attribute, token_rate_weights
from langchain_energy.ledger import Ledger, RunRecord


def call(rid, t, parent=None, kind="llm"):
    return RunRecord(run_id=rid, parent_run_id=parent, root_run_id=parent or rid, name=rid, kind=kind,
                     tags=[], metadata={}, t_start=t)


@st.composite
def histories(draw):
    """A random interleaving of samples (random power) and run starts/ends on an increasing clock."""
    n_runs = draw(st.integers(1, 6))
    events = []
    t, cum = 0.0, 0.0
    open_runs: list[str] = []
    started = 0
    for _ in range(draw(st.integers(4, 40))):
        t += draw(st.floats(0.01, 2.0))
        choice = draw(st.sampled_from(["sample", "sample", "start", "end"]))
        if choice == "start" and started < n_runs:
            rid = f"r{started}"
            parent = draw(st.sampled_from([None, *open_runs])) if open_runs else None
            kind = draw(st.sampled_from(["llm", "chain"]))
            tokens = (draw(st.integers(0, 50)), draw(st.integers(0, 50)))
            events.append(("start", t, rid, parent, kind, tokens))
            open_runs.append(rid)
            started += 1
        elif choice == "end" and open_runs:
            rid = draw(st.sampled_from(open_runs))
            open_runs.remove(rid)
            events.append(("end", t, rid))
        else:
            cum += draw(st.floats(0.0, 300.0)) * 0.5
            events.append(("sample", t, cum))
    t += 0.5
    for rid in open_runs:
        t += 0.1
        events.append(("end", t, rid))
    events.append(("sample", t + 0.1, cum + 7.0))
    return events


def replay(events, weighting, fold_at_samples=False):
    ledger = Ledger(("gpu:0",))
    ledger.use(weighting)
    recs = {}
    times, cum = [], []
    for ev in events:
        if ev[0] == "sample":
            ledger.add_sample(ev[1], {"gpu:0": ev[2]})
            times.append(ev[1])
            cum.append(ev[2])
            if fold_at_samples:  # fold in as many pieces as can be (it otherwise happens in batches)
                ledger.fold()
        elif ev[0] == "start":
            _, t, rid, parent, kind, tokens = ev
            rec = call(rid, t, parent, kind)
            rec.prompt_tokens, rec.completion_tokens = tokens
            recs[rid] = ledger.open(rec)
        else:
            rec = recs[ev[2]]
            if rec.is_call:  # a call's first token comes a third of the way in (splits prefill from decode)
                rec.t_first_token = rec.t_start + (ev[1] - rec.t_start) / 3
            ledger.close_run(ev[2], ev[1])
    return ledger, recs, times, cum


@settings(max_examples=200, deadline=None)
@given(histories(), st.sampled_from(["equal", "tokens"]), st.booleans(), st.booleans())
# A chain (r2) whose parent call (r1) ended and was folded away still yields to its grandparent (r0).
@example([("start", 1.0, "r0", None, "chain", (0, 0)), ("sample", 2.0, 0.0), ("start", 4.0, "r1", "r0", "llm", (0, 0)),
          ("sample", 5.0, 0.0), ("start", 10.0, "r2", "r1", "chain", (0, 0)), ("sample", 11.0, 0.0),
          ("end", 13.0, "r1"), ("sample", 14.0, 0.0), ("end", 14.6, "r0"), ("end", 14.7, "r2"), ("sample", 14.8, 7.0)],
         "equal", True, False)
def test_folding_in_pieces_equals_attributing_the_whole_history(events, weighting, in_pieces, folded_at_end):
    ledger, recs, times, cum = replay(events, weighting, fold_at_samples=in_pieces)
    if folded_at_end:
        ledger.fold()
    view = ledger.view(weighting, t=times[-1])
    spans = []
    for r in recs.values():
        pw, dw = (token_rate_weights(r.prompt_tokens, r.completion_tokens, r.t_start, r.t_end, r.t_first_token)
                  if weighting == "tokens" and r.is_call else (1.0, None))
        spans.append(Span(r.run_id, r.t_start, r.t_end, r.is_call, r.parent_run_id, r.t_first_token, pw, dw))
    pure = attribute(times, {"gpu:0": cum}, spans, window=(times[0], times[-1]), weighting=weighting)
    for rid in recs:
        assert view.received[rid].energy["gpu:0"] == pytest.approx(pure.direct[rid]["gpu:0"], rel=1e-9, abs=1e-6)
        assert view.received[rid].share_s == pytest.approx(pure.share_s[rid], rel=1e-9, abs=1e-9)
        if rid in pure.prefill:
            got = (view.received[rid].prefill or {"gpu:0": 0.0})["gpu:0"]  # (None: it ran before the first sample)
            assert got == pytest.approx(pure.prefill[rid]["gpu:0"], rel=1e-9, abs=1e-6)
    # conservation over the ledger's life: every joule went to a run or outside
    got = math.fsum(v.energy["gpu:0"] for v in view.received.values()) + view.outside["gpu:0"]
    assert got == pytest.approx(cum[-1] - cum[0], rel=1e-9, abs=1e-6)
    # everything has ended: once folded, nothing is held but the fold point
    ledger.fold()
    assert ledger.samples_held == 1
    assert ledger.view(weighting, t=times[-1]).received.keys() == recs.keys()


def test_memory_is_bounded_by_what_is_open_not_by_elapsed_time():
    ledger = Ledger(("gpu:0",))
    t = 0.0
    for i in range(5000):
        ledger.add_sample(t, {"gpu:0": 300.0 * t})
        if i % 50 == 0:
            ledger.open(call(f"c{i}", t))
        if i % 50 == 25:
            ledger.close_run(f"c{i - 25}", t)
        t += 0.1
    assert ledger.samples_held < 100


def test_many_open_chains_do_not_make_every_change_a_fold(monkeypatch):
    # 300 workflows' chains stay open all run long while their calls come and go: the ledger must not try a
    # fold at every change (a fold walks every live run), only once enough became foldable.
    ledger = Ledger(("gpu:0",))
    folds = []
    real_fold = ledger._fold
    monkeypatch.setattr(ledger, "_fold", lambda: (folds.append(1), real_fold()))
    t = 0.0
    for w in range(300):
        ledger.open(call(f"w{w}", t, kind="chain"))
    for i in range(2000):
        t += 0.01
        ledger.add_sample(t, {"gpu:0": 300.0 * t})
        rid = f"c{i}"
        ledger.open(call(rid, t, parent=f"w{i % 300}"))
        ledger.close_run(rid, t + 0.005)
    assert len(folds) < 2000 / 16
    assert ledger.samples_held < 200


@settings(max_examples=400, deadline=None)
@given(histories(), st.sampled_from(["equal", "tokens"]), st.floats(0.0, 1.0))
@example([("start", 1.0, "r0", None, "llm", (0, 1)), ("start", 2.0, "r1", None, "llm", (0, 1)),
          ("sample", 3.0, 0.0), ("sample", 4.0, 0.0), ("sample", 5.0, 0.0), ("end", 6.0, "r0"),
          ("sample", 7.0, 0.5), ("sample", 8.0, 0.5), ("sample", 9.0, 0.5), ("sample", 10.0, 0.5),
          ("sample", 11.0, 0.5), ("sample", 12.0, 0.5), ("end", 12.6, "r1"), ("sample", 12.7, 7.5)], "tokens", 0.5)
@example([("start", 1.0, "r0", None, "chain", (0, 0)), ("sample", 2.0, 0.0), ("start", 3.0, "r1", "r0", "llm", (0, 0)),
          ("start", 4.0, "r2", "r1", "chain", (0, 0)), ("end", 5.0, "r1"),
          *[("sample", float(t), 0.0) for t in range(6, 14)], ("start", 14.0, "r3", None, "chain", (0, 0)),
          ("end", 15.0, "r0"), ("sample", 16.0, 0.5), ("sample", 17.0, 0.5), ("end", 18.0, "r2"),
          ("end", 19.0, "r3"), ("sample", 20.0, 0.5), ("sample", 21.0, 0.5), ("sample", 22.0, 0.5)], "equal", 1.0)
def test_one_runs_view_is_its_share_in_the_whole_view(events, weighting, cut):
    # A view for a few runs splits only the time they cover; it must give them what the whole view does.
    ledger, recs, _, _ = replay(events[:max(1, int(len(events) * cut))], weighting)
    whole = ledger.view(weighting)
    for rid in recs:
        one = ledger.view(weighting, runs=[rid])
        assert one.received[rid].energy["gpu:0"] == pytest.approx(whole.received[rid].energy["gpu:0"], rel=1e-9,
                                                                   abs=1e-6)
        assert one.received[rid].share_s == pytest.approx(whole.received[rid].share_s, rel=1e-9, abs=1e-9)
        assert (rid in one.final) == (rid in whole.final)
        assert (one.received[rid].prefill is None) == (whole.received[rid].prefill is None)
        if one.received[rid].prefill is not None:
            assert one.received[rid].prefill["gpu:0"] == pytest.approx(whole.received[rid].prefill["gpu:0"],
                                                                       rel=1e-9, abs=1e-6)
        assert one.cumulative.get(rid) == whole.cumulative.get(rid)
        split = ledger.call_split(weighting, rid) if recs[rid].is_call else None  # (a call's, at its end)
        if split is not None:
            received, final = split
            assert received.energy["gpu:0"] == pytest.approx(whole.received[rid].energy["gpu:0"], rel=1e-9, abs=1e-6)
            assert received.share_s == pytest.approx(whole.received[rid].share_s, rel=1e-9, abs=1e-9)
            assert final == (rid in whole.final)
            assert (received.prefill is None) == (whole.received[rid].prefill is None)
            if received.prefill is not None:
                assert received.prefill["gpu:0"] == pytest.approx(whole.received[rid].prefill["gpu:0"], rel=1e-9,
                                                                  abs=1e-6)


def test_a_call_recorded_late_still_shares_the_time_of_an_ended_call_it_overlapped():
    # "b" is recorded from its end (its start event never came) after "a" ended: it ran from t=2, beside "a".
    ledger = Ledger(("gpu:0",))
    for t in range(0, 7):
        ledger.add_sample(float(t), {"gpu:0": 100.0 * t})
        if t == 1:
            ledger.open(call("a", 1.0))
        if t == 3:
            ledger.close_run("a", 3.0)
        if t == 4:
            ledger.open(call("b", 2.0))
        if t == 5:
            ledger.close_run("b", 5.0)
    assert ledger.view("equal", runs=["a"]).received["a"].energy["gpu:0"] == pytest.approx(100.0 + 50.0)
    assert ledger.view("equal", runs=["b"]).received["b"].energy["gpu:0"] == pytest.approx(50.0 + 200.0)
    assert [ledger.call_split("equal", rid)[0].energy["gpu:0"] for rid in "ab"] == [pytest.approx(150.0),
                                                                                   pytest.approx(250.0)]


def test_a_view_for_one_ended_call_splits_only_the_time_it_ran(monkeypatch):
    import langchain_energy.ledger as ledger_module

    ledger = Ledger(("gpu:0",))
    ledger.add_sample(0.0, {"gpu:0": 0.0})
    ledger.open(call("long", 0.0, kind="chain"))
    for i in range(1, 100):
        t = i * 0.1
        if i == 40:
            ledger.open(call("open", t))  # holds back the fold: "c" stays live
        if i == 50:
            ledger.open(call("c", t))
        ledger.add_sample(t, {"gpu:0": 30.0 * i})
        if i == 60:
            ledger.close_run("c", t)
    windows = []
    real = ledger_module.attribute
    monkeypatch.setattr(ledger_module, "attribute", lambda *a, **k: (windows.append(k["window"]), real(*a, **k))[1])
    ledger.view("equal", runs=["c"])
    assert windows == [pytest.approx((5.0, 6.0))]


def test_a_held_component_gives_no_run_what_it_spends_while_held():
    # gpu:1 serves no engine between t=1 and t=2 (held), then does; then one reading lacks it (it holds its value).
    ledger = Ledger(("gpu:0", "gpu:1"))
    ledger.add_sample(0.0, {"gpu:0": 0.0, "gpu:1": 0.0})
    ledger.open(call("c", 0.0))
    ledger.add_sample(1.0, {"gpu:0": 10.0, "gpu:1": 5.0})
    ledger.add_sample(2.0, {"gpu:0": 20.0, "gpu:1": 9.0}, held=frozenset({"gpu:1"}))
    ledger.add_sample(3.0, {"gpu:0": 30.0, "gpu:1": 12.0})
    ledger.add_sample(4.0, {"gpu:0": 40.0})
    ledger.close_run("c", 4.0)
    ledger.add_sample(5.0, {"gpu:0": 50.0, "gpu:1": 20.0})
    received = ledger.view("equal").received["c"].energy
    assert received == pytest.approx({"gpu:0": 40.0, "gpu:1": 5.0 + 3.0})
    ledger.fold()
    assert ledger.view("equal").received["c"].energy == pytest.approx(received)
