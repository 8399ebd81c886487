"""`ChatServing`: a LangChain chat model served by vLLM (managed or by URL) or Parrot, with tools and structured
output (on vLLM).

Built on the package's own OpenAI-compatible backend rather than on langchain-openai's ``ChatOpenAI``: that backend
already starts the managed engine lazily (shared with `ServingLLM`), streams every call so that time to first
token is known for every call, reads vLLM's cached prompt tokens, and maps failures to the package's errors;
langchain-core converts messages and tools. Forced tool calls and structured output are decoded by the engine
against a JSON schema, so they always parse. Tokens are counted with the served model's own tokenizer (no
tiktoken download).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    convert_to_openai_messages,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.exceptions import OutputParserException
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

from langchain_energy._auth import key_to_send
from langchain_energy._loop import iterate_sync, run_sync
from langchain_energy._tools import ForcedCall, new_call_id, schema_name, normalize_tool_choice, tool_specs
from langchain_energy.backends.base import Backend, Completion, SamplingParams, StreamEvent
from langchain_energy.backends.openai_compat import OpenAICompatBackend
from langchain_energy.backends.vllm_server import EngineConfig, VLLMServer, shared_server
from langchain_energy.errors import BackendUnreachableError, ConfigError, UnsupportedError
from langchain_energy.models import DEFAULT_MODEL, load_tokenizer, resolve_model
from langchain_energy.scheduling import WorkflowScheduler

__all__ = ["ChatServing"]

_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "ignore_eos", "seed", "priority")
#: Call options that OpenAI-style callers pass and that change nothing here (vLLM always reports usage, and a
#: forced call is one call).
_IGNORED_OPTIONS = ("stream_usage", "parallel_tool_calls", "strict", "stream_options")
#: Below this, getting the backend was a lookup, not an engine start (as in `ServingLLM`).
_ENGINE_START_MIN_S = 0.5
#: The server's words when it has no tool-call parser for ``tool_choice="auto"``.
_NO_PARSER_PHRASES = ("enable-auto-tool-choice", "tool-call-parser", "tool_call_parser")


class ChatServing(BaseChatModel):
    """A LangChain chat model on a managed vLLM engine, any vLLM server or Parrot, with energy-ready accounting.

    - ``backend="vllm"`` (default): a managed local vLLM server started on first use (the embedded SmolLM2-135M
      unless ``model`` or ``engine`` says otherwise), the same one `ServingLLM` uses for the same knobs.
    - ``backend="openai"``: any running vLLM OpenAI-compatible server at ``base_url`` (``api_key`` for one
      started with ``--api-key`` or behind a gateway).
    - ``backend="parrot"``: Parrot's ServeCore at ``base_url``. Each call is one semantic call, which Parrot's
      engine receives as one user message: so a call takes one human message (a plain prompt, as the workloads
      send), binds no tools and asks for no structured output (Parrot decodes no JSON schema). Parrot does
      not stream or report tokens: the message arrives whole, its tokens counted with the model's tokenizer.

    Every message carries ``usage_metadata`` (with ``input_token_details.cache_read`` from vLLM's prefix
    cache) and ``response_metadata`` with ``model_name``, ``finish_reason``, ``ttft_s`` and ``latency_s``; an
    `EnergyCallbackHandler` metering the call adds ``response_metadata["energy"]``. `bind_tools` supports
    ``tool_choice`` ``"auto"`` (needs the server's tool-call parser, `EngineConfig.tool_call_parser`),
    ``"any"``/``"required"`` and a tool's name (decoded by the engine against the tool's JSON schema, so the
    arguments always parse, with any model). `with_structured_output` decodes against the schema too.

    Example:
        .. code-block:: python

            from langchain_core.tools import tool
            from langchain_energy import ChatServing, EnergyCallbackHandler

            @tool
            def get_weather(city: str) -> str:
                \"\"\"The weather in a city.\"\"\"
                return "sunny"

            chat = ChatServing(max_tokens=64, temperature=0)     # embedded engine, started on first call
            with EnergyCallbackHandler() as energy:
                msg = chat.bind_tools([get_weather], tool_choice="any").invoke(
                    "Weather in Paris?", config={"callbacks": [energy]})
            msg.tool_calls                       # [{'name': 'get_weather', 'args': {'city': ...}, ...}]
            msg.usage_metadata, msg.response_metadata["energy"]
            parrot = ChatServing(backend="parrot", base_url="http://127.0.0.1:9000", model="smollm2-135m")
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=(), populate_by_name=True)

    backend: Literal["vllm", "openai", "parrot"] = "vllm"
    """Which server answers: a managed vLLM server, a vLLM OpenAI-compatible server or Parrot's ServeCore at
    ``base_url``."""
    model: str = Field(default=DEFAULT_MODEL, alias="model_name")
    """Registry name, model directory or hub name (for ``openai``/``parrot``: the served model name)."""
    base_url: str | None = None
    """URL of the server for ``openai`` (ending in /v1) and ``parrot``; unused for ``vllm``."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("OPENAI_API_KEY", default=None))
    """Bearer token for URL servers (default: ``OPENAI_API_KEY``; the managed engine only if its flags ask for one)."""
    engine: EngineConfig | None = None
    """Engine knobs of the managed server (``vllm`` only); default: ``EngineConfig(model=model)``."""
    auto_tool_choice: bool | None = None
    """Whether the server parses free-form tool calls; None: the managed engine's config says, a URL server decides."""
    max_tokens: int = 256
    """Most tokens generated per call."""
    temperature: float = 0.7
    """Sampling temperature (the study's 0.7)."""
    top_p: float = 1.0
    """Nucleus sampling mass (the study's 1.0)."""
    ignore_eos: bool = False
    """Generate exactly ``max_tokens`` tokens (fixed output lengths for experiments)."""
    seed: int | None = None
    """Per-request sampling seed."""
    priority: int | None = None
    """Request priority for an engine started with ``scheduling_policy="priority"`` (lower runs first)."""
    stop: list[str] | None = None
    """Stop strings."""
    streaming: bool = False
    """Stream tokens to callbacks during ``invoke`` too (every call streams from the server regardless)."""
    stream_usage: bool = True
    """Put ``usage_metadata`` on the last streamed chunk."""
    max_retries: int = Field(default=2, ge=0)
    """Retries of a request that could not reach the server (never of a refused one, e.g. HTTP 401)."""
    tokenizer: str | None = None
    """Tokenizer directory for counting tokens (default: the registry model's)."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    """Seconds to wait for a connection before calling the server unreachable."""
    request_timeout_s: float = Field(default=600.0, gt=0, alias="timeout")
    """Seconds one request may take in all (also settable as ``timeout``)."""
    scheduler: WorkflowScheduler | None = None
    """A `WorkflowScheduler` (also in the runs' callbacks): each call waits at its gate, if any, and is sent
    with its priority (which replaces ``priority``, except under ``fcfs``), as in `ServingLLM`."""

    _backend: Backend | None = PrivateAttr(default=None)
    _server: VLLMServer | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, **data: Any) -> None:
        if data.get("timeout", 0) is None:
            data.pop("timeout")
        super().__init__(**data)
        self._sampling()  # validate sampling parameters up front, with our own error type
        if self.backend != "vllm" and not self.base_url:
            raise ConfigError(f"backend {self.backend!r} needs base_url (the server's address"
                              f"{', ending in /v1' if self.backend == 'openai' else ''})")
        if self.engine is not None and self.backend != "vllm":
            raise ConfigError("engine knobs apply to the managed vLLM server only (backend='vllm')")

    @classmethod
    def from_server(cls, server: VLLMServer, **kwargs: Any) -> ChatServing:
        """A chat model talking to an already running `VLLMServer` (knows whether it has a tool-call parser)."""
        kwargs.setdefault("auto_tool_choice", server.config.auto_tool_choice)
        return cls(backend="openai", base_url=server.base_url, model=server.served_model_name, **kwargs)

    # -- LangChain plumbing ----------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return f"chat-serving-{self.backend}"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, "base_url": self.base_url,
                **{key: getattr(self, key) for key in _SAMPLING_KEYS}}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider=self._provider, ls_model_name=kwargs.get("model") or self.model,
                                 ls_model_type="chat", ls_temperature=kwargs.get("temperature", self.temperature),
                                 ls_max_tokens=kwargs.get("max_tokens", self.max_tokens))
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    @property
    def _provider(self) -> str:
        return "parrot" if self.backend == "parrot" else "vllm"

    def _sampling(self, stop: list[str] | None = None, **overrides: Any) -> SamplingParams:
        values = {key: getattr(self, key) for key in _SAMPLING_KEYS}
        values.update({k: v for k, v in overrides.items() if k in _SAMPLING_KEYS})
        return SamplingParams(stop=tuple(stop or self.stop or ()), **values)

    @property
    def server(self) -> VLLMServer | None:
        """The managed server behind a ``vllm`` chat model once started (for /metrics and cache resets)."""
        return self._server

    def get_backend(self) -> Backend:
        """The backend, created (and for ``vllm`` the shared managed server started) on first use."""
        with self._lock:
            if self._backend is None and self.backend == "parrot":
                from langchain_energy.backends.parrot import ParrotBackend

                self._backend = ParrotBackend(self.base_url, self.model, tokenizer=self._tokenizer_path(),
                                              request_timeout_s=self.request_timeout_s,
                                              connect_timeout=self.connect_timeout_s)
            elif self._backend is None:
                base_url, model, health_check = self.base_url, self.model, None
                if self.backend == "vllm":
                    self._server = shared_server(self._engine_config())
                    base_url, model, health_check = (
                        self._server.base_url, self._server.served_model_name, self._server.check_alive)
                self._backend = OpenAICompatBackend(
                    base_url, model, api="chat", connect_timeout_s=self.connect_timeout_s,
                    request_timeout_s=self.request_timeout_s, health_check=health_check,
                    api_key=key_to_send(self.api_key, self.backend, self.engine))
            return self._backend

    async def _aget_backend(self) -> Backend:
        # Starting a managed server blocks for tens of seconds: keep it off the caller's event loop.
        return self._backend or await asyncio.to_thread(self.get_backend)

    def _engine_config(self) -> EngineConfig:
        return self.engine or EngineConfig(model=self.model)

    def _parses_tool_calls(self) -> bool | None:
        if self.auto_tool_choice is not None:
            return self.auto_tool_choice
        return self._engine_config().auto_tool_choice if self.backend == "vllm" else None

    # -- tokens ----------------------------------------------------------------------------------------
    def _tokenizer_path(self) -> str:
        if self.tokenizer:
            return self.tokenizer
        return resolve_model(self.engine.model if self.engine else self.model).path

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` by the served model's own tokenizer (no download)."""
        return list(load_tokenizer(self._tokenizer_path()).encode(text, add_special_tokens=False))

    def get_num_tokens(self, text: str) -> int:
        """Tokens in `text` by the served model's tokenizer."""
        return len(self.get_token_ids(text))

    def get_num_tokens_from_messages(self, messages: list[BaseMessage],
                                     tools: Sequence[Any] | None = None) -> int:
        """Prompt tokens of a conversation as the server counts them: the model's chat template applied.

        Tools are not part of the count (the embedded model's template does not render them).
        """
        tokenizer = load_tokenizer(self._tokenizer_path())
        ids = tokenizer.apply_chat_template(convert_to_openai_messages(messages), add_generation_prompt=True,
                                            tokenize=True)
        return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    # -- tools and structured output -------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | Any],
        *,
        tool_choice: str | dict | bool | None = None,
        strict: bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools for the model to call.

        Args:
            tools: LangChain tools, functions, pydantic models, TypedDicts or OpenAI tool dicts.
            tool_choice: None/``"auto"`` (the model decides; needs the server's tool-call parser),
                ``"none"``, ``"any"``/``"required"``/True (one call of any bound tool) or a tool's name. Forced
                calls are decoded against the tool's JSON schema: the arguments always match it.
            strict: accepted for compatibility; forced calls are always schema-exact.
            parallel_tool_calls: accepted for compatibility; a forced choice makes one call.
            **kwargs: more call options bound with the tools.

        Raises:
            ConfigError: a bad tool or choice, or ``"auto"`` on an engine without a tool-call parser.
        """
        specs = tool_specs(tools)
        mode, _ = normalize_tool_choice(tool_choice, [s["function"]["name"] for s in specs])
        if specs and mode != "none":
            self._check_decodes_schemas("tools")
        if mode == "auto" and specs and self._parses_tool_calls() is False:
            raise ConfigError(_NO_PARSER)
        return super().bind(tools=specs, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """A runnable whose output is `schema`'s object (pydantic) or a dict (TypedDict, JSON schema).

        Args:
            schema: a pydantic class (v2 or v1), a TypedDict, or a JSON schema / OpenAI function dict.
            method: ``"json_schema"`` (default: the engine decodes against the schema, so it always parses),
                ``"function_calling"`` (a forced tool call, also schema-decoded) or ``"json_mode"`` (any JSON
                object; the prompt must name the keys).
            include_raw: return ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}`` instead.
            strict: accepted for compatibility; schema decoding is always strict.

        Raises:
            ConfigError: an unknown method or unexpected options.
        """
        if kwargs:
            raise ConfigError(f"unexpected options for with_structured_output: {', '.join(kwargs)}")
        self._check_decodes_schemas("structured output")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        json_schema = convert_to_json_schema(schema)
        ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": json_schema}
        parser: Runnable
        if method == "json_schema":
            name = json_schema.get("title") or "output"
            llm = self.bind(response_format={"type": "json_schema", "json_schema": {
                "name": schema_name(name), "schema": _decodable(json_schema), "strict": True}},
                ls_structured_output_format=ls_format)
            parser = RunnableLambda(_complete_output) | (
                PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser())
        elif method == "function_calling":
            name = tool_specs([schema])[0]["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=ls_format)
            parser = RunnableLambda(_complete_call) | (
                PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method == "json_mode":
            llm = self.bind(response_format={"type": "json_object"}, ls_structured_output_format=ls_format)
            parser = RunnableLambda(_complete_output) | (
                PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser())
        else:
            raise ConfigError(f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    def _check_decodes_schemas(self, what: str) -> None:
        if self.backend == "parrot":
            raise UnsupportedError(f"Parrot decodes no JSON schema, so it cannot serve {what}: use backend 'vllm' or "
                              "'openai'")

    # -- one request -----------------------------------------------------------------------------------
    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any],
                 run_id: Any = None) -> tuple[dict[str, Any], ForcedCall | None]:
        """The backend request for a call (messages, sampling, extra body) and its forced tool call, if any."""
        kwargs = dict(kwargs)
        for key in _IGNORED_OPTIONS:
            kwargs.pop(key, None)
        specs = kwargs.pop("tools", None) or []
        choice = kwargs.pop("tool_choice", None)
        response_format = kwargs.pop("response_format", None)
        model = kwargs.pop("model", None)
        extra: dict[str, Any] = {}
        unknown = [k for k in kwargs if k not in _SAMPLING_KEYS]
        if unknown:
            raise ConfigError(f"unknown call options for ChatServing: {', '.join(sorted(unknown))}")
        params = self._sampling(stop, **kwargs)
        forced = None
        if specs:
            specs = tool_specs(specs)  # already specs: a cheap check
            mode, names = normalize_tool_choice(choice, [s["function"]["name"] for s in specs])
            if mode != "none":
                self._check_decodes_schemas("tools")
            if mode == "forced":
                forced = ForcedCall(tuple(s for s in specs if s["function"]["name"] in names))
                if response_format is not None:
                    raise ConfigError("a forced tool call and response_format cannot be combined")
                response_format = forced.response_format()
                messages = _with_instruction(messages, forced.instruction())
            elif mode == "auto":
                if self._parses_tool_calls() is False:
                    raise ConfigError(_NO_PARSER)
                extra.update(tools=specs, tool_choice="auto")
        if response_format is not None:
            self._check_decodes_schemas("structured output")
            extra["response_format"] = response_format
        if self.backend == "parrot":  # (nothing to send but the prompt: tools and formats were refused above)
            return {"params": params, "prompt": _parrot_prompt(messages), "request": {}, "run_id": run_id}, None
        request = {"messages": convert_to_openai_messages(messages), "extra": extra, "model": model}
        return {"params": params, "prompt": "", "request": request, "run_id": run_id}, forced

    async def _backend_events(self, call: dict[str, Any], forced: ForcedCall | None,
                              t_enter: float) -> AsyncIterator[StreamEvent]:
        """The backend's events for one call: the engine started if needed, unreachable servers retried (only
        before anything arrived), refusals turned into specific errors. The last event's completion carries the
        call's edges (``sent_after_s``, ``engine_start_s``) for the energy handler."""
        was_started = self._backend is not None
        backend = await self._aget_backend()
        took = time.monotonic() - t_enter
        engine_start_s = took if not was_started and took >= _ENGINE_START_MIN_S else 0.0
        # The scheduler's gate, if any, holds its slot from the first byte sent to the last event.
        gate = (self.scheduler.admitted(call["run_id"]) if self.scheduler is not None and call["run_id"] is not None
                else contextlib.nullcontext())
        async with gate as priority:
            params = call["params"] if priority is None else dataclasses.replace(call["params"], priority=priority)
            for attempt in range(self.max_retries + 1):
                sent_after = time.monotonic() - t_enter   # after the gate: the wait there is not the call's
                received = False
                try:
                    async for event in backend.astream(call["prompt"], params, **call["request"]):
                        if event.completion is not None:
                            event.completion.extra["sent_after_s"] = sent_after
                            if engine_start_s > 0:
                                event.completion.extra["engine_start_s"] = engine_start_s
                        received = True
                        yield event
                    return
                except BackendUnreachableError:
                    if received or attempt >= self.max_retries:
                        raise
                    await asyncio.sleep(min(0.5 * 2**attempt, 4.0))
                except ConfigError as exc:
                    raise self._refusal(exc, call, forced) from exc

    @staticmethod
    def _refusal(exc: ConfigError, call: dict[str, Any], forced: ForcedCall | None) -> ConfigError:
        """A refused request as the specific error: no tool-call parser, or a schema the engine cannot decode."""
        if any(p in str(exc) for p in _NO_PARSER_PHRASES):
            return ConfigError(_NO_PARSER)
        fmt = call["request"].get("extra", {}).get("response_format") or {}
        if fmt.get("type") == "json_schema" and "grammar" in str(exc).lower():
            what = (f"tool {forced.names[0]!r}" if forced is not None and forced.single
                    else f"schema {fmt['json_schema'].get('name')!r}")
            return ConfigError(f"the engine cannot decode the JSON schema of {what}: {exc}")
        return exc

    def _model_name(self, call: dict[str, Any]) -> str:
        return call["request"].get("model") or (self._backend.model_name if self._backend else self.model)

    async def _events(self, call: dict[str, Any], forced: ForcedCall | None,
                      t_enter: float) -> AsyncIterator[ChatGenerationChunk]:
        """One streamed call as chat chunks; the last carries usage, timings and the call's accounting."""
        call_id = new_call_id()
        text: list[str] = []
        async for event in self._backend_events(call, forced, t_enter):
            if event.completion is not None:
                if forced is not None and not forced.single:
                    # Several eligible tools: the name is known only once the whole object is decoded.
                    yield _whole_call_chunk(forced, "".join(text), call_id)
                yield self._last_chunk(event.completion, self._model_name(call), forced is not None)
                continue  # the last event: let the generators end by themselves (no finalizer round trip)
            if forced is not None:
                text.append(event.text)
                if forced.single and event.text:
                    first = len(text) == 1
                    yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[
                        tool_call_chunk(name=forced.names[0] if first else None, args=event.text,
                                        id=call_id if first else None, index=0)]))
                continue
            yield ChatGenerationChunk(message=AIMessageChunk(
                content=event.text, tool_call_chunks=[_server_call_chunk(c) for c in event.tool_calls]))

    def _usage(self, completion: Completion) -> UsageMetadata:
        usage = UsageMetadata(input_tokens=completion.prompt_tokens, output_tokens=completion.completion_tokens,
                              total_tokens=completion.prompt_tokens + completion.completion_tokens)
        if completion.cached_tokens is not None:
            usage["input_token_details"] = {"cache_read": int(completion.cached_tokens)}
        return usage

    def _metadata(self, completion: Completion, model_name: str, forced: bool) -> dict[str, Any]:
        finish = completion.finish_reason
        if forced and finish == "stop":
            finish = "tool_calls"
        return {"model_name": model_name, "model_provider": self._provider, "finish_reason": finish,
                "ttft_s": completion.ttft_s, "latency_s": completion.latency_s}

    def _last_chunk(self, completion: Completion, model_name: str, forced: bool) -> ChatGenerationChunk:
        return ChatGenerationChunk(
            message=AIMessageChunk(content="", usage_metadata=self._usage(completion) if self.stream_usage else None,
                                   response_metadata=self._metadata(completion, model_name, forced),
                                   chunk_position="last"),
            generation_info=completion.generation_info(),
        )

    async def _collect(self, call: dict[str, Any], forced: ForcedCall | None, t_enter: float) -> ChatResult:
        """One call as a finished message, built once from the backend's events (no per-token chunks)."""
        text: list[str] = []
        server_calls: dict[int, dict[str, Any]] = {}
        completion: Completion | None = None
        async for event in self._backend_events(call, forced, t_enter):
            if event.completion is not None:
                completion = event.completion  # the last event: the generators end by themselves (no finalizer)
                continue
            text.append(event.text)
            for delta in event.tool_calls:
                entry = server_calls.setdefault(int(delta.get("index", 0)), {"name": None, "id": None, "args": []})
                fn = delta.get("function") or {}
                entry["name"] = entry["name"] or fn.get("name")
                entry["id"] = entry["id"] or delta.get("id")
                entry["args"].append(fn.get("arguments") or "")
        assert completion is not None  # the backend always ends with the completion
        body = "".join(text)
        if forced is not None:
            calls, invalid = forced.parse(body)
            content = ""
        else:
            calls, invalid = _server_calls(server_calls)
            content = body
        message = AIMessage(content=content, tool_calls=calls, invalid_tool_calls=invalid,
                            usage_metadata=self._usage(completion),
                            response_metadata=self._metadata(completion, self._model_name(call), forced is not None))
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=completion.generation_info())])

    # -- BaseChatModel hooks ---------------------------------------------------------------------------
    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        t_enter = time.monotonic()
        return await self._collect(*self._request(messages, stop, kwargs, _run_id(run_manager)), t_enter)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        t_enter = time.monotonic()
        return run_sync(self._collect(*self._request(messages, stop, kwargs, _run_id(run_manager)), t_enter))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        t_enter = time.monotonic()
        async for chunk in self._events(*self._request(messages, stop, kwargs, _run_id(run_manager)), t_enter):
            if run_manager and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        t_enter = time.monotonic()
        for chunk in iterate_sync(self._events(*self._request(messages, stop, kwargs, _run_id(run_manager)),
                                               t_enter)):
            if run_manager and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


