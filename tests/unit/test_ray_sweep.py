"""Sweeps on a local Ray (2 CPU workers): parallel configurations, a worker killed mid-sweep, a killed driver,
more GPUs than the cluster has, a dead address, and no ray at all.

Trials are cheap real work (a sleep and a CPU loop) through the same executor the engine runner uses; one real
embedded-engine trial through a Ray worker is in tests/integration/test_sweep_engine.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from chains.harness.ray_executor import RayExecutor, connect  # noqa: E402
from chains.harness.record import STATUS_FAILED, STATUS_INFEASIBLE, STATUS_OK  # noqa: E402
from chains.harness.store import ResultStore, SweepSpec  # noqa: E402
from chains.harness.sweep import SweepConfig, run_sweep  # noqa: E402
from chains.harness.sweep_cli import main  # noqa: E402
from tests.processes import kill_after_trials  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = {"batch_size": 8, "output_len": 16, "backend": "vllm", "prefix_caching": True, "power_cap_w": None,
            "tensor_parallel_size": None}


class SleepRunner:
    """A trial that sleeps ``delay_s`` and counts (stands in for an engine: no vLLM in unit tests).

    ``pid_dir``: each runner writes its worker's PID there, named after the configuration it prepared, so a
    test can kill that worker. ``die_on``: a batch size whose trials kill their own worker (every time).
    """

    def __init__(self, delay_s: float = 0.4, pid_dir: str | None = None, die_on: int | None = None) -> None:
        self.delay_s, self.pid_dir, self.die_on = delay_s, pid_dir, die_on

    def defaults(self) -> dict:
        return dict(DEFAULTS)

    def prepare(self, config: SweepConfig) -> None:
        if self.pid_dir:
            name = f"{config.knob}={config.value}.{os.getpid()}"
            Path(self.pid_dir, name).write_text(str(os.getpid()))

    def run(self, config: SweepConfig, repeat: int):
        if config.settings["batch_size"] == self.die_on:
            os._exit(3)  # the worker process dies mid-trial
        t0 = time.time()
        time.sleep(self.delay_s)
        n = config.settings["output_len"]
        wall = time.time() - t0
        summary = pd.DataFrame([{"workflow": config.workload, "latency_s": wall, "completion_tokens": n,
                                 "energy_j": wall, "energy_cpu_j": wall, "provenance": "cpu=estimated:test"}])

        class Result:
            pass

        res = Result()
        res.summary, res.runs, res.meta = summary, pd.DataFrame([{"t_start": t0, "t_end": t0 + wall}]), {"wall_s": wall}
        return res

    def close(self) -> None:
        pass


class MakeSleepRunner:
    """The runner factory each worker calls (picklable by reference: this module is importable)."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def __call__(self, where):
        return SleepRunner(**self.kwargs)


@pytest.fixture(scope="module")
def local_ray():
    os.chdir(ROOT)  # workers import this module from the driver's working directory
    connect(None, num_cpus=2)
    yield ray
    ray.shutdown()


def _spec(knobs=None, repeats=2, **kw):
    return SweepSpec(workloads=["search"], knobs=knobs or {"batch-size": [1, 2, 4, 8]}, repeats=repeats, **kw)


def _overlaps(records) -> int:
    spans = [(r.meta["started_at"], r.meta["ended_at"], r.knobs["batch-size"]) for r in records]
    return sum(1 for a in spans for b in spans if a[2] < b[2] and a[0] < b[1] and b[0] < a[1])


def test_four_configurations_run_in_parallel_on_two_workers(local_ray, tmp_path):
    store = ResultStore(tmp_path / "par")
    outcome = run_sweep(_spec(), store, SleepRunner(), defaults=DEFAULTS, progress=False,
                        executor=RayExecutor(MakeSleepRunner(delay_s=0.5), progress=False))
    records = store.records()
    assert outcome.ran == 8 and len(records) == 8 and {r.status for r in records} == {STATUS_OK}
    assert _overlaps(records) > 0  # trials of different configurations ran at the same time
    assert len({r.meta["node"] for r in records}) == 1 and all(r.meta["gpus"] == [] for r in records)
    # Each configuration ran on one worker, trial after trial.
    assert store.aggregate()["n"].tolist() == [2, 2, 2, 2]


