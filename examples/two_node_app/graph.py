"""A small user app to meter: a two-node LangGraph graph (draft an answer, then tighten it).

Measure it as any user would, without changing it:

    python -m chains.run measure examples/two_node_app/graph.py:make_graph \
        --inputs examples/two_node_app/questions.jsonl --users 2 --output-len 48

``make_graph`` is a factory: the harness calls it with the chat model bound to the trial's engine.
"""

from __future__ import annotations

from typing import TypedDict

from langchain_core.language_models import BaseChatModel
from langgraph.graph import END, START, StateGraph


class State(TypedDict, total=False):
    """The question in; the draft and the final answer out."""

    question: str
    draft: str
    answer: str


def make_graph(model: BaseChatModel):
    """The compiled two-node graph on ``model``."""

    def draft(state: State) -> State:
        reply = model.invoke(f"Answer in two sentences: {state['question']}")
        return {"draft": str(reply.content)}

    def tighten(state: State) -> State:
        reply = model.invoke(f"Shorten this answer to one sentence, keeping its facts: {state['draft']}")
        return {"answer": str(reply.content)}

    builder = StateGraph(State)
    builder.add_node("draft", draft)
    builder.add_node("tighten", tighten)
    builder.add_edge(START, "draft")
    builder.add_edge("draft", "tighten")
    builder.add_edge("tighten", END)
    return builder.compile(name="two_node_app")
