"""Parrot (ParrotServe) backend: a client of ServeCore's HTTP API.

Parrot's unit of work is a *semantic call*: a prompt template whose ``{{name}}`` placeholders are bound to
semantic variables (constant text, or the output of another call), plus one output variable that is filled by
generation. Outputs of one call can feed the next without a round trip to the client, so ServeCore sees the
whole DAG of a workflow and schedules it (see `langchain_energy.backends.parrot_program`).

This module has three layers:

- `ParrotClient`: HTTP transport to ServeCore, error mapping, timeouts.
- `ParrotSession`: one ServeCore session: variables, semantic calls, blocking gets, close.
- `ParrotBackend`: the `Backend` contract (one LangChain call = one semantic call) on a lazily opened session.

ServeCore returns no token counts; counts come from the served model's tokenizer (`TokenCounter`) and are
flagged ``token_source="tokenizer"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from langchain_energy.backends.base import Completion, SamplingParams, StreamEvent
from langchain_energy.errors import BackendUnreachableError, ConfigError, ParrotError

logger = logging.getLogger(__name__)

API_VERSION = "v1"
# ServeCore's placeholder syntax: `{{name}}`, name an identifier.
PLACEHOLDER = re.compile(r"\{\{([a-zA-Z_][a-zA-Z0-9_]*)\}\}")
# ServeCore propagates only these two criteria back through a DAG (TTFT/TPOT fail on any dependency).
CRITERIA = ("latency", "throughput")
# ServeCore's messages for sessions it no longer knows (expired, removed, or marked bad after an engine error).
_SESSION_GONE = ("not found", "is not valid")


@dataclass(frozen=True)
class SemanticVar:
    """A semantic variable registered in a ServeCore session.

    Attributes:
        name: the variable's name (the parameter name it was created for).
        var_id: ServeCore's id of the variable.
    """

    name: str
    var_id: str


def template_placeholders(template: str) -> list[str]:
    """The placeholder names of a Parrot template, in order of appearance.

    Example:
        >>> template_placeholders("Summarize {{text}} now: {{summary}}")
        ['text', 'summary']
    """
    return PLACEHOLDER.findall(template)


def check_template(template: str, inputs: Mapping[str, Any], output: str) -> None:
    """Check that a template's placeholders and a call's parameters agree.

    Every placeholder must be a parameter and every parameter a placeholder (an input may appear several
    times), and the output placeholder must appear once, at the end of the template (ServeCore silently drops text after the last
    placeholder, and the generation must see the whole prompt).

    Raises:
        ConfigError: naming the placeholders and parameters that disagree.
    """
    names = template_placeholders(template)
    if output in inputs:
        raise ConfigError(f"parameter {output!r} is both an input and the output of the call")
    params = set(inputs) | {output}
    missing = [n for n in dict.fromkeys(names) if n not in params]
    unused = sorted(params - set(names))
    if missing or unused:
        raise ConfigError(
            f"template placeholders {names} and call parameters {sorted(params)} disagree: "
            f"placeholders without a parameter: {missing or 'none'}; parameters not in the template: {unused or 'none'}"
        )
    if names.count(output) > 1:
        raise ConfigError(f"the output placeholder {{{{{output}}}}} appears more than once; a call generates once")
    if not template.endswith("{{" + output + "}}"):
        raise ConfigError(
            f"the output placeholder {{{{{output}}}}} must end the template (text after it would be dropped)"
        )


def sampling_config(params: SamplingParams) -> dict[str, Any]:
    """ServeCore's ``sampling_config`` for our sampling parameters.

    Parrot forwards neither seed nor priority to its engine; they are not sent.

    Raises:
        ConfigError: more than one stop string (Parrot accepts one).
    """
    if len(params.stop) > 1:
        raise ConfigError(f"Parrot accepts a single stop string, got {len(params.stop)}: {list(params.stop)}")
    return {
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "max_gen_length": params.max_tokens,
        "ignore_tokenizer_eos": params.ignore_eos,
        "stop_str": params.stop[0] if params.stop else None,
    }


def _check_criteria(criteria: str) -> str:
    if criteria not in CRITERIA:
        raise ConfigError(f"criteria must be one of {CRITERIA} (Parrot propagates no other through a DAG), got {criteria!r}")
    return criteria


def core_url(base_url: str) -> str:
    """ServeCore's root URL: a trailing ``/`` or ``/v1`` is removed."""
    url = base_url.rstrip("/")
    if url.endswith("/" + API_VERSION):
        url = url[: -len(API_VERSION) - 1]
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"Parrot base_url must be an http(s) URL such as http://127.0.0.1:9000, got {base_url!r}")
    return url


