"""langchain-energy: latency and energy of multi-request LLM workflows, from LangChain and LangGraph."""

from langchain_energy.backends.base import Completion, SamplingParams
from langchain_energy.backends.metrics import MetricsClient, MetricsSnapshot
from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer
from langchain_energy.errors import EnergyError
from langchain_energy.llms import ServingLLM
from langchain_energy.models import ModelSpec, resolve_model

__all__ = [
    "Completion",
    "EnergyError",
    "EngineConfig",
    "MetricsClient",
    "MetricsSnapshot",
    "ModelSpec",
    "SamplingParams",
    "ServingLLM",
    "VLLMServer",
    "resolve_model",
]
