"""Where joules come from: Zeus counters (NVML, RAPL), a labelled estimate, and a replay double for tests."""

from langchain_energy.meters.base import COMPONENTS, UNAVAILABLE, ManualClock, Meter, Reading, component_group
from langchain_energy.meters.composite import CompositeMeter, auto_meter
from langchain_energy.meters.estimated import EstimatedMeter, PowerModel
from langchain_energy.meters.replay import PowerTrace, ReplayMeter
from langchain_energy.meters.zeus_meter import ZeusMeter

__all__ = [
    "COMPONENTS",
    "UNAVAILABLE",
    "CompositeMeter",
    "EstimatedMeter",
    "ManualClock",
    "Meter",
    "PowerModel",
    "PowerTrace",
    "Reading",
    "ReplayMeter",
    "ZeusMeter",
    "auto_meter",
    "component_group",
]
