"""The results store: identity, atomic append, tidy loading, and 95% CI arithmetic."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from chains.harness.record import TrialRecord
from chains.harness.stats import aggregate, mean_ci, t_quantile
from chains.harness.store import ResultStore, SweepMismatchError, SweepSpec, trial_key
from chains.harness.tables import timeline_frame, trial_metrics
from langchain_energy.errors import ConfigError, DataError
from langchain_energy.timeline import Samples


def _spec(**kw):
    base = dict(workloads=["search"], knobs={"batch-size": [1, 2]}, repeats=3)
    base.update(kw)
    return SweepSpec(**base)


def _rec(value, repeat, latency, energy, tokens=10, status="ok", reason=""):
    summary = [] if status != "ok" else [
        {"workflow": "search", "latency_s": latency, "energy_j": energy, "energy_cpu_j": energy,
         "energy_gpu_j": 0.0, "energy_dram_j": None, "completion_tokens": tokens, "prompt_tokens": 100,
         "cached_tokens": 40, "throughput_tok_s": 5.0, "provenance": "cpu=estimated:cpu-util"},
    ]
    return TrialRecord(key=trial_key("search", {"batch-size": value}, repeat), workload="search",
                       knob="batch-size", repeat=repeat, status=status, reason=reason,
                       knobs={"batch-size": value, "backend": "vllm"}, swept=["batch-size"],
                       summary=summary, meta={"wall_s": latency})


def test_ci_matches_hand_computation():
    # values 10, 12, 14: mean 12, sample sd 2, t(0.975, 2) = 4.302653 -> half width 4.302653 * 2 / sqrt(3)
    mean, half, n = mean_ci([10, 12, 14])
    assert (mean, n) == (12, 3)
    assert half == pytest.approx(4.302653 * 2 / math.sqrt(3), rel=1e-5)
    assert t_quantile(9) == pytest.approx(2.262157, rel=1e-5)
    assert math.isnan(mean_ci([5.0])[1])
    assert mean_ci([float("nan")]) [2] == 0


def test_t_table_fallback_close_to_scipy(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *a, **k):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(60) == pytest.approx(2.000, abs=0.01)


def test_store_roundtrip_and_aggregate(tmp_path):
    store = ResultStore(tmp_path / "r")
    store.init(_spec())
    for rep, (lat, en) in enumerate([(1.0, 10.0), (2.0, 20.0), (3.0, 30.0)]):
        store.append(_rec(1, rep, lat, en))
    for rep in range(3):
        store.append(_rec(2, rep, 0, 0, status="infeasible", reason="KV cache too small"))
    df = store.load()
    assert len(df) == 6 and set(df["status"]) == {"ok", "infeasible"}
    agg = store.aggregate().set_index("value")
    assert agg.loc[1, "n"] == 3
    assert agg.loc[1, "latency_s_mean"] == pytest.approx(2.0)
    assert agg.loc[1, "latency_s_ci"] == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    # energy per token = J / generated tokens; throughput = tokens / wall time
    assert agg.loc[1, "energy_per_token_j_mean"] == pytest.approx(2.0)
    assert agg.loc[1, "throughput_tok_s_mean"] == pytest.approx((10 + 5 + 10 / 3) / 3)
    assert agg.loc[1, "cache_hit_rate_mean"] == pytest.approx(0.4)
    assert agg.loc[2, "status"] == "infeasible" and agg.loc[2, "reason"] == "KV cache too small"
    assert agg.loc[2, "n"] == 0 and math.isnan(agg.loc[2, "latency_s_mean"])


def test_rerun_same_sweep_ok_different_sweep_refused(tmp_path):
    store = ResultStore(tmp_path)
    store.init(_spec())
    store.append(_rec(1, 0, 1.0, 1.0))
    store.init(_spec())  # same sweep: resume
    before = (tmp_path / "sweep.json").read_text()
    with pytest.raises(SweepMismatchError, match="repeats"):
        store.init(_spec(repeats=2))  # fewer repeats would orphan finished trials
    with pytest.raises(SweepMismatchError, match="knobs"):
        store.init(_spec(knobs={"batch-size": [2, 4]}))  # batch size 1 dropped
    with pytest.raises(SweepMismatchError, match="workloads"):
        store.init(_spec(workloads=["search", "summarize"]))
    with pytest.raises(SweepMismatchError, match="across"):
        store.init(_spec(across={"backend": ["vllm"]}))  # would rename every trial
    assert (tmp_path / "sweep.json").read_text() == before
    assert store.done_keys() == {"search__batch-size=1__r000"}


def test_a_sweep_grows_with_more_values_knobs_and_repeats(tmp_path):
    store = ResultStore(tmp_path)
    store.init(_spec(across={"backend": ["vllm"]}))
    store.append(_rec(1, 0, 1.0, 1.0))
    grown = _spec(knobs={"batch-size": [1, 2, 4], "output-len": [8]}, repeats=5, across={"backend": ["vllm", "x"]})
    store.init(grown)
    assert store.spec() == grown
    assert store.done_keys() == {"search__batch-size=1__r000"}
    store.init(grown)  # resuming the grown sweep is a no-op
    with pytest.raises(SweepMismatchError):
        store.init(_spec(across={"backend": ["vllm"]}))  # the stored sweep is now the grown one


def test_append_only_and_temp_files_ignored(tmp_path):
    store = ResultStore(tmp_path)
    store.init(_spec())
    store.append(_rec(1, 0, 1.0, 1.0))
    with pytest.raises(DataError, match="append-only"):
        store.append(_rec(1, 0, 9.0, 9.0))
    # a write killed between mkstemp and rename leaves a dot-file that is not a trial
    (tmp_path / "trials" / ".search__x.json.123.tmp").write_text("{partial")
    assert len(store.records()) == 1 and store.records()[0].summary[0]["latency_s"] == 1.0


def test_bad_specs_and_dirs(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        _spec(knobs={"batch-size": []})
    with pytest.raises(ConfigError, match="repeats"):
        _spec(repeats=0)
    with pytest.raises(DataError, match="no sweep.json"):
        ResultStore(tmp_path / "none").spec()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        ResultStore(f).init(_spec())


def test_nan_and_numpy_values_are_stored_as_json(tmp_path):
    import numpy as np

    store = ResultStore(tmp_path)
    store.init(_spec())
    rec = _rec(1, 0, 1.0, 1.0)
    rec.summary[0]["energy_gpu_j"] = float("nan")
    rec.summary[0]["latency_s"] = np.float64(1.5)
    path = store.append(rec)
    data = json.loads(path.read_text())
    assert data["summary"][0]["energy_gpu_j"] is None and data["summary"][0]["latency_s"] == 1.5


def test_aggregate_keeps_crossed_knob_apart():
    recs = []
    for backend, lat in (("vllm", 1.0), ("parrot", 3.0)):
        for rep in range(2):
            r = _rec(1, rep, lat + rep, 1.0)
            r.knobs["backend"] = backend
            r.swept.append("backend")
            recs.append(r)
    agg = aggregate(trial_metrics(recs), extra_keys=["backend"]).set_index("backend")
    assert agg.loc["vllm", "latency_s_mean"] == pytest.approx(1.5)
    assert agg.loc["parrot", "latency_s_mean"] == pytest.approx(3.5)
    assert isinstance(agg, pd.DataFrame) and len(agg) == 2


def _knob_rec(workload, knob, value, **across):
    rec = _rec(1, 0, 1.0, 1.0)
    rec.workload, rec.knob = workload, knob
    rec.knobs, rec.swept = {knob: value, **across}, [knob, *across]
    rec.key = trial_key(workload, rec.assign, 0)
    return rec


def test_aggregate_orders_numeric_values_numerically(tmp_path):
    # trial files come back in name order (batch-size=16 before batch-size=2); the table must not
    store = ResultStore(tmp_path)
    store.init(_spec(knobs={"batch-size": [1, 2, 4, 8, 16]}, repeats=1))
    for v in (1, 2, 4, 8, 16):
        store.append(_knob_rec("search", "batch-size", v))
    agg = store.aggregate()
    assert list(agg["value"]) == [1, 2, 4, 8, 16]
    assert all(isinstance(v, (int, float)) for v in agg["value"])


def test_aggregate_orders_by_workload_knob_value_then_across():
    recs = [_knob_rec(w, knob, v, users=cap)
            for w in ("summarize", "search")
            for knob, values in (("output-len", [100, 20, 3]), ("backend", ["vllm", "parrot"]),
                                 ("power-cap", [250.5, 150]))
            for v in values for cap in (300, 50)]
    agg = aggregate(trial_metrics(recs), extra_keys=["users"])
    got = list(zip(agg["workload"], agg["knob"], agg["value"], agg["users"]))
    want = [(w, knob, v, cap)
            for w in ("search", "summarize")
            for knob, values in (("backend", ["parrot", "vllm"]), ("output-len", [3, 20, 100]),
                                 ("power-cap", [150, 250.5]))
            for v in values for cap in (50, 300)]
    assert got == want


def test_values_keep_their_knob_type_in_every_table(tmp_path):
    store = ResultStore(tmp_path)
    store.init(_spec(knobs={"batch-size": [16, 2], "power-cap": [172.5], "prefix-caching": [True],
                            "backend": ["vllm"]}, repeats=1))
    for knob, value in (("backend", "vllm"), ("batch-size", 16), ("batch-size", 2), ("power-cap", 172.5),
                        ("prefix-caching", True)):
        rec = _knob_rec("search", knob, value)
        rec.runs = [{"kind": "llm", "t_start": 0.0, "t_end": 1.0}]
        store.append(rec)
    values = list(store.load_trials()["value"])
    assert values == ["vllm", 16, 2, 172.5, True]
    assert isinstance(values[1], int) and values[4] is True
    # every table gives the same values, so rows of one configuration can be matched across tables
    assert list(store.load()["value"]) == values and list(store.load_runs()["value"]) == values


def test_engine_cache_hit_rate_comes_from_the_engine_counters_when_recorded(tmp_path):
    store = ResultStore(tmp_path)
    store.init(_spec())
    with_counters = _rec(1, 0, 1.0, 1.0)
    with_counters.meta["engine_metrics"] = {"prefix_cache_queries": 200.0, "prefix_cache_hits": 150.0,
                                            "prefix_cache_hit_rate": 0.75}
    store.append(with_counters)
    store.append(_rec(1, 1, 1.0, 1.0))  # a trial from before the counters were recorded
    trials = store.load_trials().sort_values("repeat")
    assert list(trials["engine_cache_hit_rate"].iloc[:1]) == [0.75] and math.isnan(trials["engine_cache_hit_rate"].iloc[1])
    assert list(trials["cache_hit_rate"]) == [0.4, 0.4]  # the calls' own usage is reported separately
    agg = store.aggregate()
    assert agg.loc[0, "engine_cache_hit_rate_mean"] == pytest.approx(0.75)


def test_timeline_frame_emits_cpu_util_per_interval_and_nan_when_not_recorded():
    t = [0.0, 1.0, 2.0, 3.0, 4.0]
    energy = {"cpu": [0.0, 10.0, 30.0, 60.0, 100.0]}
    snap = Samples(t=t, energy_j=energy, gpu_util={}, cpu_util=[math.nan, 20.0, 40.0, 60.0, 80.0])
    tf = timeline_frame(snap, 1.0, 3.0, "cpu=estimated:linear-tdp")
    # rows are the intervals (1, 2] and (2, 3]: each carries the utilization measured over it
    assert tf["t"].tolist() == [1.0, 2.0]
    assert tf["cpu_util"].tolist() == [40.0, 60.0]
    assert tf["power_w"].tolist() == [20.0, 30.0]
    old = timeline_frame(Samples(t=t, energy_j=energy, gpu_util={}), 0.0, 4.0)
    assert "cpu_util" in old and old["cpu_util"].isna().all()
