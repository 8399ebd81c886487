"""LLM-powered search: user sessions that share a ~3,000-token static system prompt.

Each session reformulates the user's query, answers it, then answers the session's follow-up
questions (2-8 calls per session with the bundled queries). Every prompt starts with the same system
prompt, which is what the engine's prefix cache reuses. Sessions run ``users`` at a time under one
root run.

Example:
    >>> from langchain_core.language_models.fake import FakeListLLM
    >>> wl = search_workload(FakeListLLM(responses=["ok"]), users=2)
    >>> import asyncio
    >>> len(asyncio.run(wl.ainvoke(load_queries(2))))
    2
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any, TypedDict

from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langgraph.graph import END, START, StateGraph

from chains.workloads.llm_utils import LLMSource, acall, ainvoke_many, positive_int, resolve_llm
from langchain_energy.errors import ConfigError, ContextLengthError, DataError

REFORMULATE_PROMPT = "{system}\n\n# REQUEST (query reformulation)\nQuery: {query}\nRewritten request:"
ANSWER_PROMPT = "{system}\n\n# REQUEST (answering)\nRequest: {request}\nQuestion: {query}\nAnswer:"
FOLLOW_UP_PROMPT = (
    "{system}\n\n# REQUEST (follow-up)\nEarlier question: {query}\n"
    "Earlier answer (excerpt): {excerpt}\nFollow-up: {follow_up}\nAnswer:"
)
# Keeps a follow-up prompt's size bounded whatever the answer length.
EXCERPT_CHARS = 400
REFORMULATE_TOKENS = 64
# Tokens beyond the system prompt and the answer: question, reformulated request or excerpt, template.
PROMPT_OVERHEAD_TOKENS = 256


@lru_cache(maxsize=1)
def system_prompt() -> str:
    """The static system prompt (role, safety guidelines, domain instructions, examples)."""
    return resources.files("chains.workloads").joinpath("data/search_system_prompt.txt").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _all_queries() -> tuple[dict, ...]:
    raw = resources.files("chains.workloads").joinpath("data/search_queries.json").read_text(encoding="utf-8")
    return tuple(json.loads(raw))


def load_queries(n: int | None = None, *, max_follow_ups: int | None = None) -> list[dict]:
    """The bundled queries (64, across 15 topics), each ``{id, topic, query, follow_ups}``.

    Args:
        n: how many; picked evenly across the list so that a small run still spans the topics.
        max_follow_ups: cap on follow-ups per session (a session makes 2 + follow-ups calls).
    """
    queries = [dict(q) for q in _all_queries()]
    if n is not None:
        positive_int("number of queries", n)
        if n > len(queries):
            raise ConfigError(f"there are {len(queries)} bundled queries; asked for {n}")
        queries = [queries[i * len(queries) // n] for i in range(n)]
    if max_follow_ups is not None:
        if max_follow_ups < 0:
            raise ConfigError(f"max_follow_ups must be >= 0, got {max_follow_ups}")
        for q in queries:
            q["follow_ups"] = list(q["follow_ups"])[:max_follow_ups]
    return queries


def check_fits_context(answer_tokens: int, max_model_len: int, count_tokens=None) -> None:
    """Refuse an answer length that cannot fit after the system prompt in the model's context."""
    if max_model_len <= 0:
        return
    prompt_tokens = count_tokens(system_prompt()) if count_tokens else 3100
    need = prompt_tokens + PROMPT_OVERHEAD_TOKENS + answer_tokens
    if need > max_model_len:
        raise ContextLengthError(
            f"output length {answer_tokens} does not fit: a search call needs the {prompt_tokens}-token system "
            f"prompt + question + answer = {need} tokens but the model's context is {max_model_len}; use an output "
            f"length of at most {max(max_model_len - prompt_tokens - PROMPT_OVERHEAD_TOKENS, 0)}"
        )


class SearchState(TypedDict, total=False):
    """State of one user session.

    Attributes:
        query: the user's question.
        follow_ups: the follow-up questions the user will ask, in order.
        request: the reformulated search request.
        answers: every answer so far (first the main answer, then one per follow-up).
        turn: follow-ups answered so far.
        calls: LLM calls made so far (the loop's explicit bound).
        max_calls: the most LLM calls in this session (8 in the study).
        answer_tokens: cap on each answer.
    """

    query: str
    follow_ups: list[str]
    request: str
    answers: list[str]
    turn: int
    calls: int
    max_calls: int
    answer_tokens: int


