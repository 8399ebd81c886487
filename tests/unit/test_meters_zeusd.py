"""Issue 15, item 4: remote engines' GPUs metered from zeusd's power stream (against a zeusd test double).

The real ``PowerStreamingClient`` talks HTTP/SSE to `ZeusdDouble`; joules are checked against the double's own
record of what it sent (hold-last over its samples, on its clock), so no assertion depends on how fast this
machine schedules threads.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import pytest

from langchain_energy.accounting import EnergyColumns, group_provenance, is_measured
from langchain_energy.errors import ConfigError, MeterError
from langchain_energy.meters import (
    CompositeMeter,
    ZeusdMeter,
    auto_meter,
    component_group,
    parse_zeusd_url,
)
from tests.doubles.zeusd import CpuProgram, ZeusdDouble

# Each step of a program lasts until the double's poll after it ends: the step lasts at least its length,
# and the double stamps in whole milliseconds (up to 2 ms short). The upper slack only bounds a stalled poll.
STEP_SLACK_S = 0.5
# Zeus turns a stamp into float Unix seconds (~1.8e9, resolution ~0.24 us) before the offset moves it onto the
# monotonic clock, so "exact" means within a few microjoules per sample at these powers.
EXACT_J = 1e-3


def wait_for(cond: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def settled(meter: ZeusdMeter, node: ZeusdDouble, name: str, watts_now: float = 0.0) -> Callable[[], bool]:
    """The double has sent its final step (all devices at `watts_now`) and the meter has received everything."""

    def done() -> bool:
        finals = [s for s in node.sent if s.stream == "gpu"]
        gpus_final = all(node.samples("gpu", i) and node.samples("gpu", i)[-1].power_mw == watts_now * 1000
                         for i in node.gpus)
        cpus_final = all(node.samples("cpu", i) and node.samples("cpu", i)[-1].power_mw == watts_now * 1000
                         for i in node.cpus)
        return bool(finals or node.cpus) and gpus_final and cpus_final and \
            meter.node_status()[name]["samples"] == _channel_samples(node)

    return done


def _channel_samples(node: ZeusdDouble) -> int:
    # The meter counts a CPU sample with DRAM as two channel samples (package and DRAM).
    return sum(2 if s.dram_mw is not None else 1 for s in node.sent)


@pytest.fixture
def nodes():
    started: list[ZeusdDouble] = []

    def make(**kwargs) -> ZeusdDouble:
        node = ZeusdDouble(**kwargs).start()
        started.append(node)
        return node

    yield make
    for node in started:
        node.kill()


def test_constant_300w_for_one_second_is_300_joules(nodes):
    node = nodes(gpus={0: [(1.0, 300.0), (None, 0.0)]})
    with ZeusdMeter.from_urls([node.url], reconnect_delay_s=0.1) as meter:
        assert meter.components() == {"gpu:0": "measured:zeusd@127_0_0_1:gpu0"}
        wait_for(settled(meter, node, "127_0_0_1"), what="the 300 W step to end and reach the meter")
        reading = meter.read()
        sent = node.samples("gpu", 0)
        assert [s.power_mw for s in sent] == [300_000, 0]  # change-only stream: one sample per step
        # Exact against the double's record: hold-last of 300 W from its first stamp to its second.
        assert reading.energy_j["gpu:0"] == pytest.approx(node.energy_sent_j("gpu", 0), abs=EXACT_J)
        assert 300.0 * (1.0 - 0.002) <= reading.energy_j["gpu:0"] <= 300.0 * (1.0 + STEP_SLACK_S)
        assert reading.gpu_power_w == {0: 0.0}
        # At 0 W, later reads add nothing.
        time.sleep(0.1)
        assert meter.read().energy_j["gpu:0"] == reading.energy_j["gpu:0"]
        assert meter.gaps() == []


def test_two_nodes_are_kept_apart(nodes):
    a = nodes(gpus={0: [(0.6, 300.0), (None, 0.0)]})
    b = nodes(gpus={0: [(0.4, 100.0), (0.3, 200.0), (None, 0.0)], 1: [(0.5, 50.0), (None, 0.0)]},
              cpus={0: CpuProgram(cpu=[(0.5, 80.0), (None, 0.0)], dram=[(0.5, 20.0), (None, 0.0)])})
    with ZeusdMeter.from_urls({"nodeA": a.url, "nodeB": b.url}, reconnect_delay_s=0.1) as meter:
        assert meter.components() == {
            "gpu:nodeA_0": "measured:zeusd@nodeA:gpu0",
            "gpu:nodeB_0": "measured:zeusd@nodeB:gpu0",
            "gpu:nodeB_1": "measured:zeusd@nodeB:gpu1",
            "cpu:nodeB": "measured:zeusd@nodeB:cpu0",
            "dram:nodeB": "measured:zeusd@nodeB:dram0",
        }
        wait_for(lambda: settled(meter, a, "nodeA")() and settled(meter, b, "nodeB")(), what="both nodes to settle")
        e = meter.read().energy_j
        assert e["gpu:nodeA_0"] == pytest.approx(a.energy_sent_j("gpu", 0), abs=EXACT_J)
        assert e["gpu:nodeB_0"] == pytest.approx(b.energy_sent_j("gpu", 0), abs=EXACT_J)
        assert e["gpu:nodeB_1"] == pytest.approx(b.energy_sent_j("gpu", 1), abs=EXACT_J)
        assert e["cpu:nodeB"] == pytest.approx(b.energy_sent_j("cpu", 0), abs=EXACT_J)
        assert e["dram:nodeB"] == pytest.approx(b.energy_sent_j("cpu", 0, dram=True), abs=EXACT_J)
        assert e["gpu:nodeA_0"] == pytest.approx(300.0 * 0.6, rel=STEP_SLACK_S / 0.6)
        assert e["gpu:nodeB_1"] == pytest.approx(50.0 * 0.5, rel=STEP_SLACK_S / 0.5)
        # The package's records see every key in its group; per-GPU columns stay plain identifiers.
        prov = meter.components()
        assert {component_group(k) for k in prov} == {"gpu", "cpu", "dram"}
        assert all(is_measured(p) for p in prov.values())
        cols = EnergyColumns(prov)
        columns = cols.columns(e)
        per_gpu = sorted(c for c in columns if c.startswith("energy_gpu") and c != "energy_gpu_j")
        assert per_gpu == ["energy_gpunodeA_0_j", "energy_gpunodeB_0_j", "energy_gpunodeB_1_j"]
        assert all(re.fullmatch(r"[A-Za-z0-9_]+", c) for c in columns)
        assert columns["energy_gpu_j"] == pytest.approx(e["gpu:nodeA_0"] + e["gpu:nodeB_0"] + e["gpu:nodeB_1"])
        assert set(cols.column_provenance()) >= set(per_gpu)
        assert group_provenance(prov)["gpu"].startswith("measured:zeusd@nodeA:gpu0")


def test_nodes_named_after_hosts_stay_distinct(nodes):
    a, b = nodes(gpus={0: [(None, 10.0)]}), nodes(gpus={0: [(None, 20.0)]})
    with ZeusdMeter.from_urls([a.url, b.url], cpu=False) as meter:
        assert sorted(meter.components()) == sorted([f"gpu:127_0_0_1_{a.port}_0", f"gpu:127_0_0_1_{b.port}_0"])


def test_node_clock_offset_is_aligned_to_this_process(nodes):
    # The node's clock runs two hours behind; its 250 W step never ends, so the meter extrapolates the held
    # power up to each read: any error in the alignment shows up as joules.
    skew = -7200.25
    node = nodes(gpus={0: [(None, 250.0)]}, clock_offset_s=skew)
    with ZeusdMeter.from_urls([node.url], reconnect_delay_s=0.1) as meter:
        status = meter.node_status()["127_0_0_1"]
        bound = status["clock_offset_bound_s"]
        assert status["clock_skew_s"] == pytest.approx(skew, abs=bound + 0.01)
        wait_for(lambda: meter.node_status()["127_0_0_1"]["samples"] >= 1, what="the first sample")
        first = node.samples("gpu", 0)[0]
        # The sample lands on this process's monotonic clock where the double stamped it (double's record).
        aligned = meter.node_status()["127_0_0_1"]["last_sample_t"]
        assert aligned == pytest.approx(first.mono, abs=bound + 0.05)
        time.sleep(0.3)
        reading = meter.read()
        expected = 250.0 * (reading.t - first.mono)
        assert reading.energy_j["gpu:0"] == pytest.approx(expected, abs=250.0 * (bound + 0.05))


def test_node_that_disconnects_holds_its_joules_and_warns_once(nodes, caplog):
    caplog.set_level(logging.DEBUG)
    node = nodes(gpus={0: [(None, 200.0)]})
    with ZeusdMeter.from_urls({"node1": node.url}, reconnect_delay_s=0.05) as meter:
        wait_for(lambda: meter.node_status()["node1"]["samples"] >= 1, what="the first sample")
        time.sleep(0.2)
        killed_at = node.kill()
        wait_for(lambda: meter.gaps(), what="the gap to be recorded")
        first = meter.read()
        time.sleep(0.4)  # several reconnection attempts (every 0.05 s) fail meanwhile
        second = meter.read()
        assert second.energy_j == first.energy_j  # held, not extrapolated into the outage
        gap = meter.gaps()[0]
        assert (gap.node, gap.source, gap.reason, gap.end, gap.counted) == ("node1", "gpu", "disconnected", None, False)
        assert gap.start >= killed_at - 0.01
        # Joules up to the moment the stream ended: 200 W held from the first (aligned) sample.
        aligned_first = node.samples("gpu", 0)[0].mono
        assert first.energy_j["gpu:0"] == pytest.approx(200.0 * (gap.start - aligned_first), abs=200.0 * 0.05)
        ours = [r for r in caplog.records if r.name == "langchain_energy.meters.zeusd" and r.levelno >= logging.WARNING]
        assert len(ours) == 1 and "node1" in ours[0].getMessage()
        # Zeus's per-attempt reconnection warnings (each with a traceback) are demoted for the meter's nodes.
        assert not [r for r in caplog.records if r.name.startswith("zeus") and r.levelno >= logging.WARNING]
        assert meter.describe()["zeusd"]["gaps"] >= 1

        # The node comes back on the same port: the gap closes and joules count on from its first sample.
        node.start()
        wait_for(lambda: meter.gaps()[0].end is not None, what="the stream to resume")
        resumed = [s for s in node.samples("gpu", 0) if s.connection > 1][0]
        time.sleep(0.2)
        third = meter.read()
        assert third.energy_j["gpu:0"] == pytest.approx(
            first.energy_j["gpu:0"] + 200.0 * (third.t - resumed.mono), abs=200.0 * 0.05)
        assert len([r for r in caplog.records
                    if r.name == "langchain_energy.meters.zeusd" and r.levelno >= logging.WARNING]) == 1
    started = time.monotonic()
    meter.close()  # closing twice is harmless and quick
    assert time.monotonic() - started < 1.0


def test_silent_device_stops_extrapolating_then_backfills_on_the_same_connection(nodes):
    # zeusd sends only changes: a long silence on a live connection is constant power, counted once confirmed.
    node = nodes(gpus={0: [(0.8, 100.0), (None, 0.0)]})
    with ZeusdMeter.from_urls([node.url], max_silence_s=0.2, reconnect_delay_s=0.1) as meter:
        wait_for(lambda: meter.node_status()["127_0_0_1"]["samples"] >= 1, what="the first sample")
        time.sleep(0.4)
        during = meter.read().energy_j["gpu:0"]
        assert during <= 100.0 * (0.2 + 1e-6)  # held power stops after max_silence_s
        wait_for(settled(meter, node, "127_0_0_1"), what="the step to end")
        after = meter.read().energy_j["gpu:0"]
        assert after == pytest.approx(node.energy_sent_j("gpu", 0), abs=EXACT_J)
        gap = meter.gaps()[0]
        assert (gap.reason, gap.source, gap.counted) == ("silent", "gpu:0", True) and gap.end is not None


def test_auto_meter_takes_remote_components(nodes):
    node = nodes(gpus={0: [(None, 40.0)], 1: [(None, 60.0)]},
                 cpus={0: CpuProgram(cpu=[(None, 30.0)])})
    meter = auto_meter(zeusd=[node.url], gpu_indices=[1], dram="off")
    try:
        prov = meter.components()
        assert prov["gpu:1"] == "measured:zeusd@127_0_0_1:gpu1" and "gpu:0" not in prov
        assert prov["cpu"] == "measured:zeusd@127_0_0_1:cpu0"
        assert "dram" not in prov
        assert isinstance(meter, CompositeMeter)
        wait_for(lambda: meter.read().energy_j["gpu:1"] > 0, what="remote GPU joules")
    finally:
        meter.close()


@pytest.mark.parametrize("url", ["", "https://node1:4938", "ftp://node1", "http://node1:4938/metrics",
                                 "http://node1:port", "http://:4938", "unix://relative.sock"])
def test_bad_addresses_are_config_errors(url):
    with pytest.raises(ConfigError):
        parse_zeusd_url(url)


def test_address_forms():
    assert parse_zeusd_url("node1")[1].host_port == "node1:4938"
    assert parse_zeusd_url("gpu-7.example.org:5000") == ("gpu_7", parse_zeusd_url("http://gpu-7.example.org:5000")[1])
    assert parse_zeusd_url("unix:///run/zeusd/zeusd.sock")[1].socket_path == "/run/zeusd/zeusd.sock"
    with pytest.raises(ConfigError):
        ZeusdMeter.from_urls("http://node1:4938")  # one string, not a list
    with pytest.raises(ConfigError):
        ZeusdMeter({"bad name": parse_zeusd_url("node1")[1]})


def test_unreachable_node_or_missing_gpu_fails_at_construction(nodes):
    node = nodes(gpus={0: [(None, 1.0)]})
    port = node.port
    with pytest.raises(MeterError, match="gpu|GPU"):
        ZeusdMeter.from_urls([node.url], gpu_indices=[3])
    node.kill()
    with pytest.raises(MeterError, match="zeusd"):
        ZeusdMeter.from_urls([f"http://127.0.0.1:{port}"])
