"""The composite workload: summarization and search at once, on one engine.

`run_trial` starts the two workloads as separate root runs so an energy handler attributes each one
separately. For LangGraph Studio, `build_composite_graph` runs one document's refine loop and one
search session as parallel branches of one graph.
"""

from __future__ import annotations

from typing import TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph

from chains.workloads.llm_utils import LLMSource
from chains.workloads.search import build_search_graph
from chains.workloads.summarize import build_summarize_graph


class CompositeState(TypedDict, total=False):
    """Inputs of both sides and their results."""

    document: str
    query: str
    follow_ups: list[str]
    summary: str
    answers: list[str]


def build_composite_graph(llm: LLMSource, *, summary_tokens: int = 64, answer_tokens: int = 64,
                          chunk_tokens: int = 256, max_calls: int = 8):
    """``summarize`` and ``search`` branches from START, in parallel, joined at END.

    Example:
        >>> from langchain_core.language_models.fake import FakeListLLM
        >>> g = build_composite_graph(FakeListLLM(responses=["x"]))
        >>> sorted(g.get_graph().nodes)
        ['__end__', '__start__', 'search', 'summarize']
    """
    summarize_graph = build_summarize_graph(llm, summary_tokens=summary_tokens, chunk_tokens=chunk_tokens,
                                            max_calls=max_calls)
    search_graph = build_search_graph(llm, answer_tokens=answer_tokens)

    async def summarize(state: CompositeState, config: RunnableConfig) -> dict:
        out = await summarize_graph.ainvoke({"document": state.get("document", "")}, config)
        return {"summary": out["summary"]}

    async def search(state: CompositeState, config: RunnableConfig) -> dict:
        out = await search_graph.ainvoke({"query": state.get("query", ""), "follow_ups": state.get("follow_ups", [])},
                                         config)
        return {"answers": out["answers"]}

    builder = StateGraph(CompositeState)
    builder.add_node("summarize", summarize)
    builder.add_node("search", search)
    builder.add_edge(START, "summarize")
    builder.add_edge(START, "search")
    builder.add_edge("summarize", END)
    builder.add_edge("search", END)
    return builder.compile(name="composite")
