"""The refine summarization workload: chunking, the bounded loop, the graph's shape."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.language_models.fake import FakeListLLM

from chains.workloads.summarize import (
    INITIAL_PROMPT,
    REFINE_PROMPT,
    build_summarize_graph,
    check_fits_context,
    chunk_document,
    expected_calls,
    summarize_workload,
)
from langchain_energy.errors import ConfigError, ContextLengthError, DataError
from tests.unit._workload_helpers import PromptRecorder, embedded_counter, words

TEXT = "\n\n".join(f"Paragraph {i} " + "word " * 40 for i in range(30))


def test_prompts_have_the_placeholders_the_parrot_path_relies_on():
    assert INITIAL_PROMPT.format(text="T").count("T") >= 1
    out = REFINE_PROMPT.format(existing_summary="S", text="T")
    assert "S" in out and "T" in out


def test_chunks_respect_the_token_size_and_keep_the_text_in_order():
    chunks = chunk_document(TEXT, chunk_tokens=100, count_tokens=words)
    assert all(words(c) <= 100 for c in chunks)
    assert len(chunks) >= 12
    assert " ".join(" ".join(chunks).split()) == " ".join(TEXT.split())


def test_chunks_by_the_served_models_tokenizer():
    count = embedded_counter()
    chunks = chunk_document(TEXT * 3, chunk_tokens=120, count_tokens=count)
    assert max(map(count, chunks)) <= 120
    # Chunks are packed, not one per paragraph.
    assert sum(map(count, chunks)) / len(chunks) > 60


def test_input_cap_drops_chunks_beyond_it():
    chunks = chunk_document(TEXT, chunk_tokens=100, count_tokens=words, max_input_tokens=250)
    assert sum(map(words, chunks)) <= 250
    assert len(chunks) == 2
    assert chunks == chunk_document(TEXT, chunk_tokens=100, count_tokens=words)[:2]


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_document_is_refused(text):
    with pytest.raises(DataError, match="empty"):
        chunk_document(text, chunk_tokens=10, count_tokens=words)


def test_bad_sizes_are_refused():
    with pytest.raises(ConfigError):
        chunk_document(TEXT, chunk_tokens=0, count_tokens=words)
    with pytest.raises(ConfigError):
        build_summarize_graph(FakeListLLM(responses=["x"]), max_calls=0)


def test_chunk_above_the_context_is_refused_with_the_largest_that_fits():
    with pytest.raises(ContextLengthError, match="at most 3904"):
        check_fits_context(8000, 48, 4096)
    check_fits_context(3904, 48, 4096)


def test_refine_loop_calls_once_per_chunk_and_feeds_the_summary_forward():
    llm = FakeListLLM(responses=["summary-1", "summary-2", "summary-3"])
    rec = PromptRecorder()
    graph = build_summarize_graph(llm, summary_tokens=17)
    out = asyncio.run(graph.ainvoke({"chunks": ["alpha", "beta", "gamma"]}, {"callbacks": [rec]}))
    assert out["calls"] == 3 and out["summary"] == "summary-3"
    assert rec.roles() == ["summarize", "refine", "refine"]
    assert "alpha" in rec.calls[0]["prompt"]
    assert "summary-1" in rec.calls[1]["prompt"] and "beta" in rec.calls[1]["prompt"]
    assert "summary-2" in rec.calls[2]["prompt"] and "gamma" in rec.calls[2]["prompt"]
    # The summary budget travels as each call's max_tokens.
    assert all(c["metadata"].get("ls_max_tokens") == 17 for c in rec.calls)


def test_loop_is_bounded_by_the_explicit_counter():
    graph = build_summarize_graph(FakeListLLM(responses=["s"]), max_calls=4)
    out = asyncio.run(graph.ainvoke({"chunks": [f"c{i}" for i in range(10)]}))
    assert out["calls"] == 4 and out["index"] == 4
    assert expected_calls([[f"c{i}" for i in range(10)]], 4) == 4


def test_graph_structure_is_chunk_then_first_then_refine_loop():
    g = build_summarize_graph(FakeListLLM(responses=["s"])).get_graph()
    edges = {(e.source, e.target) for e in g.edges}
    assert ("__start__", "chunk") in edges and ("chunk", "summarize_first") in edges
    assert ("refine", "refine") in edges and ("summarize_first", "refine") in edges
    assert ("refine", "__end__") in edges


def test_workload_runs_documents_concurrently_under_one_root():
    rec = PromptRecorder()
    docs = [["a1", "a2"], ["b1", "b2", "b3"], ["c1"]]
    wl = summarize_workload(FakeListLLM(responses=["s"]), users=3)
    out = asyncio.run(wl.ainvoke(docs, {"callbacks": [rec]}))
    assert out == ["s", "s", "s"]
    assert len(rec.calls) == expected_calls(docs) == 6


def test_workload_refuses_no_documents():
    with pytest.raises(DataError):
        asyncio.run(summarize_workload(FakeListLLM(responses=["s"])).ainvoke([]))
