"""Studio graph: one search session (input ``{"query": "...", "follow_ups": ["..."]}``)."""

from chains.workloads.search import build_search_graph
from graphs._llm import studio_llm

graph = build_search_graph(studio_llm, answer_tokens=64)