def test_a_killed_worker_is_retried_once_and_no_trial_is_lost_or_repeated(local_ray, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    store = ResultStore(tmp_path / "kill")
    killed: list[int] = []

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for f in pids.glob("batch-size=4.*"):
                time.sleep(0.3)  # mid-trial
                os.kill(int(f.read_text()), signal.SIGKILL)
                killed.append(int(f.read_text()))
                break
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    outcome = run_sweep(_spec(repeats=3), store, SleepRunner(), defaults=DEFAULTS, progress=False,
                        executor=RayExecutor(MakeSleepRunner(delay_s=0.4, pid_dir=str(pids)), progress=False))
    thread.join()
    assert killed
    records = store.records()
    keys = [r.key for r in records]
    assert len(keys) == len(set(keys)) == 12 and outcome.ran == 12
    four = [r for r in records if r.knobs["batch-size"] == 4]
    assert {r.status for r in four} == {STATUS_OK} and max(r.meta["attempt"] for r in four) == 2
    assert len(list(pids.glob("batch-size=4.*"))) == 2  # a second worker took the configuration over


def test_a_worker_that_always_dies_is_recorded_failed_with_the_reason(local_ray, tmp_path):
    store = ResultStore(tmp_path / "die")
    outcome = run_sweep(_spec(knobs={"batch-size": [1, 2]}), store, SleepRunner(), defaults=DEFAULTS,
                        progress=False, executor=RayExecutor(MakeSleepRunner(delay_s=0.1, die_on=2), progress=False))
    by = {(r.knobs["batch-size"], r.repeat): r for r in store.records()}
    assert [by[(1, r)].status for r in (0, 1)] == [STATUS_OK, STATUS_OK]
    assert [by[(2, r)].status for r in (0, 1)] == [STATUS_FAILED, STATUS_FAILED]
    assert "worker failed 2 times" in by[(2, 0)].reason and "died" in by[(2, 0)].reason.lower()
    assert len(outcome.failed) == 1
    # A rerun sees the sweep finished: a failed configuration is not retried forever.
    again = run_sweep(_spec(knobs={"batch-size": [1, 2]}), store, SleepRunner(), defaults=DEFAULTS, progress=False,
                      executor=RayExecutor(MakeSleepRunner(), progress=False))
    assert again.ran == 0 and again.skipped == 4


def test_more_gpus_than_the_cluster_has_is_recorded_infeasible_not_waited_for(local_ray, tmp_path):
    store = ResultStore(tmp_path / "tp")
    t0 = time.monotonic()
    outcome = run_sweep(_spec(knobs={"tensor-parallel": [1, 2]}), store, SleepRunner(), defaults=DEFAULTS,
                        progress=False, executor=RayExecutor(MakeSleepRunner(delay_s=0.1), progress=False))
    assert time.monotonic() - t0 < 30
    by = {(r.knobs["tensor-parallel"], r.repeat): r for r in store.records()}
    assert by[(1, 0)].status == STATUS_OK and by[(2, 0)].status == by[(2, 1)].status == STATUS_INFEASIBLE
    assert "needs 2 GPUs" in by[(2, 0)].reason and len(outcome.infeasible) == 1


def test_no_configuration_starts_after_the_deadline(local_ray, tmp_path):
    store = ResultStore(tmp_path / "late")
    outcome = run_sweep(_spec(), store, SleepRunner(), defaults=DEFAULTS, progress=False, deadline=time.monotonic(),
                        executor=RayExecutor(MakeSleepRunner(), progress=False))
    assert outcome.ran == 0 and store.done_keys() == set()


def test_records_from_two_nodes_are_one_sweep(tmp_path):
    """Records carry their node and GPUs; the tables and CIs pool repeats across nodes."""
    from chains.harness.sweep import make_record, plan

    store = ResultStore(tmp_path / "nodes")
    spec = _spec(knobs={"batch-size": [4]}, repeats=4)
    store.init(spec)
    (config,) = plan(spec, DEFAULTS)
    for repeat, node in enumerate(["node-a", "node-b", "node-a", "node-b"]):
        result = SleepRunner(delay_s=0).run(config, repeat)
        result.summary["energy_j"] = 10.0 + repeat
        store.append(make_record(config, repeat, result, {"node": node, "gpus": [repeat % 2]}))
    agg = store.aggregate()
    assert len(agg) == 1 and agg["n"].tolist() == [4] and agg["energy_j_mean"].tolist() == [11.5]
    assert sorted({r.meta["node"] for r in store.records()}) == ["node-a", "node-b"]


def test_cli_address_that_does_not_answer_is_one_line_within_seconds(tmp_path, capsys):
    t0 = time.monotonic()
    code = main(["--workload", "search", "--knob", "batch-size=1", "--repeats", "1", "--out", str(tmp_path / "x"),
                 "--no-progress", "--ray", "127.0.0.1:9"], runner_factory=lambda spec: SleepRunner())
    err = capsys.readouterr().err.strip()
    assert code == 2 and time.monotonic() - t0 < 15
    assert err.startswith("error: Ray address 127.0.0.1:9 does not answer") and "\n" not in err
    assert not (tmp_path / "x" / "trials").exists()


def test_cli_without_ray_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where it is not installed
    code = main(["--workload", "search", "--knob", "batch-size=1", "--repeats", "1", "--out", str(tmp_path / "x"),
                 "--no-progress", "--ray"], runner_factory=lambda spec: SleepRunner())
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --ray needs the ray extra: pip install 'langchain-energy[ray]'"


KILLED_DRIVER = """
import sys
from chains.harness.sweep_cli import main
from tests.unit.test_ray_sweep import SleepRunner
sys.exit(main(["--workload", "search", "--knob", "batch-size=1,2,4,8", "--repeats", "3", "--out", sys.argv[1],
               "--no-progress", "--ray"], runner_factory=lambda spec: SleepRunner(delay_s=0.5)))
"""


def test_a_killed_driver_resumes_with_every_trial_once(tmp_path):
    out = tmp_path / "driver"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", KILLED_DRIVER, str(out)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_after_trials(proc, out, 3, timeout_s=90)  # the driver only: its Ray and workers go with it
    partial = ResultStore(out).done_keys()
    assert 3 <= len(partial) < 12
    done = subprocess.run(cmd, env=env, cwd=ROOT, timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{12 - len(partial)} trial(s) run, {len(partial)} already" in done.stdout
    files = [p for p in (out / "trials").iterdir() if not p.name.startswith(".")]
    keys = [json.loads(p.read_text())["key"] for p in files]
    assert len(keys) == len(set(keys)) == 12
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # Ray's agents of the killed driver would linger a minute
    except (ProcessLookupError, PermissionError):
        pass
