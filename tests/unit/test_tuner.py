"""The tuner searched on recorded H100 trials (no engine): optimum, SLO, resume, and bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chains.harness import cli
from chains.harness.tuner import RecordedObjective, compare, pareto_mask, parse_slo, tune
from langchain_energy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2] / "docs" / "results" / "gpu-h100"
SEARCH = [str(ROOT / "search-batch"), str(ROOT / "search-graphs")]


def _oracle(out, **kw):
    return RecordedObjective(SEARCH, "search", out, progress=False, **kw)


def test_finds_the_grid_optimum(tmp_path):
    obj = _oracle(tmp_path / "t")
    grid = obj.grid()
    best = min(e.metric("energy_j") for e in grid if e.ok)
    result = tune(obj, tmp_path / "t", "energy", trials=len(grid), seed=1)
    assert result.measured == len(grid)
    assert result.winner.metric("energy_j") == pytest.approx(best)
    assert result.default.config == {"batch-size": 8, "enforce-eager": True}
    assert result.saving["ratio"] > 1
    assert result.command[:4] == ["python", "-m", "chains.run", "sweep"]
    agg = obj.store.aggregate()  # the tune's trials are a sweep store with 95% CIs per configuration
    assert len(agg) == len(grid) and agg["energy_j_ci"].notna().all()


def test_honours_the_slo(tmp_path):
    obj = _oracle(tmp_path / "t")
    slo = parse_slo("p90_latency_s<=20")
    feasible = [e for e in obj.grid() if e.ok and slo.met(e.metric("p90_latency_s"))]
    result = tune(obj, tmp_path / "t", "energy-per-token", slo, trials=10, seed=0)
    assert result.winner.metric("p90_latency_s") <= 20
    assert result.winner.metric("energy_per_token_j") == pytest.approx(
        min(e.metric("energy_per_token_j") for e in feasible))
    assert not result.table.loc[result.table["p90_latency_s"] > 20, "slo_met"].any()


def test_unmeetable_slo_recommends_nothing(tmp_path):
    result = tune(_oracle(tmp_path / "t"), tmp_path / "t", "energy", parse_slo("p90_latency_s<=1"), trials=3)
    assert result.winner is None and result.command == []


def test_resumes_without_repeating_finished_trials(tmp_path):
    out = tmp_path / "t"
    obj = _oracle(out)
    runs: list[str] = []
    replay = obj.runner.run

    def counted(config, repeat):
        runs.append(config.key(repeat))
        if len(runs) == 5:  # killed in the middle of the third configuration
            raise KeyboardInterrupt
        return replay(config, repeat)

    obj.runner.run = counted
    with pytest.raises(KeyboardInterrupt):
        tune(obj, out, "energy", trials=6, seed=3)
    first = list(runs)
    obj2 = _oracle(out)
    replay = obj2.runner.run
    obj2.runner.run = counted
    result = tune(obj2, out, "energy", trials=6, seed=3)
    later = runs[len(first):]
    assert not set(first[:-1]) & set(later), "a finished trial ran again"
    assert result.measured == 6
    assert len(list((out / "trials").glob("*.json"))) == 6 * obj.repeats


def test_other_tune_in_directory_is_refused(tmp_path):
    tune(_oracle(tmp_path / "t"), tmp_path / "t", "energy", trials=2)
    with pytest.raises(ConfigError, match="another tune"):
        tune(_oracle(tmp_path / "t"), tmp_path / "t", "energy-per-token", trials=2)


def test_helpers():
    assert pareto_mask([1, 2, 3, float("nan")], [3, 1, 2, 0]) == [True, True, False, False]
    c = compare([10.0, 10.4, 9.6], [5.0, 5.2, 4.8])
    assert c["ratio"] == pytest.approx(2.0) and c["ratio_lo"] < 2 < c["ratio_hi"] and c["separated"]
    assert parse_slo("p95_call_latency_s < 3").op == "<"


def test_cli_writes_front_figure_and_recommendation(tmp_path, capsys):
    out = tmp_path / "t"
    args = ["tune", "--workload", "search", "--oracle", SEARCH[0], "--oracle", SEARCH[1], "--slo",
            "p90_latency_s<=20", "--trials", "4", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "Pareto front" in text and "reproduce: python -m chains.run sweep" in text
    for name in ("configs.csv", "pareto.csv", "pareto.png", "recommendation.json", "tune.db", "sweep.json"):
        assert (out / name).exists()
    assert json.loads((out / "recommendation.json").read_text())["slo"] == "p90_latency_s<=20"


@pytest.mark.parametrize("extra, match", [
    (["--slo", "p90 latency under 20"], "does not parse"),
    (["--slo", "p90_latncy_s<=20"], "unknown metric"),
    (["--knob", "batch-size="], "empty value list"),
    (["--workload", "{tmp}/app.py:graph", "--inputs", "{tmp}/missing.jsonl"], "missing.jsonl"),
    (["--trials", "0"], "--trials"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, match):
    (tmp_path / "app.py").write_text("graph = None\n")
    extra = [e.format(tmp=tmp_path) for e in extra]
    workload = [] if "--workload" in extra else ["--workload", "search"]
    code = cli.main(["tune", *workload, "--oracle", SEARCH[0], "--out", str(tmp_path / "t"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and match in err
    assert not (tmp_path / "t" / "trials").exists()