_NO_PARSER = ('tool_choice="auto" needs the server\'s tool-call parser: start the engine with '
              'EngineConfig(tool_call_parser=...) (vLLM --tool-call-parser), or force a call with '
              'tool_choice="any" or a tool\'s name')


def _run_id(run_manager: Any) -> Any:
    return getattr(run_manager, "run_id", None)


def _complete_call(message: AIMessage) -> AIMessage:
    """Pass a message with a complete tool call on; an incomplete one is a parsing error, never None."""
    if not message.tool_calls and message.invalid_tool_calls:
        raise OutputParserException(message.invalid_tool_calls[0].get("error") or "incomplete tool call",
                                    llm_output=str(message.invalid_tool_calls[0].get("args")))
    return message


def _complete_output(message: AIMessage) -> AIMessage:
    """Pass a finished answer on; one cut at max_tokens is a parsing error (a JSON repair would invent its end)."""
    if message.response_metadata.get("finish_reason") == "length":
        raise OutputParserException("the structured output was cut at max_tokens before it was complete; "
                                    "raise max_tokens", llm_output=message.text)
    return message


def _parrot_prompt(messages: list[BaseMessage]) -> str:
    """The prompt of a conversation that Parrot can carry: its one human message, in text."""
    if len(messages) == 1 and isinstance(messages[0], HumanMessage):
        content = messages[0].content
        if isinstance(content, str) or all(isinstance(b, str) or b.get("type") == "text" for b in content):
            return messages[0].text
        raise ConfigError("Parrot's semantic calls carry text only: this message has non-text content")
    kinds = ", ".join(m.type for m in messages) or "no messages"
    raise ConfigError(f"Parrot's engine receives each semantic call as one user message, not a conversation "
                      f"({kinds}): send one prompt, or use backend 'vllm' or 'openai'")


