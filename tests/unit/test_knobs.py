"""Knob parsing and the power cap against the simulated GPU double (never a real GPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from langchain_energy.errors import ConfigError, PowerCapError, PowerCapPermissionError
from langchain_energy.knobs import KNOBS, PowerCap, SimulatedGPU, parse_knob


def test_parse_knobs():
    assert parse_knob("batch-size=1,2,4,8,16") == ("batch-size", [1, 2, 4, 8, 16])
    assert parse_knob("power-cap=150,200.5") == ("power-cap", [150, 200.5])
    assert parse_knob("prefix-caching=on,off") == ("prefix-caching", [True, False])
    assert parse_knob("backend=vllm,parrot,vllm") == ("backend", ["vllm", "parrot"])
    assert KNOBS["batch-size"].is_engine_knob and not KNOBS["output-len"].is_engine_knob


@pytest.mark.parametrize(
    "arg, match",
    [("batchsize=1", "unknown knob"), ("batch-size", "malformed"), ("batch-size=", "empty value list"),
     ("batch-size=1,,2", "empty item"), ("batch-size=0", "invalid"), ("batch-size=x", "invalid"),
     ("power-cap=-5", "invalid"), ("backend=tgi", "invalid")],
)
def test_bad_knobs(arg, match):
    with pytest.raises(ConfigError, match=match):
        parse_knob(arg)


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
        cap.preflight([150, 250])
        cap.set(150)
    assert gpu.set_calls == [] and [(e.action, e.watts) for e in cap.events] == [("dry-run", 150)]


CHILD = textwrap.dedent(
    """
    import sys, time
    from langchain_energy.knobs import PowerCap, SimulatedGPU
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
