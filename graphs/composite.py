"""Studio graph: summarization and search branches at once (input ``{"document": ..., "query": ...}``)."""

from chains.workloads.composite import build_composite_graph
from graphs._llm import studio_llm

graph = build_composite_graph(studio_llm)
