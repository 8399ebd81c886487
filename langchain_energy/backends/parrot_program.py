"""Workflows as Parrot semantic-variable DAGs, metered through LangChain callbacks.

A `SemanticProgram` is a list of semantic calls whose inputs are text or the outputs of earlier calls.
`SemanticProgram.arun` submits every call to ServeCore before any runs, so Parrot's scheduler sees the
whole DAG and passes outputs to consumers inside the server (no client round trip between dependent calls).
The client then waits on every output at once and reports each call to LangChain callbacks as an LLM run:
a call starts when the last of its inputs is ready and ends when its output is, so handlers such as an
energy meter see the same per-call records as for a client-driven chain.
"""

from __future__ import annotations

import asyncio
import string
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import AsyncCallbackManager, Callbacks
from langchain_core.outputs import Generation, LLMResult

from langchain_energy.backends.base import Completion, SamplingParams
from langchain_energy.backends.parrot import (
    PLACEHOLDER,
    ParrotClient,
    SemanticVar,
    TokenCounter,
    _check_criteria,
    check_template,
    infer_finish_reason,
)
from langchain_energy.errors import ConfigError

OUTPUT = "output"


def to_parrot_template(fstring: str) -> tuple[str, list[str]]:
    """Turn a LangChain f-string prompt (``{name}``, ``{{`` for a brace) into a Parrot template body.

    Returns the template (without an output placeholder) and its placeholder names in order.

    Raises:
        ConfigError: a field with a format spec, conversion or attribute, or literal text that Parrot
            would read as a placeholder.

    Example:
        >>> to_parrot_template("Summarize: {text}")
        ('Summarize: {{text}}', ['text'])
    """
    parts: list[str] = []
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(fstring))
    except ValueError as exc:
        raise ConfigError(f"prompt template is not a valid f-string template: {exc}") from exc
    for literal, name, spec, conversion in parsed:
        parts.append(literal)
        if name is None:
            continue
        if spec or conversion or not name.isidentifier():
            raise ConfigError(f"prompt field {{{name}}} must be a plain name (no format spec, conversion or attribute)")
        parts.append("{{" + name + "}}")
        names.append(name)
    body = "".join(parts)
    if PLACEHOLDER.findall(body) != names:
        raise ConfigError(f"prompt text {fstring!r} contains literal text that Parrot would read as a {{{{name}}}} placeholder")
    return body, names


@dataclass(frozen=True)
class CallRef:
    """A handle on a call of a `SemanticProgram`: pass it as another call's input to chain them."""

    index: int
    name: str


@dataclass
class _Call:
    ref: CallRef
    prompt: str
    template: str
    inputs: dict[str, str | CallRef]
    params: SamplingParams
    tags: list[str]
    metadata: dict[str, Any]


@dataclass
class ProgramResult:
    """What a program run returns.

    Attributes:
        outputs: each call's output text, by call name.
        completions: each call's accounting, in call order (token counts from the tokenizer).
        latency_s: seconds from opening the session to the last output.
        session_id: the ServeCore session used.
    """

    outputs: dict[str, str]
    completions: list[Completion]
    latency_s: float
    session_id: int
    names: list[str] = field(default_factory=list)

    @property
    def final(self) -> str:
        """The last call's output."""
        return self.outputs[self.names[-1]]


