"""Studio graph: multi-agent coding of one task (input ``{"task": "snake"}``; ``rounds``, caps optional)."""

from chains.workloads.agentic import build_agentic_graph
from graphs._llm import studio_llm

# CPU-sized caps by default; set code_tokens/review_tokens in the input for full-size runs.
graph = build_agentic_graph(studio_llm, rounds=2, code_tokens=64, review_tokens=32)
