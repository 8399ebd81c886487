"""The summarization workload on Parrot: each document's refine chain as one DAG of semantic calls.

The same prompts and chunks as `chains.workloads.summarize`; the difference is who drives the loop. There, the client
sends each refine call after reading the previous summary. Here, every call of a document is submitted up
front and each refine call's ``existing_summary`` is the previous call's output *variable*, so Parrot resolves
it inside ServeCore and its scheduler sees the whole chain. Each call still appears in LangChain callbacks as
an LLM run (tagged ``role:summarize`` / ``role:refine``), under one root run for the workload.

Example:
    >>> wl = summarize_parrot_workload("http://127.0.0.1:9000", "smollm2-135m", tokenizer=model_dir)  # doctest: +SKIP
    >>> wl.invoke([["chunk one", "chunk two"]], config={"callbacks": [handler]})  # doctest: +SKIP
    ['...final summary...']
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda

from chains.workloads.llm_utils import positive_int
from chains.workloads.summarize import DEFAULT_MAX_CALLS, INITIAL_PROMPT, REFINE_PROMPT
from langchain_energy._loop import run_sync
from langchain_energy.backends.base import SamplingParams
from langchain_energy.backends.parrot import ParrotClient, TokenCounter, resolve_token_counter
from langchain_energy.backends.parrot_program import ProgramResult, SemanticProgram
from langchain_energy.errors import DataError


def build_refine_program(
    chunks: Sequence[str],
    params: SamplingParams,
    *,
    max_calls: int = DEFAULT_MAX_CALLS,
    name: str = "summarize_document",
) -> SemanticProgram:
    """One document's refine chain as semantic calls: ``initial`` then ``refine_1`` ... each fed the last output.

    Raises:
        DataError: no chunks.
    """
    positive_int("max_calls", max_calls)
    if not chunks:
        raise DataError("a document has no chunks; chunk it with chunks.summarize.chunk_document first")
    program = SemanticProgram(name)
    summary = program.call("initial", INITIAL_PROMPT, {"text": chunks[0]}, params,
                           tags=["role:summarize"], metadata={"role": "summarize"})
    for i, chunk in enumerate(chunks[1:max_calls], start=1):
        summary = program.call(f"refine_{i}", REFINE_PROMPT, {"existing_summary": summary, "text": chunk}, params,
                               tags=["role:refine"], metadata={"role": "refine"})
    return program


async def arun_summarize_parrot(
    documents: Sequence[Sequence[str]],
    *,
    base_url: str,
    model: str,
    tokenizer: Any = None,
    summary_tokens: int = 128,
    max_calls: int = DEFAULT_MAX_CALLS,
    users: int = 1,
    temperature: float = 0.7,
    top_p: float = 1.0,
    ignore_eos: bool = False,
    criteria: str = "latency",
    timeout_s: float = 600.0,
    config: RunnableConfig | None = None,
) -> list[ProgramResult]:
    """Summarize chunked documents on Parrot, ``users`` documents at a time, each its own semantic DAG.

    Args:
        documents: each a list of chunks (`chains.workloads.summarize.chunk_document`).
        base_url: ServeCore's address.
        model: the engine's served model name.
        tokenizer: the served model's tokenizer or model directory (None: from ``model``'s registry name).
        summary_tokens: the cap on each call's answer.
        max_calls: the most calls per document.
        users: documents in flight at once.
        temperature: sampling temperature.
        top_p: nucleus sampling.
        ignore_eos: generate exactly ``summary_tokens`` (Parrot's engine, as `ParrotStack` runs it, forwards it to vLLM).
        criteria: Parrot's get criterion, "latency" or "throughput".
        timeout_s: seconds each call may take once submitted.
        config: the run's LangChain config (its callbacks meter every call).

    Returns:
        One `ProgramResult` per document, in input order (``.final`` is the summary).
    """
    positive_int("users", users)
    if not documents:
        raise DataError("no documents to summarize")
    params = SamplingParams(max_tokens=summary_tokens, temperature=temperature, top_p=top_p, ignore_eos=ignore_eos)
    programs = [build_refine_program(chunks, params, max_calls=max_calls) for chunks in documents]
    counter: TokenCounter = resolve_token_counter(tokenizer, model)
    callbacks = (config or {}).get("callbacks")
    gate = asyncio.Semaphore(users)

    async with ParrotClient(base_url, request_timeout=60.0) as client:
        async def one(program: SemanticProgram) -> ProgramResult:
            async with gate:
                return await program.arun(base_url, model, counter, criteria=criteria, timeout_s=timeout_s,
                                          callbacks=callbacks, client=client)

        return list(await asyncio.gather(*(one(p) for p in programs)))


def summarize_parrot_workload(
    base_url: str,
    model: str,
    *,
    tokenizer: Any = None,
    summary_tokens: int = 128,
    max_calls: int = DEFAULT_MAX_CALLS,
    users: int = 1,
    **options: Any,
) -> Runnable:
    """The summarization workload on Parrot as a runnable: chunked documents in, summaries out, one root run.

    Same input and output as `chains.workloads.summarize.summarize_workload`; ``options`` go to `arun_summarize_parrot`.
    """
    async def run(documents: Sequence[Sequence[str]], config: RunnableConfig) -> list[str]:
        results = await arun_summarize_parrot(
            documents, base_url=base_url, model=model, tokenizer=tokenizer, summary_tokens=summary_tokens,
            max_calls=max_calls, users=users, config=config, **options,
        )
        return [r.final.strip() for r in results]

    def run_blocking(documents: Sequence[Sequence[str]], config: RunnableConfig) -> list[str]:
        return run_sync(run(documents, config))

    return RunnableLambda(run_blocking, afunc=run, name="summarize")
