"""The GPU power cap against the simulated GPU double (never a real GPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from langchain_energy.errors import PowerCapError, PowerCapPermissionError
from langchain_energy import power
from langchain_energy.power import PowerCap, SimulatedGPU


def test_set_verify_restore():
    gpu = SimulatedGPU(min_w=200, max_w=700, default_w=700)
    with PowerCap(gpu) as cap:
        cap.set(300)
        assert gpu.get_power_management_limit(0) == 300_000
        cap.set(250)
    assert gpu.get_power_management_limit(0) == 700_000
    assert [e.action for e in cap.events] == ["read", "set", "set", "restore"]
    with PowerCap(SimulatedGPU(privileged=False)):
        pass  # never capped: nothing read or written, no privilege needed


def test_restore_on_exception():
    gpu = SimulatedGPU(default_w=650)
    with pytest.raises(RuntimeError):
        with PowerCap(gpu) as cap:
            cap.set(250)
            raise RuntimeError("trial failed")
    assert gpu.get_power_management_limit(0) == 650_000


def test_out_of_range_and_permission_checked_before_touching():
    gpu = SimulatedGPU(min_w=200, max_w=700)
    with pytest.raises(PowerCapError, match="outside"):
        PowerCap(gpu).preflight([150, 300])
    with pytest.raises(PowerCapPermissionError, match="CAP_SYS_ADMIN"):
        PowerCap(SimulatedGPU(privileged=False)).preflight([300])
    with pytest.raises(PowerCapError, match="outside"):
        with PowerCap(gpu) as cap:
            cap.set(800)
    assert gpu.set_calls == []


def test_readback_mismatch_is_an_error():
    gpu = SimulatedGPU(fail_readback=True)
    with pytest.raises(PowerCapError, match="reads back"):
        with PowerCap(gpu) as cap:
            cap.set(300)


def test_dry_run_never_touches_device():
    gpu = SimulatedGPU(privileged=False)
    with PowerCap(gpu, dry_run=True) as cap:
        cap.preflight([250, 300])
        cap.set(250)
    assert gpu.set_calls == [] and [(e.action, e.watts) for e in cap.events] == [("dry-run", 250)]
    assert cap.mode == "dry-run" and PowerCap(gpu).mode == "simulated"


def test_dry_run_refuses_a_cap_no_device_here_could_take(monkeypatch):
    gpu = SimulatedGPU(min_w=200, max_w=700)
    with pytest.raises(PowerCapError, match="outside"):
        PowerCap(gpu, dry_run=True).preflight([5])
    with pytest.raises(PowerCapError, match="outside"):
        with PowerCap(gpu, dry_run=True) as cap:
            cap.set(5)

    def no_gpu():
        raise PowerCapError("no GPU to power-cap on this machine; a power cap needs a GPU even to be recorded")

    monkeypatch.setattr(power, "zeus_gpus", no_gpu)
    with pytest.raises(PowerCapError, match="no GPU"):
        PowerCap(dry_run=True).preflight([300])
    PowerCap(dry_run=True).preflight([])  # no cap asked for: no device needed


def test_no_gpu_error_is_one_line(monkeypatch):
    import zeus.device

    def broken():
        raise RuntimeError("NVML not found\nsecond line of a long trace")

    monkeypatch.setattr(zeus.device, "get_gpus", broken)
    with pytest.raises(PowerCapError) as exc:
        power.zeus_gpus()
    assert "\n" not in str(exc.value) and "simulate" in str(exc.value)


CHILD = textwrap.dedent(
    """
    import sys, time
    from langchain_energy.power import PowerCap, SimulatedGPU
    gpu = SimulatedGPU(default_w=700, state_path=sys.argv[1])
    with PowerCap(gpu) as cap:
        cap.set(222)
        print("capped", flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, -signal.SIGINT)])
def test_restore_on_signal(tmp_path, sig, code):
    state = tmp_path / "gpu.json"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "capped"
        assert SimulatedGPU(state_path=state).get_power_management_limit(0) == 222_000
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=30) == code
    finally:
        if proc.poll() is None:
            proc.kill()
    assert SimulatedGPU(state_path=state).get_power_management_limit(0) == 700_000
