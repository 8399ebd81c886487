"""Studio graph: refine summarization of one document (input ``{"document": text, "chunk_tokens": 256}``)."""

from chains.workloads.summarize import build_summarize_graph
from graphs._llm import studio_llm

# Short answers and chunks by default, so a run on the embedded CPU engine stays interactive.
graph = build_summarize_graph(studio_llm, summary_tokens=64, chunk_tokens=256, max_calls=8)
