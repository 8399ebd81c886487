"""The sweep loop: planning, appending, resume after a kill, infeasible recording, power caps, CLI errors.

Trials here run a cheap but real workload (a CPU loop whose length is the output-length knob) through the
same loop the engine runner uses; the engine itself is exercised in tests/integration/test_sweep_engine.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from chains.harness.sweep import SweepConfig, plan, run_sweep
from chains.harness.sweep_cli import main
from langchain_energy.errors import InfeasibleConfigError, PowerCapError, PowerCapPermissionError
from langchain_energy.power import PowerCap, SimulatedGPU
from chains.harness.store import ResultStore, SweepSpec
from tests.processes import kill_after_trials

DEFAULTS = {"batch_size": 8, "output_len": 16, "backend": "vllm", "prefix_caching": True, "power_cap_w": None}


class CheapRunner:
    """Runs a small CPU-bound loop per trial; refuses engines with more than ``max_batch`` sequences,
    the way a KV cache too small for the batch does (an engine double: no vLLM in unit tests)."""

    def __init__(self, max_batch: int = 1_000, delay_s: float = 0.0) -> None:
        self.max_batch, self.delay_s = max_batch, delay_s
        self.engines: list[tuple] = []
        self.closed = False

    def defaults(self) -> dict:
        return dict(DEFAULTS)

    def prepare(self, config: SweepConfig) -> None:
        if config.settings["batch_size"] > self.max_batch:
            raise InfeasibleConfigError(f"KV cache cannot hold {config.settings['batch_size']} sequences")
        if not self.engines or self.engines[-1] != config.engine_key():
            self.engines.append(config.engine_key())

    def run(self, config: SweepConfig, repeat: int):
        t0 = time.perf_counter()
        n = config.settings["output_len"]
        acc = sum(i * i for i in range(n * 1000))
        time.sleep(self.delay_s)
        wall = time.perf_counter() - t0
        summary = pd.DataFrame([{"workflow": config.workload, "latency_s": wall, "completion_tokens": n,
                                 "prompt_tokens": 100, "cached_tokens": 50, "energy_j": wall * 10,
                                 "energy_cpu_j": wall * 10, "provenance": "cpu=estimated:test", "acc": acc % 7}])
        runs = pd.DataFrame([{"t_start": t0, "t_end": t0 + wall, "completion_tokens": n}])

        class Result:
            pass

        res = Result()
        res.summary, res.runs, res.meta = summary, runs, {"wall_s": wall}
        res.timeline = pd.DataFrame({"t": [0.0, wall], "cpu_util": [50.0, 90.0], "gpu_util": [None, None]})
        return res

    def close(self) -> None:
        self.closed = True


def _spec(**kw):
    base = dict(workloads=["search", "summarize"], knobs={"batch-size": [1, 4], "output-len": [8, 32]}, repeats=2)
    base.update(kw)
    return SweepSpec(**base)


def test_plan_one_knob_at_a_time_grouped_by_engine():
    configs = plan(_spec(), DEFAULTS)
    assert len(configs) == 2 * 4
    # output-len configs run on the default engine (batch 8); each engine's configs are contiguous
    keys = [c.engine_key() for c in configs]
    assert keys == sorted(keys, key=keys.index)
    assert len({k for k in keys}) == 3
    c = next(c for c in configs if c.knob == "output-len" and c.value == 32)
    assert c.settings["batch_size"] == 8 and c.settings["output_len"] == 32


def test_plan_across_crosses_every_point():
    configs = plan(_spec(workloads=["summarize"], knobs={"output-len": [8, 16]}, across={"backend": ["vllm",
                   "parrot"]}), DEFAULTS)
    assert sorted((c.settings["backend"], c.value) for c in configs) == [
        ("parrot", 8), ("parrot", 16), ("vllm", 8), ("vllm", 16)]


def test_sweep_stores_every_trial_and_resumes(tmp_path):
    store = ResultStore(tmp_path)
    runner = CheapRunner()
    out = run_sweep(_spec(), store, runner, DEFAULTS, progress=False)
    assert (out.ran, out.skipped) == (16, 0) and runner.closed
    assert len(runner.engines) == 3  # batch 1, batch 4, default batch 8: one engine each
    again = run_sweep(_spec(), store, CheapRunner(), DEFAULTS, progress=False)
    assert (again.ran, again.skipped) == (0, 16)
    agg = store.aggregate()
    assert set(agg["n"]) == {2} and len(agg) == 8
    assert (agg["energy_per_token_j_mean"] > 0).all()
    assert len(store.load_timeline()) == 32


def test_infeasible_recorded_and_sweep_goes_on(tmp_path):
    store = ResultStore(tmp_path)
    out = run_sweep(_spec(knobs={"batch-size": [1, 16, 2]}, workloads=["search"]), store,
                    CheapRunner(max_batch=8), DEFAULTS, progress=False)
    assert out.ran == 4 and len(out.infeasible) == 1
    agg = store.aggregate().set_index("value")
    assert agg.loc[16, "status"] == "infeasible" and "16 sequences" in agg.loc[16, "reason"]
    assert agg.loc[2, "n"] == 2
    # resuming does not retry the infeasible configuration
    assert run_sweep(_spec(knobs={"batch-size": [1, 16, 2]}, workloads=["search"]), store,
                     CheapRunner(max_batch=8), DEFAULTS, progress=False).ran == 0


def test_power_cap_applied_per_config_and_restored(tmp_path):
    gpu = SimulatedGPU(min_w=200, max_w=700, default_w=700)
    seen = []

    class Watching(CheapRunner):
        def run(self, config, repeat):
            seen.append((config.knob, config.value, gpu.get_power_management_limit(0)))
            return super().run(config, repeat)

    spec = _spec(workloads=["search"], knobs={"power-cap": [300, 250], "output-len": [8]}, repeats=1)
    run_sweep(spec, ResultStore(tmp_path), Watching(), DEFAULTS, PowerCap(gpu), progress=False)
    assert sorted(seen) == [("output-len", 8, 700_000), ("power-cap", 250, 250_000), ("power-cap", 300, 300_000)]
    assert gpu.get_power_management_limit(0) == 700_000
    trials = ResultStore(tmp_path).records()
    # the simulated GPU took the caps, but no real one did: the records say so
    assert {t.meta.get("power_cap_mode") for t in trials if t.knob == "power-cap"} == {"simulated"}
    assert "power_cap_w" not in trials[0].meta  # the cap's value is the knob's, stored once


def test_power_cap_restored_when_a_trial_fails(tmp_path):
    gpu = SimulatedGPU(default_w=700)

    class Failing(CheapRunner):
        def run(self, config, repeat):
            raise RuntimeError("workload crashed")

    with pytest.raises(RuntimeError):
        run_sweep(_spec(knobs={"power-cap": [300]}, repeats=1), ResultStore(tmp_path), Failing(), DEFAULTS,
                  PowerCap(gpu), progress=False)
    assert gpu.get_power_management_limit(0) == 700_000


def test_bad_power_caps_fail_before_anything_is_written(tmp_path):
    spec = _spec(knobs={"power-cap": [150, 250]})
    with pytest.raises(PowerCapError, match="outside"):
        run_sweep(spec, ResultStore(tmp_path / "a"), CheapRunner(), DEFAULTS, PowerCap(SimulatedGPU()),
                  progress=False)
    with pytest.raises(PowerCapPermissionError):
        run_sweep(_spec(knobs={"power-cap": [250]}), ResultStore(tmp_path / "b"), CheapRunner(), DEFAULTS,
                  PowerCap(SimulatedGPU(privileged=False)), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _cli(tmp_path, *extra):
    return main(["--workload", "search", "--knob", "output-len=4,8", "--repeats", "2", "--out", str(tmp_path),
                 "--no-progress", *extra], runner_factory=lambda spec: CheapRunner())


def test_cli_runs_resumes_and_refuses_a_different_sweep(tmp_path, capsys):
    assert _cli(tmp_path) == 0
    assert "4 trial(s) run" in capsys.readouterr().out
    assert _cli(tmp_path) == 0
    assert "0 trial(s) run, 4 already" in capsys.readouterr().out
    before = sorted(p.name for p in (tmp_path / "trials").iterdir())
    assert main(["--workload", "search", "--knob", "output-len=4,16", "--repeats", "2", "--out", str(tmp_path),
                 "--no-progress"], runner_factory=lambda spec: CheapRunner()) == 2
    assert "different sweep" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == before


@pytest.mark.parametrize("argv, message", [
    (["--knob", "speed=1"], "unknown knob"),
    (["--knob", "batch-size="], "empty value list"),
    (["--knob", "batch-size=1,x"], "invalid"),
    (["--knob", "output-len=4", "--set", "users=1,2"], "exactly one value"),
    (["--knob", "output-len=4", "--engine-arg", "oops"], "malformed"),
])
def test_cli_bad_input(tmp_path, capsys, argv, message):
    code = main(["--workload", "search", "--repeats", "1", "--out", str(tmp_path / "o"), "--no-progress", *argv],
                runner_factory=lambda spec: CheapRunner())
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_power_cap_simulate_and_dry_run(tmp_path, capsys, monkeypatch):
    from langchain_energy import power

    assert _cli(tmp_path / "s", "--knob", "power-cap=300", "--power-cap-mode", "simulate") == 0
    # 100 W is below the simulated H100's 200 W floor: refused up front
    assert _cli(tmp_path / "x", "--knob", "power-cap=100", "--power-cap-mode", "simulate") == 2
    assert "outside" in capsys.readouterr().err
    # a dry run reads the GPU's range (never sets it): in range it is recorded as not applied ...
    monkeypatch.setattr(power, "zeus_gpus", lambda: SimulatedGPU(min_w=200, max_w=700, privileged=False))
    assert _cli(tmp_path / "d", "--knob", "power-cap=300", "--power-cap-mode", "dry-run") == 0
    modes = {t.meta.get("power_cap_mode") for t in ResultStore(tmp_path / "d").records() if t.knob == "power-cap"}
    assert modes == {"dry-run"}
    agg = ResultStore(tmp_path / "d").aggregate()
    assert set(agg.loc[agg["knob"] == "power-cap", "power_cap_mode"]) == {"dry-run"}
    capsys.readouterr()
    # ... and out of range it is refused, in a dry run too
    assert _cli(tmp_path / "dx", "--knob", "power-cap=5", "--power-cap-mode", "dry-run") == 2
    assert "outside" in capsys.readouterr().err and not (tmp_path / "dx").exists()


def test_cli_power_cap_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from langchain_energy import power
    from langchain_energy.errors import PowerCapError

    def no_gpu():
        raise PowerCapError("no GPU to power-cap on this machine; use --power-cap-mode simulate to rehearse")

    monkeypatch.setattr(power, "zeus_gpus", no_gpu)
    assert _cli(tmp_path / "n", "--knob", "power-cap=5") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no GPU") and err.count("\n") == 1 and not (tmp_path / "n").exists()


KILLED_SWEEP = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("t", sys.argv[1]); mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
from chains.harness.sweep_cli import main
sys.exit(main(["--workload", "search,summarize", "--knob", "output-len=1,2,3", "--repeats", "3",
               "--out", sys.argv[2], "--no-progress"], runner_factory=lambda s: mod.CheapRunner(delay_s=0.15)))
"""