class SemanticProgram:
    """A DAG of semantic calls, built call by call, run in one ServeCore session.

    Args:
        name: the workflow's name (the chain run's name in callbacks).

    Example:
        >>> prog = SemanticProgram("refine")
        >>> first = prog.call("initial", "Summarize: {text}", {"text": "chunk one"}, SamplingParams(max_tokens=32))
        >>> second = prog.call("refine_1", "Old: {summary}\\nNew: {text}", {"summary": first, "text": "chunk two"},
        ...                    SamplingParams(max_tokens=32))
        >>> len(prog)
        2
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: list[_Call] = []

    def __len__(self) -> int:
        return len(self._calls)

    def call(
        self,
        name: str,
        prompt: str,
        inputs: Mapping[str, str | CallRef],
        params: SamplingParams,
        *,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CallRef:
        """Add a call: ``prompt`` is an f-string template, each field bound in ``inputs`` to text or a `CallRef`.

        ``tags`` and ``metadata`` go to the call's LLM run in callbacks.

        Raises:
            ConfigError: fields and inputs disagree, a name is reused, or a reference is not from this program.
        """
        if any(c.ref.name == name for c in self._calls):
            raise ConfigError(f"call name {name!r} is used twice in program {self.name!r}")
        body, _ = to_parrot_template(prompt)
        if OUTPUT in inputs:
            raise ConfigError(f"{OUTPUT!r} is reserved for the call's output; rename that prompt field")
        template = body + "{{" + OUTPUT + "}}"
        check_template(template, inputs, OUTPUT)
        for value in inputs.values():
            if isinstance(value, CallRef) and (value.index >= len(self._calls) or self._calls[value.index].ref != value):
                raise ConfigError(f"input {value.name!r} is not an earlier call of program {self.name!r}")
        ref = CallRef(len(self._calls), name)
        self._calls.append(_Call(ref, prompt, template, dict(inputs), params, list(tags or []), dict(metadata or {})))
        return ref

    async def arun(
        self,
        base_url: str,
        model: str,
        tokenizer: Any,
        *,
        criteria: str = "latency",
        timeout_s: float = 600.0,
        callbacks: Callbacks = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        client: ParrotClient | None = None,
    ) -> ProgramResult:
        """Submit the whole DAG, wait for every output, report each call to ``callbacks``.

        Args:
            base_url: ServeCore's address.
            model: the engine's model name.
            tokenizer: the served model's tokenizer, model directory or `TokenCounter`.
            criteria: the get criterion, "latency" or "throughput".
            timeout_s: seconds each output may take once submitted.
            callbacks: LangChain callbacks (handlers or a manager); the program is one chain run.
            tags: tags of the chain run.
            metadata: metadata of the chain run.
            client: an open `ParrotClient` to use instead of one made from ``base_url``.

        Raises:
            ConfigError: an empty program or a bad criterion.
            ParrotError, BackendUnreachableError: as the client raises them; the session is closed.
        """
        if not self._calls:
            raise ConfigError(f"program {self.name!r} has no calls")
        _check_criteria(criteria)
        counter = tokenizer if isinstance(tokenizer, TokenCounter) else TokenCounter(tokenizer)
        own_client = client is None
        client = client or ParrotClient(base_url)
        manager = AsyncCallbackManager.configure(callbacks, None, inheritable_tags=tags, inheritable_metadata=metadata)
        chain_run = await manager.on_chain_start(
            {"name": self.name, "id": ["langchain_energy", "SemanticProgram"]},
            {"calls": len(self._calls)},
            run_id=uuid.uuid4(),
            name=self.name,
        )
        started = time.perf_counter()
        try:
            async with await client.open_session() as session:
                outputs: list[SemanticVar] = []
                for call in self._calls:
                    inputs = {k: outputs[v.index] if isinstance(v, CallRef) else v for k, v in call.inputs.items()}
                    outputs.append(
                        await session.submit(call.template, inputs=inputs, output=OUTPUT, params=call.params,
                                             models=[model], func_name=call.ref.name)
                    )
                # One blocking get per output, all at once: the dependencies resolve inside ServeCore.
                gets = [asyncio.ensure_future(session.get(var, criteria, timeout=timeout_s)) for var in outputs]
                reports = [
                    asyncio.ensure_future(self._report(call, gets, counter, chain_run.get_child(), model))
                    for call in self._calls
                ]
                try:
                    completions = await asyncio.gather(*reports)
                finally:
                    for task in (*gets, *reports):
                        task.cancel()
                    await asyncio.gather(*gets, *reports, return_exceptions=True)
                session_id = session.session_id
        except BaseException as exc:
            await chain_run.on_chain_error(exc)
            raise
        finally:
            if own_client:
                await client.aclose()
        latency = time.perf_counter() - started
        result = ProgramResult(
            outputs={c.ref.name: comp.text for c, comp in zip(self._calls, completions)},
            completions=list(completions),
            latency_s=latency,
            session_id=session_id,
            names=[c.ref.name for c in self._calls],
        )
        await chain_run.on_chain_end({"output": result.final, "calls": len(completions)})
        return result

    async def _report(self, call: _Call, gets: list[asyncio.Future], counter: TokenCounter, manager, model: str) -> Completion:
        """Wait for a call's inputs, report its start, wait for its output, report its end."""
        deps = [v.index for v in call.inputs.values() if isinstance(v, CallRef)]
        if deps:
            await asyncio.gather(*(gets[i] for i in deps))
        values = {k: gets[v.index].result() if isinstance(v, CallRef) else v for k, v in call.inputs.items()}
        prompt = call.prompt.format(**values)
        if call.tags:
            manager.add_tags(call.tags, inherit=False)
        if call.metadata:
            manager.add_metadata(call.metadata, inherit=False)
        t0 = time.perf_counter()
        (run,) = await manager.on_llm_start(
            {"name": "ParrotSemanticCall", "id": ["langchain_energy", "ParrotSemanticCall"]},
            [prompt],
            name=call.ref.name,
            invocation_params={"model": model, **call.params.to_dict()},
        )
        try:
            text = await gets[call.ref.index]
        except BaseException as exc:
            await run.on_llm_error(exc)
            raise
        completion_tokens = counter.count(text)
        completion = Completion(
            text=text,
            prompt_tokens=counter.prompt_tokens(prompt),
            completion_tokens=completion_tokens,
            latency_s=time.perf_counter() - t0,
            finish_reason=infer_finish_reason(completion_tokens, call.params),
            token_source="tokenizer",
        )
        usage = {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            "cached_tokens": None,
        }
        await run.on_llm_end(
            LLMResult(
                generations=[[Generation(text=text, generation_info=completion.generation_info())]],
                llm_output={"token_usage": usage, "model_name": model},
            )
        )
        return completion