def _with_instruction(messages: list[BaseMessage], instruction: str) -> list[BaseMessage]:
    """`messages` with `instruction` appended to the leading system message (or a new one in front)."""
    if messages and isinstance(messages[0], SystemMessage) and isinstance(messages[0].content, str):
        first = SystemMessage(content=f"{messages[0].content}\n\n{instruction}")
        return [first, *messages[1:]]
    return [SystemMessage(content=instruction), *messages]


def _server_call_chunk(delta: dict[str, Any]) -> Any:
    fn = delta.get("function") or {}
    return tool_call_chunk(name=fn.get("name"), args=fn.get("arguments"), id=delta.get("id"),
                           index=delta.get("index", 0))


def _whole_call_chunk(forced: ForcedCall, text: str, call_id: str) -> ChatGenerationChunk:
    """A forced call among several tools as one chunk (its name is known only once the object is decoded)."""
    calls, invalid = forced.parse(text, call_id)
    name, args = (calls[0]["name"], json.dumps(calls[0]["args"], ensure_ascii=False)) if calls else (
        invalid[0]["name"], text)
    return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[
        tool_call_chunk(name=name, args=args, id=call_id, index=0)]))


def _server_calls(raw: dict[int, dict[str, Any]]) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    """Tool calls found by the server's parser, accumulated from their stream deltas."""
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for index in sorted(raw):
        entry = raw[index]
        args = "".join(entry["args"])
        call_id = entry["id"] or new_call_id()
        try:
            value = json.loads(args) if args.strip() else {}
        except ValueError as exc:
            invalid.append(invalid_tool_call(name=entry["name"], args=args, id=call_id, error=str(exc)))
            continue
        if not isinstance(value, dict):
            # facts.md: a server parser once returned a bare JSON string as the arguments.
            invalid.append(invalid_tool_call(name=entry["name"], args=args, id=call_id,
                                             error="the server's parser returned arguments that are not an object"))
            continue
        calls.append(tool_call(name=entry["name"] or "", args=value, id=call_id))
    return calls, invalid


def _decodable(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema as the engine decodes it: objects closed to undeclared keys unless they say otherwise."""
    out = dict(schema)
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out
