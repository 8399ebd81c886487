"""What a trial feeds its workloads: documents chunked to the input length, search queries, coding tasks.

Prepared before any engine starts, so bad inputs (a missing document, a chunk that cannot fit) fail fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from chains.harness.settings import RunSettings, resolve, validate
from chains.workloads import agentic, search, summarize
from chains.workloads.corpus import embedded_corpus, load_hf_dataset, load_user_documents
from langchain_energy.errors import DataError

@dataclass
class Inputs:
    """What a trial feeds its workload(s): chunked documents, search queries, coding tasks."""

    documents: list[list[str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)

    def expected_calls(self, settings: RunSettings) -> int:
        """LLM calls the trial will make (exact for these workloads' fixed structures)."""
        n = 0
        if self.documents:
            n += summarize.expected_calls(self.documents, settings.max_calls)
        if self.queries:
            n += search.expected_calls(self.queries)
        if self.tasks:
            s = resolve(settings, "agentic")
            n += sum(agentic.calls_per_task(len(agentic.resolve_task(t)["modules"]), s.rounds) for t in self.tasks)
        return n


def load_documents(settings: RunSettings):
    """The summarization documents: --docs, --dataset, or the embedded corpus."""
    if settings.docs:
        docs = load_user_documents(settings.docs)
        return docs[: settings.n_docs] if settings.n_docs else docs
    if settings.dataset:
        return load_hf_dataset(settings.dataset, split=settings.dataset_split, field=settings.dataset_field,
                               n_docs=settings.n_docs)
    return embedded_corpus(settings.n_docs)


def prepare_inputs(settings: RunSettings, count_tokens: Callable[[str], int], max_model_len: int = 0) -> Inputs:
    """Load and chunk the inputs and check that every call fits in the model's context.

    Runs before any engine starts, so bad inputs fail fast.

    Raises:
        DataError: missing, empty or binary documents; a dataset that cannot be loaded.
        ContextLengthError: a chunk or answer length that cannot fit in ``max_model_len``.
    """
    validate(settings)
    max_model_len = settings.max_model_len or max_model_len
    out = Inputs()
    sides = ("summarize", "search") if settings.workload == "composite" else (settings.workload,)
    for side in sides:
        s = resolve(settings, side)
        if side == "summarize":
            summarize.check_fits_context(s.input_len, s.output_len, max_model_len)
            for doc in load_documents(s):
                chunks = summarize.chunk_document(doc.page_content, chunk_tokens=s.input_len,
                                                  count_tokens=count_tokens, max_input_tokens=s.max_input_tokens)
                out.documents.append(chunks)
                out.sources.append(str(doc.metadata.get("source", "")))
        elif side == "search":
            search.check_fits_context(s.output_len, max_model_len, count_tokens)
            out.queries = search.load_queries(s.n_queries, max_follow_ups=s.max_follow_ups)
        elif side == "agentic":
            names = list(s.tasks) if s.tasks else [list(agentic.TASKS)[i % len(agentic.TASKS)] for i in range(s.n_tasks)]
            for t in names:
                agentic.resolve_task(t)
            out.tasks = names
    return out


def describe_inputs(inputs: Inputs) -> str:
    """One line about the inputs, for the CLI."""
    parts = []
    if inputs.documents:
        parts.append(f"{len(inputs.documents)} documents ({sum(map(len, inputs.documents))} chunks)")
    if inputs.queries:
        parts.append(f"{len(inputs.queries)} search sessions")
    if inputs.tasks:
        parts.append(f"{len(inputs.tasks)} coding tasks ({', '.join(inputs.tasks)})")
    if not parts:
        raise DataError("nothing to run")
    return ", ".join(parts)
