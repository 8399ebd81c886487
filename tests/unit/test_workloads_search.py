"""The search workload: the shared system prompt, the query set, sessions of 2-8 calls."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.language_models.fake import FakeListLLM

from chains.workloads.search import build_search_graph, check_fits_context, expected_calls, load_queries, search_workload, system_prompt
from langchain_energy.errors import ConfigError, ContextLengthError
from tests.unit._workload_helpers import PromptRecorder, embedded_counter


def test_system_prompt_is_about_3000_tokens_with_the_promised_sections():
    n = embedded_counter()(system_prompt())
    assert 2800 <= n <= 3300
    for section in ("# ROLE", "# SAFETY GUIDELINES", "# DOMAIN INSTRUCTIONS", "# EXAMPLES"):
        assert section in system_prompt()


def test_64_diverse_queries_with_sessions_of_2_to_8_calls():
    queries = load_queries()
    assert len(queries) == 64
    assert len({q["query"] for q in queries}) == 64
    topics = {q["topic"] for q in queries}
    assert {"ai", "iot", "energy", "biology"} <= topics and len(topics) >= 10
    calls = [2 + len(q["follow_ups"]) for q in queries]
    assert min(calls) == 2 and max(calls) == 8


def test_a_small_selection_spans_topics_and_caps_follow_ups():
    queries = load_queries(8, max_follow_ups=1)
    assert len(queries) == 8 and len({q["topic"] for q in queries}) >= 6
    assert all(len(q["follow_ups"]) <= 1 for q in queries)
    with pytest.raises(ConfigError):
        load_queries(65)


def test_session_reformulates_answers_then_follows_up_all_with_the_shared_prefix():
    rec = PromptRecorder()
    graph = build_search_graph(FakeListLLM(responses=["better query\nextra line", "answer one", "answer two"]))
    out = asyncio.run(graph.ainvoke({"query": "what is mqtt", "follow_ups": ["is it secure"]}, {"callbacks": [rec]}))
    assert out["calls"] == 3 and out["request"] == "better query"
    assert out["answers"] == ["answer one", "answer two"]
    assert rec.roles() == ["reformulate", "answer", "follow_up"]
    prefix = system_prompt()
    assert all(c["prompt"].startswith(prefix) for c in rec.calls)
    assert "better query" in rec.calls[1]["prompt"]
    assert "answer one" in rec.calls[2]["prompt"] and "is it secure" in rec.calls[2]["prompt"]


def test_session_loop_is_bounded_by_max_calls():
    graph = build_search_graph(FakeListLLM(responses=["x"]), max_calls=4)
    out = asyncio.run(graph.ainvoke({"query": "q", "follow_ups": [f"f{i}" for i in range(6)]}))
    assert out["calls"] == 4 and out["turn"] == 2


def test_workload_runs_every_session():
    rec = PromptRecorder()
    queries = load_queries(5)
    out = asyncio.run(search_workload(FakeListLLM(responses=["x"]), users=3).ainvoke(queries, {"callbacks": [rec]}))
    assert len(out) == 5
    assert len(rec.calls) == expected_calls(queries)


def test_answer_length_that_cannot_fit_is_refused():
    with pytest.raises(ContextLengthError, match="at most"):
        check_fits_context(2000, 4096, embedded_counter())
    check_fits_context(800, 4096, embedded_counter())
