"""Issue 11, item 11: the CPU estimate follows the process tree that serves and calls, not the whole machine."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import psutil
import pytest

from langchain_energy.errors import ConfigError
from langchain_energy.meters import EstimatedMeter, ManualClock, PowerModel, ReplayMeter, auto_meter
from langchain_energy.meters.composite import CompositeMeter

NCPU = psutil.cpu_count(logical=True) or 1
MODEL = PowerModel(cpu_tdp_w=100.0, idle_fraction=0.2, dram_gib=1.0)
SPIN = "import time\nend = time.time() + {s}\nwhile time.time() < end: pass\n"


def _spin_here(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))


def _wait_busy(pid: int, cpu_s: float = 0.05) -> None:
    proc = psutil.Process(pid)
    deadline = time.monotonic() + 10.0
    while sum(proc.cpu_times()[:2]) < cpu_s and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture
def unrelated_spinner():
    """A busy process that is not in this process's tree: started through a parent that exits at once."""
    launcher = ("import subprocess, sys\n"
                f"p = subprocess.Popen([sys.executable, '-c', {SPIN.format(s=20)!r}], start_new_session=True,\n"
                "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                "print(p.pid)\n")
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, check=True)
    pid = int(out.stdout.strip())
    assert pid not in {p.pid for p in psutil.Process().children(recursive=True)}
    _wait_busy(pid)
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    yield pid
    try:
        psutil.Process(pid).kill()
    except psutil.NoSuchProcess:
        pass


def test_labels_say_which_scope_the_estimate_has():
    tree = EstimatedMeter(MODEL)
    assert tree.scope == "process-tree"
    assert tree.components() == {"cpu": "estimated:linear-tdp/process-tree", "dram": "estimated:linear-tdp/machine"}
    machine = EstimatedMeter(MODEL, scope="machine")
    assert machine.components() == {"cpu": "estimated:linear-tdp/machine", "dram": "estimated:linear-tdp/machine"}
    d = tree.describe()["estimated"]
    assert d["cpu_scope"] == "process-tree" and d["process_tree_roots"] == [os.getpid()]
    assert machine.describe()["estimated"]["cpu_scope"] == "machine"
    with pytest.raises(ConfigError, match="scope"):
        EstimatedMeter(MODEL, scope="host")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'/'"):
        PowerModel(name="a/b")


def test_unrelated_busy_process_does_not_raise_the_process_tree_estimate(unrelated_spinner):
    tree = EstimatedMeter(MODEL, rescan_s=0.0)
    machine = EstimatedMeter(MODEL, scope="machine")
    r0 = tree.read()
    machine.read()
    time.sleep(1.0)  # this call sleeps; the unrelated job keeps a core busy
    r1 = tree.read()
    machine.read()
    dt = r1.t - r0.t
    assert tree.last_utilization < 0.05
    assert r1.energy_j["cpu"] - r0.energy_j["cpu"] <= MODEL.cpu_power_w(0.05) * dt
    assert machine.last_utilization > tree.last_utilization + 0.25 / NCPU  # the machine-wide view sees it


def test_busy_work_in_this_process_raises_the_process_tree_estimate():
    tree = EstimatedMeter(MODEL, rescan_s=0.0)
    r0 = tree.read()
    _spin_here(0.5)
    r1 = tree.read()
    assert tree.last_utilization > 0.25 / NCPU
    assert r1.energy_j["cpu"] - r0.energy_j["cpu"] > MODEL.cpu_power_w(0.0) * (r1.t - r0.t)


def test_registered_pids_join_the_tree(unrelated_spinner):
    tree = EstimatedMeter(MODEL, rescan_s=0.0)
    tree.add_pids(unrelated_spinner)
    assert tree.process_tree_roots == (os.getpid(), unrelated_spinner)
    tree.read()
    time.sleep(0.6)
    tree.read()
    assert tree.last_utilization > 0.25 / NCPU
    with pytest.raises(ConfigError, match="no process"):
        tree.add_pids(2**22 + 12345)


def _own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def test_cpu_time_of_an_exited_child_is_kept_once():
    own0, reaped0 = _own_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    tree = EstimatedMeter(MODEL, rescan_s=0.0)
    child = subprocess.Popen([sys.executable, "-c", SPIN.format(s=0.6)])
    seen = []
    try:
        while child.poll() is None:  # sample like the timeline does while the child lives
            tree.read()
            seen.append(tree.process_tree_cpu_s)
            time.sleep(0.03)
    finally:
        child.wait(timeout=30)
    tree.read()  # the child is gone and reaped: its last known CPU time stays counted, and only once
    seen.append(tree.process_tree_cpu_s)
    own = _own_cpu_s() - own0
    reaped1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_s = (reaped1.ru_utime - reaped0.ru_utime) + (reaped1.ru_stime - reaped0.ru_stime)
    assert child_s > 0.3
    assert seen == sorted(seen)  # never drops
    assert own + child_s - 0.15 <= seen[-1] <= own + child_s + 0.02
    _spin_here(0.2)
    tree.read()
    assert tree.process_tree_cpu_s > seen[-1]


def test_a_server_in_its_own_session_and_its_workers_are_in_the_tree():
    # Like VLLMServer: a child started in a new session, whose engine runs in a grandchild.
    tree = EstimatedMeter(MODEL, rescan_s=0.0)
    server = subprocess.Popen(
        [sys.executable, "-c",
         f"import subprocess, sys; subprocess.run([sys.executable, '-c', {SPIN.format(s=0.8)!r}])"],
        start_new_session=True)
    try:
        time.sleep(0.3)
        r0 = tree.read()
        time.sleep(0.4)
        r1 = tree.read()
    finally:
        server.wait(timeout=30)
    assert tree.last_utilization > 0.25 / NCPU
    assert r1.energy_j["cpu"] > r0.energy_j["cpu"]


def test_auto_meter_passes_the_scope_and_pids_on():
    meter = auto_meter(cpu="estimated", dram="estimated", gpu="off", cpu_scope="machine")
    assert meter.components()["cpu"] == "estimated:linear-tdp/machine"
    tree = auto_meter(cpu="estimated", dram="off", gpu="off", process_tree_roots=[os.getppid()])
    assert tree.components() == {"cpu": "estimated:linear-tdp/process-tree"}
    assert tree.describe()["estimated"]["process_tree_roots"] == [os.getpid(), os.getppid()]
    tree.add_pids(os.getppid())  # already there: no duplicate
    assert tree.describe()["estimated"]["process_tree_roots"] == [os.getpid(), os.getppid()]
    # a composite without an estimate takes PIDs as a no-op rather than failing
    clock = ManualClock()
    CompositeMeter([ReplayMeter({"cpu": [(0.0, 1.0)]}, clock=clock)], clock=clock).add_pids(os.getppid())
