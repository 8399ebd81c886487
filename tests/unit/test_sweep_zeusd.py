"""``sweep --zeusd URL``: the trial runner meters its engine's GPUs through the node's zeusd (here `ZeusdDouble`,
a TEST DOUBLE of the daemon), only the GPUs it was given (a Ray worker's ``ray.get_gpu_ids()``)."""

from __future__ import annotations

import socket
import time

import pytest

from chains.harness.engine_runner import EngineTrialRunner
from chains.harness.sweep_cli import engine_runner_maker
from langchain_energy.callbacks import EnergyCallbackHandler
from tests.doubles.zeusd import ZeusdDouble


@pytest.fixture
def node():
    daemon = ZeusdDouble(gpus={0: [(None, 50.0)], 1: [(None, 300.0)]}).start()
    yield daemon
    daemon.kill()


def test_a_worker_meters_only_its_own_gpu_of_the_node(node):
    runner = engine_runner_maker({}, None, None, node.url)({"node": "n", "gpus": [1]})
    assert isinstance(runner, EngineTrialRunner) and runner.gpu_ids == [1]
    meter = runner._zeusd_meter()
    try:
        host = socket.gethostname().split(".")[0].replace("-", "_")
        gpus = {k: v for k, v in meter.components().items() if k.startswith("gpu")}
        assert list(gpus) == ["gpu:1"] and gpus["gpu:1"].startswith("measured:zeusd@")
        assert gpus["gpu:1"].endswith(":gpu1") and host.split("_")[0] in gpus["gpu:1"]
        handler = EnergyCallbackHandler(meter=meter)  # what _metered builds for each trial
        assert handler.timeline.meter is meter
        time.sleep(0.5)
        joules = meter.read().energy_j["gpu:1"]
        assert 300 * 0.2 < joules < 300 * 2  # GPU 1's 300 W, never GPU 0's 50 W
        handler.close()
    finally:
        runner.close()
    assert runner._meter is None


def test_without_zeusd_the_process_meter_is_used():
    assert EngineTrialRunner()._zeusd_meter() is None


def test_a_remote_daemon_names_its_node_by_the_urls_host(node):
    from chains.harness.engine_runner import zeusd_meter

    remote = zeusd_meter(node.url.replace("127.0.0.1", "localhost"))
    assert all("zeusd@" in p for k, p in remote.components().items() if k.startswith("gpu"))
    with pytest.raises(Exception, match="http"):
        zeusd_meter("10.0.0.5:4938")


def test_run_refuses_a_zeusd_that_is_not_a_url(capsys):
    from chains.harness.cli import main

    status = main(["search", "--zeusd", "node1:4938", "--base-url", "http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--zeusd" in err[0]


def test_study_takes_zeusd_and_refuses_one_that_is_not_a_url(tmp_path, capsys):
    from chains.study import main

    status = main(["--out", str(tmp_path / "s"), "--size", "rehearse", "--parts", "search-batch",
                   "--zeusd", "node1:4938"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--zeusd" in err[0] and "http" in err[0]
