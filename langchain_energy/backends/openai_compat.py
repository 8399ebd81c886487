"""Any vLLM OpenAI-compatible server, spoken to over async HTTP with streaming.

Every request streams (with usage in the last chunk), so the time to first token is measured for every call,
not only for callers that stream: the metering splits prefill from decode energy at that instant.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import AsyncIterator, Callable

import httpx

from langchain_energy.backends.base import Completion, SamplingParams, StreamEvent
from langchain_energy.errors import (
    AuthenticationError,
    BackendError,
    BackendUnreachableError,
    ConfigError,
    ContextLengthError,
    ModelNotFoundError,
)

_CONTEXT_PHRASES = ("context length", "maximum context", "too long", "max_model_len", "maximum model length")


class OpenAICompatBackend:
    """A backend for an OpenAI-compatible vLLM server at `base_url`.

    Args:
        base_url: the server's URL ending in /v1, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name.
        api: "chat" (the model's chat template applies) or "completions" (the prompt goes in raw).
        connect_timeout_s: how long to wait for a TCP connection before calling the server unreachable.
        request_timeout_s: how long one request may take in all.
        health_check: called when the connection fails, to turn "connection refused" into the real cause
            (a managed server that died raises `ServerDiedError` naming its log).
        api_key: sent as a bearer token (a server started with ``--api-key``, or a gateway); never logged.

    Example:
        >>> backend = OpenAICompatBackend("http://127.0.0.1:8000/v1", "smollm2-135m")  # doctest: +SKIP
        >>> completion = await backend.acomplete("Say hi", SamplingParams(max_tokens=8))  # doctest: +SKIP
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api: str = "chat",
        connect_timeout_s: float = 10.0,
        request_timeout_s: float = 600.0,
        health_check: Callable[[], None] | None = None,
        api_key: str | None = None,
    ) -> None:
        if api not in ("chat", "completions"):
            raise ConfigError(f"api must be 'chat' or 'completions', got {api!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.api = api
        self.timeout = httpx.Timeout(request_timeout_s, connect=connect_timeout_s)
        self.health_check = health_check
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # httpx async clients belong to one event loop; keep one per loop that calls us.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
            client = self._clients[loop] = httpx.AsyncClient(timeout=self.timeout, limits=limits,
                                                             headers=self._headers)
        return client

    def request_body(self, prompt: str, params: SamplingParams, *, messages: list[dict] | None = None,
                     extra: dict | None = None, model: str | None = None) -> dict:
        """The JSON body of one streaming request.

        Args:
            prompt: the user's text (ignored when `messages` is given).
            params: sampling parameters.
            messages: a whole chat conversation in OpenAI form, sent instead of `prompt` (chat API only).
            extra: more fields merged into the body (``tools``, ``tool_choice``, ``response_format``, ...).
            model: the served model name for this request only (default: the backend's).
        """
        if messages is not None and self.api != "chat":
            raise ConfigError("a message list needs the chat API (api='chat')")
        body: dict = {
            "model": model or self.model_name,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.api == "chat":
            body["messages"] = messages if messages is not None else [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if params.ignore_eos:
            body["ignore_eos"] = True  # vLLM extension: fixed-length outputs
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.priority is not None:
            body["priority"] = params.priority
        if extra:
            body.update(extra)
        return body

    async def astream(self, prompt: str, params: SamplingParams, *, messages: list[dict] | None = None,
                      extra: dict | None = None, model: str | None = None) -> AsyncIterator[StreamEvent]:
        """Stream text (and tool-call) deltas; the last event carries the finished `Completion`.

        `messages`, `extra` and `model` are as in `request_body`.
        """
        url = f"{self.base_url}/{'chat/completions' if self.api == 'chat' else 'completions'}"
        body = self.request_body(prompt, params, messages=messages, extra=extra, model=model)
        started = time.perf_counter()
        ttft = None
        pieces: list[str] = []
        usage: dict = {}
        finish_reason = None
        try:
            async with self._client().stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._http_error(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        # vLLM reports some refusals (e.g. a schema its grammar cannot decode) inside the stream.
                        raise self._stream_error(chunk["error"])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        text = delta.get("content") if self.api == "chat" else choice.get("text")
                        finish_reason = choice.get("finish_reason") or finish_reason
                        calls = tuple(delta.get("tool_calls") or ())
                        if text or calls:
                            if ttft is None:
                                ttft = time.perf_counter() - started
                            if text:
                                pieces.append(text)
                            yield StreamEvent(text=text or "", tool_calls=calls)
        except httpx.ConnectError as exc:
            self._raise_if_dead()
            raise BackendUnreachableError(
                f"no server answered at {self.base_url} ({exc}); is it running, and is the URL right?"
            ) from exc
        except httpx.TimeoutException as exc:
            self._raise_if_dead()
            raise BackendUnreachableError(f"request to {self.base_url} timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            self._raise_if_dead()
            raise BackendError(f"the connection to {self.base_url} broke mid-request: {exc}") from exc
        if not usage:
            raise BackendError(f"{self.base_url} sent no usage; is it a vLLM OpenAI-compatible server?")
        details = usage.get("prompt_tokens_details") or {}
        yield StreamEvent(
            completion=Completion(
                text="".join(pieces),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                cached_tokens=details.get("cached_tokens"),
                ttft_s=ttft,
                latency_s=time.perf_counter() - started,
                finish_reason=finish_reason,
                token_source="server",
            )
        )

    async def acomplete(self, prompt: str, params: SamplingParams, **request: object) -> Completion:
        """Generate one completion (`request`: ``messages``, ``extra``, ``model`` as in `request_body`)."""
        completion = None
        async for event in self.astream(prompt, params, **request):
            # Run the generator to its end: leaving it early costs a finalizer round trip through the loop.
            completion = event.completion or completion
        if completion is None:  # pragma: no cover - astream always yields one
            raise BackendError("the stream ended without a completion")
        return completion

    def _stream_error(self, error: object) -> Exception:
        """An error event sent inside a stream, as the same error types as an HTTP error status."""
        if not isinstance(error, dict):
            return BackendError(f"the server failed the request mid-stream: {str(error)[:500]}")
        message = str(error.get("message") or error)[:500]
        code = error.get("code")
        if isinstance(code, int) and 400 <= code < 500:
            return ConfigError(f"the server refused the request (HTTP {code}): {message}")
        return BackendError(f"the server failed the request mid-stream: {message}")

    def _raise_if_dead(self) -> None:
        if self.health_check is not None:
            self.health_check()

    def _http_error(self, response: httpx.Response) -> Exception:
        try:
            payload = response.json()
            message = payload.get("message") or (payload.get("error") or {}).get("message") or response.text
        except (ValueError, AttributeError):
            message = response.text
        message = str(message)[:500]
        if response.status_code in (401, 403):
            return AuthenticationError(
                f"{self.base_url} refused the API key (HTTP {response.status_code}): "
                + ("the key is wrong" if self._headers else "none was given; pass api_key= or set OPENAI_API_KEY"))
        if response.status_code == 404 and "model" in message.lower():
            return ModelNotFoundError(f"{self.base_url} does not serve model {self.model_name!r}: {message}")
        if response.status_code == 400 and any(p in message.lower() for p in _CONTEXT_PHRASES):
            return ContextLengthError(f"prompt does not fit the model's context: {message}")
        if 400 <= response.status_code < 500:
            return ConfigError(f"the server refused the request (HTTP {response.status_code}): {message}")
        self._raise_if_dead()
        return BackendError(f"the server failed the request (HTTP {response.status_code}): {message}")

    async def aclose(self) -> None:
        """Close this loop's HTTP client."""
        with_loop = asyncio.get_running_loop()
        client = self._clients.pop(with_loop, None)
        if client is not None:
            await client.aclose()
