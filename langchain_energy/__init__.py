"""langchain-energy: latency and energy of multi-request LLM workflows, from LangChain and LangGraph."""

from langchain_energy.attribution import Span, attribute
from langchain_energy.backends.base import Completion, SamplingParams
from langchain_energy.backends.metrics import MetricsClient, MetricsSnapshot
from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer
from langchain_energy.callbacks import EnergyCallbackHandler, energy_callback
from langchain_energy.chat_models import ChatServing
from langchain_energy.errors import EnergyError
from langchain_energy.llms import ServingLLM
from langchain_energy.meters import EstimatedMeter, PowerModel, ReplayMeter, ZeusMeter, auto_meter
from langchain_energy.models import ModelSpec, resolve_model
from langchain_energy.scheduling import WorkflowScheduler
from langchain_energy.timeline import Timeline

__all__ = [
    "ChatServing",
    "Completion",
    "EnergyBudgetMiddleware",
    "EnergyCallbackHandler",
    "EnergyError",
    "EngineConfig",
    "EstimatedMeter",
    "MetricsClient",
    "MetricsSnapshot",
    "ModelSpec",
    "PowerModel",
    "ReplayMeter",
    "SamplingParams",
    "ServingLLM",
    "Span",
    "Timeline",
    "VLLMServer",
    "WorkflowScheduler",
    "ZeusMeter",
    "attribute",
    "auto_meter",
    "energy_callback",
    "resolve_model",
]


def __getattr__(name: str) -> object:
    # The agent middleware needs the `langchain` package (agents); importing it only when asked keeps the
    # handler and the models importable where only langchain-core is installed.
    if name == "EnergyBudgetMiddleware":
        from langchain_energy.middleware import EnergyBudgetMiddleware

        return EnergyBudgetMiddleware
    raise AttributeError(f"module 'langchain_energy' has no attribute {name!r}")
