"""Where joules come from: Zeus counters (NVML, RAPL), remote nodes' zeusd streams, a labelled estimate, and a replay
double for tests."""

from langchain_energy.meters.base import (
    COMPONENTS,
    UNAVAILABLE,
    ManualClock,
    Meter,
    MonotonicGuard,
    MonotonicMeter,
    Reading,
    component_group,
)
from langchain_energy.meters.composite import CompositeMeter, auto_meter
from langchain_energy.meters.estimated import CPU_SCOPES, CpuScope, EstimatedMeter, PowerModel, ProcessTreeCPU
from langchain_energy.meters.replay import PowerTrace, ReplayMeter
from langchain_energy.meters.served import forget_served_gpus, serve_on_gpus, served_gpus
from langchain_energy.meters.zeus_meter import ZeusMeter
from langchain_energy.meters.zeusd import ZeusdGap, ZeusdMeter, parse_zeusd_url

__all__ = [
    "COMPONENTS",
    "CPU_SCOPES",
    "UNAVAILABLE",
    "CompositeMeter",
    "CpuScope",
    "EstimatedMeter",
    "ManualClock",
    "Meter",
    "MonotonicGuard",
    "MonotonicMeter",
    "PowerModel",
    "PowerTrace",
    "ProcessTreeCPU",
    "Reading",
    "ReplayMeter",
    "ZeusMeter",
    "ZeusdGap",
    "ZeusdMeter",
    "auto_meter",
    "forget_served_gpus",
    "serve_on_gpus",
    "served_gpus",
    "component_group",
    "parse_zeusd_url",
]
