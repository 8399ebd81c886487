"""Document chain summarization (refine), as a LangGraph graph and as a workload runnable.

One document: split into chunks of at most ``chunk_tokens`` tokens of the served model's tokenizer,
summarize the first chunk, then refine the running summary with each next chunk. Every call is
capped at ``summary_tokens`` (the budget of the evolving summary), and the loop is bounded by an
explicit call counter in the state (``max_calls``), not by LangGraph's recursion limit.

The workload runs many documents at once (``users`` concurrent documents) under one root run, so
an energy handler sees one workflow.

Example:
    >>> from langchain_core.language_models.fake import FakeListLLM
    >>> graph = build_summarize_graph(FakeListLLM(responses=["s1", "s2"]))
    >>> import asyncio
    >>> asyncio.run(graph.ainvoke({"chunks": ["a", "b"]}))["summary"]
    's2'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict

from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_text_splitters import RecursiveCharacterTextSplitter
from langgraph.graph import END, START, StateGraph

from chains.workloads.llm_utils import LLMSource, acall, ainvoke_many, positive_int, resolve_llm
from langchain_energy.errors import ConfigError, DataError

# Plain format strings: the Parrot path submits the same refine chain as semantic calls.
INITIAL_PROMPT = (
    "Write a concise summary of the following text. Keep the key facts, names and numbers.\n\n"
    "Text:\n{text}\n\n"
    "Concise summary:"
)
REFINE_PROMPT = (
    "You are refining a summary of a long document, one part at a time.\n"
    "Summary so far:\n{existing_summary}\n\n"
    "Next part of the document:\n{text}\n\n"
    "Rewrite the summary so that it also covers the new part. Keep it concise and keep what still "
    "matters from the summary so far.\n\n"
    "Refined summary:"
)

# Tokens the templates themselves add around the chunk and the summary (measured with the embedded
# tokenizer, rounded up): used to check that a chunk fits in the model's context.
PROMPT_OVERHEAD_TOKENS = 96

DEFAULT_MAX_CALLS = 40


def hf_token_counter(tokenizer: Any) -> Callable[[str], int]:
    """A token counter from a Hugging Face tokenizer (no special tokens)."""
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def chunk_document(
    text: str,
    *,
    chunk_tokens: int,
    count_tokens: Callable[[str], int],
    max_input_tokens: int | None = None,
) -> list[str]:
    """Split a document into chunks of at most ``chunk_tokens`` tokens, at paragraph/line boundaries.

    Args:
        text: the document.
        chunk_tokens: the input-length knob: the most tokens in one chunk.
        count_tokens: the served model's token counter (see `hf_token_counter`).
        max_input_tokens: cap on the document's tokens; chunks past the cap are dropped.

    Returns:
        The chunks, in order; never empty.

    Raises:
        DataError: the text is empty.
        ConfigError: a size is not a positive integer.

    Example:
        >>> chunk_document("one two three four", chunk_tokens=2, count_tokens=lambda s: len(s.split()))
        ['one two', 'three four']
    """
    positive_int("chunk_tokens", chunk_tokens)
    if max_input_tokens is not None:
        positive_int("max_input_tokens", max_input_tokens)
    if not text or not text.strip():
        raise DataError("the document is empty; nothing to summarize")
    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_tokens, chunk_overlap=0, length_function=count_tokens)
    if max_input_tokens is None:
        return [c for c in splitter.split_text(text) if c.strip()]
    # Split only a prefix comfortably longer than the cap (a 36k-token cap on a long book would
    # otherwise tokenize the whole book); every chunk kept below lies inside it.
    need = max_input_tokens + 2 * chunk_tokens
    end = min(len(text), 4 * need)
    while end < len(text) and count_tokens(text[:end]) < need:
        end = min(len(text), 2 * end)
    chunks = [c for c in splitter.split_text(text[:end]) if c.strip()]
    kept: list[str] = []
    total = 0
    for chunk in chunks:
        n = count_tokens(chunk)
        if kept and total + n > max_input_tokens:
            break
        kept.append(chunk)
        total += n
    return kept


def check_fits_context(chunk_tokens: int, summary_tokens: int, max_model_len: int) -> None:
    """Refuse a chunk length whose refine prompt plus answer cannot fit in the model's context.

    Raises:
        ContextLengthError: with the numbers and the largest chunk length that fits.
    """
    from langchain_energy.errors import ContextLengthError

    if max_model_len <= 0:
        return  # unknown context (a hub model): the server will say
    need = chunk_tokens + 2 * summary_tokens + PROMPT_OVERHEAD_TOKENS
    if need > max_model_len:
        fit = max_model_len - 2 * summary_tokens - PROMPT_OVERHEAD_TOKENS
        raise ContextLengthError(
            f"input length {chunk_tokens} tokens does not fit: a refine call needs chunk + summary so far + "
            f"answer + template = {need} tokens but the model's context is {max_model_len}; "
            f"use an input length of at most {max(fit, 0)}"
        )


class SummarizeState(TypedDict, total=False):
    """State of one document's refine loop.

    Attributes:
        document: raw text, chunked on entry when ``chunks`` is not given (Studio input).
        chunk_tokens: chunk size for that in-graph chunking.
        chunks: the chunks to summarize, in order.
        index: the next chunk to read.
        summary: the evolving summary.
        calls: LLM calls made so far (the loop's explicit bound).
        max_calls: the most LLM calls for this document (2-40 in the study).
        summary_tokens: the token budget of each call's answer (the evolving summary).
    """

    document: str
    chunk_tokens: int
    chunks: list[str]
    index: int
    summary: str
    calls: int
    max_calls: int
    summary_tokens: int


def build_summarize_graph(
    llm: LLMSource,
    *,
    summary_tokens: int = 128,
    max_calls: int = DEFAULT_MAX_CALLS,
    chunk_tokens: int = 1000,
):
    """The refine loop for one document as a compiled LangGraph graph.

    Nodes: ``chunk`` (only splits when given a raw ``document``), ``summarize_first``, ``refine``;
    ``refine`` loops on itself while chunks remain and ``calls < max_calls``.

    Args:
        llm: a language model, or a function ``config -> model`` called at run time.
        summary_tokens: default cap on each answer (the state may override it).
        max_calls: default bound on LLM calls per document (the state may override it).
        chunk_tokens: default chunk size for in-graph chunking of a raw document.
    """
    positive_int("summary_tokens", summary_tokens)
    positive_int("max_calls", max_calls)

    def chunk(state: SummarizeState, config: RunnableConfig) -> dict:
        defaults = {
            "index": 0,
            "calls": 0,
            "summary": "",
            "max_calls": state.get("max_calls") or max_calls,
            "summary_tokens": state.get("summary_tokens") or summary_tokens,
        }
        if state.get("chunks"):
            return defaults
        document = state.get("document") or ""
        model = resolve_llm(llm, config)
        size = state.get("chunk_tokens") or chunk_tokens
        return {**defaults, "chunks": chunk_document(document, chunk_tokens=size, count_tokens=model.get_num_tokens)}

    async def summarize_first(state: SummarizeState, config: RunnableConfig) -> dict:
        model = resolve_llm(llm, config)
        text = await acall(
            model,
            INITIAL_PROMPT.format(text=state["chunks"][0]),
            max_tokens=state["summary_tokens"],
            role="summarize",
            config=config,
        )
        return {"summary": text.strip(), "index": 1, "calls": state["calls"] + 1}

    async def refine(state: SummarizeState, config: RunnableConfig) -> dict:
        model = resolve_llm(llm, config)
        i = state["index"]
        prompt = REFINE_PROMPT.format(existing_summary=state["summary"], text=state["chunks"][i])
        text = await acall(model, prompt, max_tokens=state["summary_tokens"], role="refine", config=config)
        # A model that returns nothing keeps the old summary rather than losing it.
        return {"summary": text.strip() or state["summary"], "index": i + 1, "calls": state["calls"] + 1}

    def more(state: SummarizeState) -> str:
        if state["index"] < len(state["chunks"]) and state["calls"] < state["max_calls"]:
            return "refine"
        return END

    builder = StateGraph(SummarizeState)
    builder.add_node("chunk", chunk)
    builder.add_node("summarize_first", summarize_first)
    builder.add_node("refine", refine)
    builder.add_edge(START, "chunk")
    builder.add_edge("chunk", "summarize_first")
    builder.add_conditional_edges("summarize_first", more, ["refine", END])
    builder.add_conditional_edges("refine", more, ["refine", END])
    return builder.compile(name="summarize_document")


def summarize_workload(
    llm: LLMSource,
    *,
    summary_tokens: int = 128,
    max_calls: int = DEFAULT_MAX_CALLS,
    users: int = 1,
) -> Runnable:
    """The summarization workload: many chunked documents, ``users`` of them at a time, one root run.

    Input: a list of documents, each a list of chunks (see `chunk_document`). Output: the list of
    final summaries, in input order.

    Example:
        >>> from langchain_core.language_models.fake import FakeListLLM
        >>> wl = summarize_workload(FakeListLLM(responses=["x"]), users=2)
        >>> import asyncio
        >>> asyncio.run(wl.ainvoke([["a"], ["b", "c"]]))
        ['x', 'x']
    """
    positive_int("users", users)
    graph = build_summarize_graph(llm, summary_tokens=summary_tokens, max_calls=max_calls)

    async def run(documents: Sequence[Sequence[str]], config: RunnableConfig) -> list[str]:
        if not documents:
            raise DataError("no documents to summarize")
        inputs = [{"chunks": list(chunks)} for chunks in documents]
        if any(not s["chunks"] for s in inputs):
            raise DataError("a document has no chunks; chunk it with chunk_document first")
        states = await ainvoke_many(graph, inputs, config, users)
        return [s["summary"] for s in states]

    return RunnableLambda(run, name="summarize")


def expected_calls(documents: Sequence[Sequence[str]], max_calls: int = DEFAULT_MAX_CALLS) -> int:
    """How many LLM calls the workload makes for these chunked documents."""
    if max_calls < 1:
        raise ConfigError(f"max_calls must be at least 1, got {max_calls}")
    return sum(min(len(chunks), max_calls) for chunks in documents)