def test_resume_after_kill_no_duplicates_no_losses(tmp_path):
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SWEEP, __file__, str(out)], env=env)
    kill_after_trials(proc, out, 5, timeout_s=60)
    partial = ResultStore(out).done_keys()
    assert 5 <= len(partial) < 18
    done = subprocess.run([sys.executable, "-c", KILLED_SWEEP, __file__, str(out)], env=env, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{18 - len(partial)} trial(s) run, {len(partial)} already" in done.stdout
    files = [p for p in (out / "trials").iterdir() if not p.name.startswith(".")]
    assert len(files) == 18
    keys = [json.loads(p.read_text())["key"] for p in files]
    assert len(set(keys)) == 18
    assert ResultStore(out).aggregate()["n"].tolist() == [3] * 6


def test_a_time_budget_stops_starting_trials_and_a_rerun_finishes_the_rest(tmp_path):
    store = ResultStore(tmp_path / "budget")
    spec = _spec(workloads=["search"], knobs={"output-len": [8, 16, 32]}, repeats=2)
    runner = CheapRunner(delay_s=0.05)
    first = run_sweep(spec, store, runner, defaults=DEFAULTS, progress=False, deadline=time.monotonic() + 0.12)
    assert 1 <= first.ran < 6 and runner.closed
    second = run_sweep(spec, store, CheapRunner(), defaults=DEFAULTS, progress=False)
    assert second.skipped == first.ran and first.ran + second.ran == 6
    assert len(store.done_keys()) == 6


def test_a_time_budget_starts_no_engine_that_cannot_fit_one_trial(tmp_path, monkeypatch):
    import types

    import chains.harness.sweep as sweep_module

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(sweep_module, "time", types.SimpleNamespace(monotonic=lambda: clock.now))

    class SlowStartRunner(CheapRunner):
        """Engine starts take 100 s and trials 10 s, on the test's clock."""

        def prepare(self, config):
            if not self.engines or self.engines[-1] != config.engine_key():
                clock.now += 100
            super().prepare(config)

        def run(self, config, repeat):
            clock.now += 10
            return super().run(config, repeat)

    spec = _spec(workloads=["search"], knobs={"batch-size": [1, 4]}, repeats=2)
    # Two engines of 100 s plus two trials of 10 s each need 240 s.
    tight = SlowStartRunner()
    outcome = run_sweep(spec, ResultStore(tmp_path / "tight"), tight, defaults=DEFAULTS, progress=False, deadline=150)
    assert outcome.ran == 2 and len(tight.engines) == 1  # at 120 s, 100 + 10 more would pass the deadline
    roomy = SlowStartRunner()
    clock.now = 0.0
    outcome = run_sweep(spec, ResultStore(tmp_path / "roomy"), roomy, defaults=DEFAULTS, progress=False, deadline=250)
    assert outcome.ran == 4 and len(roomy.engines) == 2
