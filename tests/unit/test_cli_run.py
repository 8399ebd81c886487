"""`python -m chains.run`: help text, dispatch, and bad input refused before any engine starts."""

from __future__ import annotations

import pytest

from chains.harness import cli as run
from chains.harness import session
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
    text = session.format_summary(s)
    assert "search" in text and "cache_hit" in text and "J/token" in text
    assert "provenance: cpu=estimated:x; gpu=unavailable" in text


def test_a_power_cap_without_a_gpu_is_refused_in_one_line(tmp_path, capsys, no_engine, monkeypatch):
    from langchain_energy import power
    from langchain_energy.errors import PowerCapError

    def no_gpu():
        raise PowerCapError("no GPU to power-cap on this machine; use --power-cap-mode simulate to rehearse")

    monkeypatch.setattr(power, "zeus_gpus", no_gpu)
    err = _bad(["search", "--power-cap", "5", "--out", str(tmp_path / "o")], capsys, "no GPU")
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["simulate", "dry-run", "apply"])
def test_a_power_cap_outside_the_range_is_refused_in_every_mode(tmp_path, capsys, no_engine, monkeypatch, mode):
    from langchain_energy import power

    monkeypatch.setattr(power, "zeus_gpus", lambda: power.SimulatedGPU(min_w=200, max_w=700))
    _bad(["search", "--power-cap", "5", "--power-cap-mode", mode, "--out", str(tmp_path / "o")], capsys, "outside")


def test_a_cap_that_was_not_applied_is_labelled_so():
    assert "NOT applied" in session.power_cap_line(300, "dry-run")
    assert "NOT on a real one" in session.power_cap_line(300, "simulated")
    assert session.power_cap_line(300, "applied") == "power cap: 300 W, applied"


def test_knob_flags_come_from_the_registry_and_are_typed_by_it(tmp_path):
    from chains.harness.knobs import KNOBS

    text = run.build_parser().format_help()
    assert all(f"--{name}" in text for name in KNOBS)
    args = run.build_parser().parse_args(["search", "--batch-size", "4", "--fixed-output", "--no-prefix-caching",
                                          "--temperature", "0", "--power-cap", "250.0"])
    s = run.settings_from_args(args)
    assert (s.batch_size, s.ignore_eos, s.prefix_caching, s.temperature, s.power_cap_w) == (4, True, False, 0, 250)


def test_an_api_key_env_that_is_not_set_is_one_line_before_anything_starts(tmp_path, capsys, no_engine, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    _bad(["search", "--base-url", "http://127.0.0.1:9/v1", "--api-key-env", "NO_SUCH_KEY_VAR", "--out",
          str(tmp_path / "o")], capsys, "NO_SUCH_KEY_VAR")


def test_the_workloads_run_on_the_chat_model_with_every_sampling_knob_and_the_key(monkeypatch):
    from chains.harness.settings import RunSettings
    from langchain_energy.chat_models import ChatServing

    monkeypatch.setenv("MY_SERVER_KEY", "sk-unit-test")
    settings = RunSettings(workload="search", backend="openai", base_url="http://127.0.0.1:9/v1", temperature=0.25,
                           ignore_eos=True, seed=3)
    chat = run._make_llm(settings, None, run.api_key_from_env("MY_SERVER_KEY"))
    assert isinstance(chat, ChatServing)
    assert (chat.temperature, chat.ignore_eos, chat.seed) == (0.25, True, 3)
    assert chat.api_key.get_secret_value() == "sk-unit-test" and "sk-unit-test" not in repr(chat)
    parrot = run._make_llm(RunSettings(workload="summarize", backend="parrot", base_url="http://127.0.0.1:9"), None)
    assert isinstance(parrot, ChatServing) and parrot.backend == "parrot"   # one user message per semantic call