def build_search_graph(llm: LLMSource, *, answer_tokens: int = 256, max_calls: int = 8):
    """One search session as a compiled LangGraph graph: reformulate -> answer -> follow_up (loop).

    Args:
        llm: a language model, or a function ``config -> model`` called at run time.
        answer_tokens: default cap on each answer (the state may override it).
        max_calls: default bound on calls per session (the state may override it).
    """
    positive_int("answer_tokens", answer_tokens)
    positive_int("max_calls", max_calls)
    system = system_prompt()

    async def reformulate(state: SearchState, config: RunnableConfig) -> dict:
        model = resolve_llm(llm, config)
        text = await acall(
            model,
            REFORMULATE_PROMPT.format(system=system, query=state["query"]),
            max_tokens=REFORMULATE_TOKENS,
            role="reformulate",
            config=config,
        )
        # One line is the contract of this mode; a chatty model's extra lines are dropped.
        request = text.strip().splitlines()[0] if text.strip() else state["query"]
        return {
            "request": request,
            "answers": [],
            "turn": 0,
            "calls": 1,
            "follow_ups": list(state.get("follow_ups") or []),
            "max_calls": state.get("max_calls") or max_calls,
            "answer_tokens": state.get("answer_tokens") or answer_tokens,
        }

    async def answer(state: SearchState, config: RunnableConfig) -> dict:
        model = resolve_llm(llm, config)
        prompt = ANSWER_PROMPT.format(system=system, request=state["request"], query=state["query"])
        text = await acall(model, prompt, max_tokens=state["answer_tokens"], role="answer", config=config)
        return {"answers": [text.strip()], "calls": state["calls"] + 1}

    async def follow_up(state: SearchState, config: RunnableConfig) -> dict:
        model = resolve_llm(llm, config)
        turn = state["turn"]
        prompt = FOLLOW_UP_PROMPT.format(
            system=system,
            query=state["query"],
            excerpt=state["answers"][-1][:EXCERPT_CHARS],
            follow_up=state["follow_ups"][turn],
        )
        text = await acall(model, prompt, max_tokens=state["answer_tokens"], role="follow_up", config=config)
        return {"answers": state["answers"] + [text.strip()], "turn": turn + 1, "calls": state["calls"] + 1}

    def more(state: SearchState) -> str:
        if state["turn"] < len(state["follow_ups"]) and state["calls"] < state["max_calls"]:
            return "follow_up"
        return END

    builder = StateGraph(SearchState)
    builder.add_node("reformulate", reformulate)
    builder.add_node("answer", answer)
    builder.add_node("follow_up", follow_up)
    builder.add_edge(START, "reformulate")
    builder.add_edge("reformulate", "answer")
    builder.add_conditional_edges("answer", more, ["follow_up", END])
    builder.add_conditional_edges("follow_up", more, ["follow_up", END])
    return builder.compile(name="search_session")


def search_workload(llm: LLMSource, *, answer_tokens: int = 256, max_calls: int = 8, users: int = 8) -> Runnable:
    """The search workload: sessions ``users`` at a time under one root run.

    Input: a list of queries as returned by `load_queries` (dicts with ``query`` and ``follow_ups``).
    Output: each session's answers, in input order.
    """
    positive_int("users", users)
    graph = build_search_graph(llm, answer_tokens=answer_tokens, max_calls=max_calls)

    async def run(queries: Sequence[dict[str, Any]], config: RunnableConfig) -> list[list[str]]:
        if not queries:
            raise DataError("no queries to run")
        inputs = [{"query": q["query"], "follow_ups": list(q.get("follow_ups", []))} for q in queries]
        states = await ainvoke_many(graph, inputs, config, users)
        return [s["answers"] for s in states]

    return RunnableLambda(run, name="search")


def expected_calls(queries: Sequence[dict], max_calls: int = 8) -> int:
    """How many LLM calls the workload makes for these queries."""
    return sum(min(2 + len(q.get("follow_ups", [])), max_calls) for q in queries)