class ParrotClient:
    """HTTP client of one ServeCore; opens sessions.

    Args:
        base_url: ServeCore's address, e.g. ``http://127.0.0.1:9000`` (a trailing ``/v1`` is accepted).
        api_key: sent when a session is registered (ServeCore does not check it).
        connect_timeout: seconds to wait for a connection before `BackendUnreachableError`.
        request_timeout: seconds for non-blocking requests (sessions, variables, submissions).
        transport: an httpx transport, for tests.

    Example:
        >>> async def main():  # doctest: +SKIP
        ...     async with ParrotClient("http://127.0.0.1:9000") as client:
        ...         async with await client.open_session() as session:
        ...             out = await session.submit("Say hi: {{answer}}", inputs={}, output="answer",
        ...                                        params=SamplingParams(max_tokens=8))
        ...             return await session.get(out)
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "",
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = core_url(base_url)
        self.api_key = api_key
        self.request_timeout = request_timeout
        self._timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout, transport=transport)

    async def __aenter__(self) -> ParrotClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    async def request(self, method: str, path: str, body: dict, *, op: str, read_timeout: float | None = None) -> dict:
        """Send one JSON request (ServeCore reads a JSON body on every method) and return the JSON answer.

        Raises:
            BackendUnreachableError: no connection, or ServeCore dropped it (it exits when its engine fails).
            ParrotError: ServeCore answered with an error, or did not answer within ``read_timeout``.
        """
        timeout = self._timeout if read_timeout is None else httpx.Timeout(read_timeout, connect=self._timeout.connect)
        try:
            resp = await self._http.request(method, f"/{API_VERSION}{path}", json=body, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise BackendUnreachableError(
                f"no Parrot ServeCore answers at {self.base_url} ({type(exc).__name__}: {exc}); start one "
                f"(langchain_energy.parrot_stack.ParrotStack) or fix base_url"
            ) from exc
        except httpx.ReadTimeout as exc:
            raise _Timeout(f"ServeCore did not answer {op} within {timeout.read} s") from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise BackendUnreachableError(
                f"ServeCore at {self.base_url} dropped the connection during {op} ({type(exc).__name__}); "
                f"it may have exited (ServeCore quits when its engine fails): check its log"
            ) from exc
        if resp.status_code == 200:
            try:
                data = resp.json()
            except ValueError:
                data = None
            if not isinstance(data, dict):
                raise ParrotError(f"ServeCore answered {op} with a non-JSON-object body: {resp.text[:200]!r}")
            return data
        raise _error_from_response(resp, op)

    async def open_session(self) -> ParrotSession:
        """Register a new session in ServeCore."""
        data = await self.request("POST", "/session", {"api_key": self.api_key}, op="register session")
        try:
            return ParrotSession(self, int(data["session_id"]), str(data["session_auth"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ParrotError(f"ServeCore's session answer lacks session_id/session_auth: {data}") from exc


class _Timeout(ParrotError):
    """A request got no answer in time (internal: turned into a message naming what was waited for)."""


def _error_from_response(resp: httpx.Response, op: str) -> ParrotError:
    """ServeCore reports user errors as HTTP 500 ``{"error", "traceback"}``; other failures as plain text."""
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and "error" in data:
        error = str(data["error"])
        if any(s in error for s in _SESSION_GONE) and "Session" in error:
            return ParrotError(
                f"ServeCore no longer knows the session ({error}) during {op}: it expired (idle longer than "
                f"ServeCore's session_life_span), was closed, or was dropped after an engine failure"
            )
        tb = str(data.get("traceback") or "").strip()
        return ParrotError(f"ServeCore refused {op}: {error}" + (f"\n{tb}" if tb else ""))
    return ParrotError(
        f"ServeCore failed {op} with HTTP {resp.status_code}: {resp.text[:300]!r} (an internal error: "
        f"a malformed request, or see ServeCore's log)"
    )


class ParrotSession:
    """One ServeCore session: register/set semantic variables, submit semantic calls, get outputs, close.

    Any error raised by an operation closes the session first (ServeCore keeps nothing useful from a failed
    session). Use it as an async context manager to close it on every path.

    Args:
        client: the `ParrotClient` that opened it.
        session_id: ServeCore's session id.
        session_auth: ServeCore's session token.
        probe_interval: while a blocking get waits, how often (seconds) to check that the session still
            exists; ServeCore drops a session whose engine failed and leaves its gets waiting forever.
    """

    def __init__(self, client: ParrotClient, session_id: int, session_auth: str, *, probe_interval: float = 2.0) -> None:
        self.client = client
        self.session_id = session_id
        self.session_auth = session_auth
        self.probe_interval = probe_interval
        self.closed = False
        self._probe: SemanticVar | None = None
        self._probe_lock = asyncio.Lock()
        self._last_probe = 0.0
        self._call_count = 0

    async def __aenter__(self) -> ParrotSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _auth(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "session_auth": self.session_auth}

    async def _do(self, method: str, path: str, body: dict, *, op: str, read_timeout: float | None = None) -> dict:
        if self.closed:
            raise ParrotError(f"Parrot session {self.session_id} is closed; open a new one")
        try:
            return await self.client.request(method, path, body, op=op, read_timeout=read_timeout)
        except BaseException:
            await self.close()
            raise

    async def variable(self, name: str, content: str | None = None) -> SemanticVar:
        """Register a semantic variable, optionally setting its content."""
        data = await self._do("POST", "/semantic_var", {**self._auth(), "var_name": name}, op=f"register variable {name!r}")
        var = SemanticVar(name, str(data.get("var_id")))
        if content is not None:
            await self.set(var, content)
        return var

    async def set(self, var: SemanticVar, content: str) -> None:
        """Set a variable's content (it becomes ready)."""
        await self._do("POST", f"/semantic_var/{var.var_id}", {**self._auth(), "content": content}, op=f"set variable {var.name!r}")

    async def submit(
        self,
        template: str,
        *,
        inputs: Mapping[str, SemanticVar | str],
        output: str,
        params: SamplingParams,
        func_name: str | None = None,
        models: list[str] | None = None,
        model_type: str = "text",
        output_criteria: str | None = None,
    ) -> SemanticVar:
        """Submit a semantic call and return its output variable (not waited for).

        Args:
            template: prompt with ``{{name}}`` placeholders; the output placeholder must end it.
            inputs: a value (constant text) or a `SemanticVar` (e.g. another call's output) per input placeholder.
            output: the output placeholder's name.
            params: sampling parameters of the generation.
            func_name: a label ServeCore keeps with the call.
            models: engine model names allowed to serve it (empty: any engine).
            model_type: "text" for engines that take text (Parrot's openai engine), "token_id" for its builtin one.
            output_criteria: activate the output at once with this criterion instead of at the first get.

        Raises:
            ConfigError: placeholders and parameters disagree, or a sampling parameter Parrot lacks.
        """
        try:
            check_template(template, inputs, output)
            config = sampling_config(params)
            if output_criteria is not None:
                _check_criteria(output_criteria)
        except ConfigError:
            await self.close()
            raise
        parameters: list[dict[str, Any]] = []
        for name, value in inputs.items():
            if isinstance(value, SemanticVar):
                parameters.append({"name": name, "is_output": False, "var_id": value.var_id})
            else:
                parameters.append({"name": name, "is_output": False, "value": str(value)})
        parameters.append({"name": output, "is_output": True, "sampling_config": config})
        self._call_count += 1
        body = {
            **self._auth(),
            "func_name": func_name or f"call_{self._call_count}",
            "template": template,
            "parameters": parameters,
            "models": list(models or []),
            "model_type": model_type,
            "remove_pure_fill": True,
            "cache_prefix": True,
            "output_criteria": output_criteria,
            "fuse_fill": False,
        }
        data = await self._do("POST", "/semantic_call", body, op=f"submit semantic call {body['func_name']!r}")
        for info in data.get("param_info") or []:
            if info.get("parameter_name") == output and info.get("is_output"):
                return SemanticVar(output, str(info["var_id"]))
        await self.close()
        raise ParrotError(f"ServeCore's answer to a semantic call names no output variable {output!r}: {data}")

    async def get(self, var: SemanticVar, criteria: str = "latency", *, timeout: float = 600.0) -> str:
        """Block until a variable is ready and return its content.

        The first get of a call's output activates it (and everything it depends on) under ``criteria``.

        Raises:
            ParrotError: not ready within ``timeout`` seconds, or the session was dropped while waiting.
            BackendUnreachableError: ServeCore went away.
        """
        _check_criteria(criteria)
        if self.closed:
            raise ParrotError(f"Parrot session {self.session_id} is closed; open a new one")
        if self.probe_interval > 0:
            async with self._probe_lock:
                if self._probe is None:
                    self._probe = await self.variable("_liveness", "")
        body = {**self._auth(), "criteria": criteria}
        started = time.monotonic()
        fetch = asyncio.ensure_future(
            self.client.request("GET", f"/semantic_var/{var.var_id}", body, op=f"get variable {var.name!r}", read_timeout=timeout)
        )
        try:
            while True:
                done, _ = await asyncio.wait({fetch}, timeout=self.probe_interval if self.probe_interval > 0 else None)
                if fetch in done:
                    break
                await self._check_alive(body)
            data = fetch.result()
        except _Timeout as exc:
            await self.close()
            raise ParrotError(
                f"semantic variable {var.name!r} (id {var.var_id}) was not ready after {time.monotonic() - started:.0f} s: "
                f"ServeCore may have no live engine for this call's model, or its engine stopped answering"
            ) from exc
        except ParrotError as exc:
            await self.close()
            if "no longer knows the session" in str(exc):
                raise ParrotError(
                    f"ServeCore dropped session {self.session_id} while variable {var.name!r} was pending: "
                    f"its engine failed (ServeCore marks a session bad when an engine request fails), or the session expired"
                ) from exc
            raise
        except BaseException:
            await self.close()
            raise
        finally:
            if not fetch.done():
                fetch.cancel()
                with contextlib.suppress(BaseException):
                    await fetch
        if "content" not in data:
            await self.close()
            raise ParrotError(f"ServeCore's answer to get variable {var.name!r} has no content: {data}")
        return str(data["content"])

    async def _check_alive(self, body: dict) -> None:
        """A get of a ready variable answers at once, or fails if ServeCore no longer has the session.

        Concurrent gets share one check per ``probe_interval``.
        """
        async with self._probe_lock:
            if time.monotonic() - self._last_probe < self.probe_interval or self._probe is None:
                return
            self._last_probe = time.monotonic()
            await self.client.request("GET", f"/semantic_var/{self._probe.var_id}", body, op="check the session")

    async def close(self) -> None:
        """Remove the session from ServeCore (best effort; idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            await self.client.request("DELETE", f"/session/{self.session_id}", self._auth(), op="remove session")
        except Exception as exc:  # the session may already be gone (expired, dropped) or ServeCore down
            logger.debug("closing Parrot session %s: %s", self.session_id, exc)


class TokenCounter:
    """Counts tokens with the served model's tokenizer, as the server would.

    Parrot's openai engine sends each prompt as one chat user message, so prompt tokens are counted through
    the tokenizer's chat template when it has one.

    Args:
        tokenizer: a Hugging Face tokenizer, or a model directory to load one from.
        chat: count prompts through the chat template (when the tokenizer has one).

    Example:
        >>> counter = TokenCounter("path/to/model")  # doctest: +SKIP
        >>> counter.count("hello world")  # doctest: +SKIP
        2
    """

    def __init__(self, tokenizer: Any, *, chat: bool = True) -> None:
        if isinstance(tokenizer, (str, Path)):
            from langchain_energy.models import load_tokenizer

            tokenizer = load_tokenizer(str(tokenizer))
        if not hasattr(tokenizer, "encode"):
            raise ConfigError(f"tokenizer must be a Hugging Face tokenizer or a model directory, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.chat = chat and bool(getattr(tokenizer, "chat_template", None))

    def count(self, text: str) -> int:
        """Tokens of a piece of text (no special tokens)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens the server sees for a prompt sent as one user message."""
        if self.chat:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True)
            if isinstance(ids, Mapping):  # some tokenizers return a BatchEncoding
                ids = ids["input_ids"]
            return len(ids)
        return len(self.tokenizer.encode(prompt))


def resolve_token_counter(tokenizer: Any, model: str) -> TokenCounter:
    """A `TokenCounter` from a tokenizer, a model directory, or (when None) the model's registry name.

    Raises:
        ConfigError: no tokenizer can be found (Parrot returns no token counts, so one is required).
    """
    if isinstance(tokenizer, TokenCounter):
        return tokenizer
    if tokenizer is not None:
        return TokenCounter(tokenizer)
    try:
        from langchain_energy.models import resolve_model

        return TokenCounter(resolve_model(model).path)
    except Exception as exc:
        raise ConfigError(
            f"Parrot returns no token counts, so the served model's tokenizer is needed: pass tokenizer= "
            f"(a tokenizer or model directory); model {model!r} did not resolve to one ({exc})"
        ) from exc


def prompt_call(prompt: str) -> tuple[str, dict[str, str]]:
    """A template and inputs for a plain prompt: the prompt as constant text, so ServeCore can share its
    prefix; as a bound value when it contains text that looks like a placeholder."""
    if PLACEHOLDER.search(prompt):
        return "{{prompt}}{{output}}", {"prompt": prompt}
    return prompt + "{{output}}", {}


def infer_finish_reason(completion_tokens: int, params: SamplingParams) -> str:
    """Parrot does not report why generation stopped: "length" when the budget was used up, else "stop"."""
    return "length" if completion_tokens >= params.max_tokens else "stop"


@dataclass
class ParrotBackend:
    """`Backend` on Parrot: each call is one semantic call in a shared, lazily opened ServeCore session.

    Args:
        base_url: ServeCore's address, e.g. ``http://127.0.0.1:9000``.
        model: the engine's model name (ServeCore routes the call to engines serving it).
        tokenizer: the served model's tokenizer or model directory (None: resolved from ``model``).
        criteria: performance criterion of the blocking get: "latency" or "throughput".
        request_timeout_s: seconds a call may wait for its output.
        connect_timeout: seconds to wait for a connection.

    Example:
        >>> backend = ParrotBackend("http://127.0.0.1:9000", "smollm2-135m", tokenizer=model_dir)  # doctest: +SKIP
        >>> c = await backend.acomplete("Name a colour:", SamplingParams(max_tokens=8))  # doctest: +SKIP
        >>> c.token_source
        'tokenizer'
    """

    base_url: str
    model: str
    tokenizer: Any = None
    criteria: str = "latency"
    request_timeout_s: float = 600.0
    connect_timeout: float = 5.0
    transport: httpx.AsyncBaseTransport | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_criteria(self.criteria)
        if not self.model:
            raise ConfigError("ParrotBackend needs the engine's model name")
        self.model_name = self.model
        self._client = ParrotClient(
            self.base_url, connect_timeout=self.connect_timeout, request_timeout=min(60.0, self.request_timeout_s), transport=self.transport
        )
        self._counter: TokenCounter | None = None
        self._session: ParrotSession | None = None
        self._lock = asyncio.Lock()

    @property
    def counter(self) -> TokenCounter:
        """The token counter (the tokenizer is loaded on first use)."""
        if self._counter is None:
            self._counter = resolve_token_counter(self.tokenizer, self.model)
        return self._counter

    async def _open(self) -> ParrotSession:
        async with self._lock:
            if self._session is None or self._session.closed:
                self._session = await self._client.open_session()
            return self._session

    async def acomplete(self, prompt: str, params: SamplingParams) -> Completion:
        """One semantic call: submit the prompt, block on its output variable, count tokens."""
        counter = self.counter
        template, inputs = prompt_call(prompt)
        started = time.perf_counter()
        session = await self._open()
        out = await session.submit(template, inputs=inputs, output="output", params=params, models=[self.model], func_name="complete")
        text = await session.get(out, self.criteria, timeout=self.request_timeout_s)
        latency = time.perf_counter() - started
        completion_tokens = counter.count(text)
        return Completion(
            text=text,
            prompt_tokens=counter.prompt_tokens(prompt),
            completion_tokens=completion_tokens,
            cached_tokens=None,
            ttft_s=None,
            latency_s=latency,
            finish_reason=infer_finish_reason(completion_tokens, params),
            token_source="tokenizer",
            extra={"parrot_session_id": session.session_id, "parrot_var_id": out.var_id},
        )

    async def astream(self, prompt: str, params: SamplingParams) -> AsyncIterator[StreamEvent]:
        """Parrot's ServeCore API does not stream: one text event, then the finished completion."""
        completion = await self.acomplete(prompt, params)
        yield StreamEvent(text=completion.text)
        yield StreamEvent(completion=completion)

    async def aclose(self) -> None:
        """Close the session and the HTTP connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self._client.aclose()
