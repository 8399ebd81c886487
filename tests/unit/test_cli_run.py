"""`python -m chains.run`: help text, dispatch, and bad input refused before any engine starts."""

from __future__ import annotations

import pytest

from chains import run
from langchain_energy.backends import vllm_server


@pytest.fixture
def no_engine(monkeypatch):
    """Fails the test if anything tries to start an engine."""
    started = []
    monkeypatch.setattr(vllm_server.VLLMServer, "start", lambda self: started.append(self) or self)
    yield started
    assert not started, "an engine was started for bad input"


def test_help_explains_each_knob_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        run.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--backend", "--model", "--base-url", "--input-len", "--output-len", "--batch-size", "--users",
                 "--power-cap", "--apply-power-cap", "--repeats", "--docs", "--dataset", "--out", "--seed",
                 "--preset"):
        assert flag in text
    parser = run.build_parser()
    assert all(a.help for a in parser._actions if a.option_strings and a.dest != "help")


def test_unknown_workload_exits_non_zero(capsys, no_engine):
    with pytest.raises(SystemExit) as exc:
        run.main(["translate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _bad(args, capsys, match):
    code = run.main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and match in err
    return err


def test_missing_path(tmp_path, capsys, no_engine):
    _bad(["summarize", "--docs", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys, "does not exist")


def test_empty_document(tmp_path, capsys, no_engine):
    (tmp_path / "e.txt").write_text("")
    _bad(["summarize", "--docs", str(tmp_path / "e.txt"), "--out", str(tmp_path / "o")], capsys, "empty")


def test_binary_document(tmp_path, capsys, no_engine):
    (tmp_path / "b.md").write_bytes(b"\x89PNG\x00\x00binary")
    _bad(["summarize", "--docs", str(tmp_path / "b.md"), "--out", str(tmp_path / "o")], capsys, "binary")


def test_chunk_longer_than_the_context(tmp_path, capsys, no_engine):
    _bad(["summarize", "--input-len", "9000", "--out", str(tmp_path / "o")], capsys, "does not fit")


def test_dataset_that_cannot_load_offline(tmp_path, capsys, no_engine, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _bad(["summarize", "--dataset", "no-such-org/no-such-set", "--out", str(tmp_path / "o")], capsys,
         "cannot load dataset")


@pytest.mark.parametrize("args, match", [
    (["search", "--users", "0"], "users must be a positive integer"),
    (["search", "--repeats", "0"], "--repeats"),
    (["search", "--backend", "openai"], "needs --base-url"),
    (["agentic", "--rounds", "-1"], "rounds"),
    (["search", "--model", "no-such-model"], "unknown model"),
])
def test_bad_knobs(args, match, tmp_path, capsys, no_engine):
    _bad([*args, "--out", str(tmp_path / "o")], capsys, match)


def test_sweep_and_plot_dispatch_to_their_commands(capsys):
    for cmd in ("sweep", "plot"):
        with pytest.raises(SystemExit) as exc:
            run.main([cmd, "--help"])
        assert exc.value.code == 0
        assert f"chains.run {cmd}" in capsys.readouterr().out


def test_summary_table_formatting():
    import pandas as pd

    s = pd.DataFrame([{"workflow": "search", "repeat": 0, "llm_calls": 3, "latency_s": 1.5, "throughput_tok_s": 40.0,
                       "energy_j": 12.0, "energy_cpu_j": 12.0, "energy_gpu_j": float("nan"), "energy_dram_j": 0.5,
                       "energy_per_token_j": 0.1, "cache_hit_rate": 0.8,
                       "provenance": "cpu=estimated:x; gpu=unavailable; dram=estimated:y"}])
    text = run.format_summary(s)
    assert "search" in text and "cache_hit" in text and "J/token" in text
    assert "provenance: cpu=estimated:x; gpu=unavailable" in text
