"""ServeCoreDouble: a TEST DOUBLE of Parrot's ServeCore HTTP API, for CI machines without ParrotServe.

It follows ServeCore's documented protocol (API version v1): sessions, semantic variables, semantic calls
with ``{{name}}`` templates, blocking gets that activate a call and everything it depends on, and errors as
HTTP 500 ``{"error", "traceback"}`` (user errors) or plain-text 500 (ServeCore's internal assertions and an
unknown placeholder). Generation is forwarded, like Parrot's "openai" engine, to an OpenAI-compatible chat
endpoint (the embedded vLLM server in tests), the whole prompt as one user message.

Fault behaviour copied from ServeCore's: a session idle longer than ``session_life_span`` is dropped; when an
engine request fails the session is marked bad and dropped, and gets waiting on it never return; a call
whose ``models`` name no engine never runs. Every request body is recorded in ``requests`` so tests can check
the exact JSON a client sends.

This is not Parrot: it has no scheduler. Use the real ServeCore (``PARROT_SRC``) for measurements.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

PLACEHOLDER = re.compile(r"\{\{([a-zA-Z_][a-zA-Z0-9_]*)\}\}")
CRITERIA = {"latency", "throughput", "TTFT", "TPOT"}


class _UserError(Exception):
    """What ServeCore raises as ParrotCoreUserError: answered as 500 JSON."""


class _InternalError(Exception):
    """What ServeCore raises from an assertion or a KeyError: answered as plain-text 500."""


def _user_error(exc_type: str, msg: str) -> _UserError:
    # ServeCore's release-mode message: repr of its ParrotError wrapping the original exception.
    return _UserError(f"ParrotError(type=<class '{exc_type}'>, msg={msg})")


@dataclass
class _Var:
    var_id: str
    name: str
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    content: str | None = None
    producer: _Call | None = None

    def set(self, content: str) -> None:
        if self.content is not None:
            raise _InternalError(f"This semantic variable (id={self.var_id}) is filled")
        self.content = content
        self.ready.set()


@dataclass
class _Call:
    template: str
    params: dict[str, dict]
    inputs: dict[str, _Var]
    output: _Var
    models: list[str]
    activated: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Session:
    session_id: int
    auth: str
    last_access: float
    vars: dict[str, _Var] = field(default_factory=dict)
    bad: bool = False


class ServeCoreDouble:
    """A ServeCore test double on a local port, in a background thread.

    Args:
        engine_url: an OpenAI-compatible base URL ending in ``/v1`` (None: no engine, calls never run).
        engine_model: the engine's model name.
        session_life_span: seconds an idle session lives.

    Example:
        >>> with ServeCoreDouble(engine_url=server.base_url, engine_model=server.served_model_name) as core:  # doctest: +SKIP
        ...     backend = ParrotBackend(core.base_url, server.served_model_name, tokenizer=path)
    """

    def __init__(self, engine_url: str | None, engine_model: str = "", *, session_life_span: float = 600.0) -> None:
        self.engine_url = engine_url.rstrip("/") if engine_url else None
        self.engine_model = engine_model
        self.session_life_span = session_life_span
        self.requests: list[tuple[str, str, Any]] = []
        self.engine_requests: list[dict] = []
        self.sessions: dict[int, _Session] = {}
        self._next_session = 0
        self._tasks: set[asyncio.Task] = set()
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # ---------- lifecycle ----------

    def start(self) -> ServeCoreDouble:
        app = Starlette(routes=[
            Route("/v1/session", self._register_session, methods=["POST"]),
            Route("/v1/session/{session_id:int}", self._remove_session, methods=["DELETE"]),
            Route("/v1/semantic_var", self._register_var, methods=["POST"]),
            Route("/v1/semantic_var/{var_id}", self._set_var, methods=["POST"]),
            Route("/v1/semantic_var/{var_id}", self._get_var, methods=["GET"]),
            Route("/v1/semantic_call", self._submit_call, methods=["POST"]),
        ])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="servecore-double", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("ServeCoreDouble did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ServeCoreDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def bodies(self, path_prefix: str = "") -> list[Any]:
        """Recorded request bodies whose path starts with ``path_prefix``."""
        return [b for _, p, b in self.requests if p.startswith(path_prefix)]

    # ---------- helpers ----------

    async def _payload(self, request: Request) -> dict:
        body = await request.json()
        self.requests.append((request.method, request.url.path, body))
        return body

    def _sweep(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if s.bad or now - s.last_access > self.session_life_span:
                del self.sessions[sid]

    def _session(self, payload: dict, session_id: int | None = None) -> _Session:
        self._sweep()
        sid = payload.get("session_id") if session_id is None else session_id
        session = self.sessions.get(sid)
        if session is None:
            raise _user_error("RuntimeError", f"Session (session_id={sid}) not found.")
        session.last_access = time.monotonic()
        return session

    def _var(self, session: _Session, var_id: str) -> _Var:
        var = session.vars.get(var_id)
        if var is None:
            raise _user_error("ValueError", f"Unknown Semantic Variable ID: {var_id}")
        return var

    def _new_var(self, session: _Session, name: str) -> _Var:
        var = _Var(str(uuid.uuid4()), name)
        session.vars[var.var_id] = var
        return var

    @staticmethod
    def _wrap(handler):
        async def run(self, request: Request):
            try:
                return JSONResponse(await handler(self, request))
            except _UserError as exc:
                return JSONResponse({"error": str(exc), "traceback": ""}, status_code=500)
            except (_InternalError, KeyError, AssertionError):
                return PlainTextResponse("Internal Server Error", status_code=500)
        return run

    # ---------- routes ----------

    @_wrap
    async def _register_session(self, request: Request) -> dict:
        await self._payload(request)
        sid = self._next_session
        self._next_session += 1
        self.sessions[sid] = _Session(sid, secrets.token_hex(4), time.monotonic())
        return {"session_id": sid, "session_auth": self.sessions[sid].auth}

    @_wrap
    async def _remove_session(self, request: Request) -> dict:
        payload = await self._payload(request)
        sid = request.path_params["session_id"]
        self._session(payload, sid)
        del self.sessions[sid]
        return {}

    @_wrap
    async def _register_var(self, request: Request) -> dict:
        payload = await self._payload(request)
        session = self._session(payload)
        return {"var_id": self._new_var(session, payload["var_name"]).var_id}

    @_wrap
    async def _set_var(self, request: Request) -> dict:
        payload = await self._payload(request)
        session = self._session(payload)
        self._var(session, request.path_params["var_id"]).set(payload["content"])
        return {}

    @_wrap
    async def _get_var(self, request: Request) -> dict:
        payload = await self._payload(request)
        session = self._session(payload)
        var = self._var(session, request.path_params["var_id"])
        if payload["criteria"] not in CRITERIA:
            raise _InternalError("unknown criteria")
        if var.producer is not None:
            self._activate(var.producer)
        await var.ready.wait()
        return {"content": var.content}

    @_wrap
    async def _submit_call(self, request: Request) -> dict:
        payload = await self._payload(request)
        session = self._session(payload)
        if "template" not in payload or "parameters" not in payload:
            raise _InternalError("Missing field")
        params: dict[str, dict] = {}
        for p in payload["parameters"]:
            _check_parameter(p)
            if p["name"] in params:
                raise _InternalError("Duplicate parameter name.")
            params[p["name"]] = p
        names = PLACEHOLDER.findall(payload["template"])
        inputs: dict[str, _Var] = {}
        output: _Var | None = None
        info = []
        for name in names:
            p = params[name]  # KeyError -> plain 500, as in ServeCore
            if p["is_output"]:
                output = self._new_var(session, name)
                var = output
            elif p.get("var_id") is not None:
                var = self._var(session, p["var_id"])
                inputs[name] = var
            else:
                var = self._new_var(session, name)
                var.set(str(p["value"]))
                inputs[name] = var
            info.append({"parameter_name": name, "is_output": p["is_output"], "var_name": var.name, "var_id": var.var_id})
        if output is None:
            raise _InternalError("no output placeholder")
        call = _Call(payload["template"], params, inputs, output, list(payload.get("models") or []))
        output.producer = call
        task = asyncio.get_running_loop().create_task(self._execute(session, call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if payload.get("output_criteria") is not None:
            self._activate(call)
        return {"request_id": len(self.requests), "param_info": info}

    # ---------- execution ----------

    def _activate(self, call: _Call) -> None:
        if call.activated.is_set():
            return
        call.activated.set()
        for var in call.inputs.values():
            if var.producer is not None:
                self._activate(var.producer)

    async def _execute(self, session: _Session, call: _Call) -> None:
        await call.activated.wait()
        for var in call.inputs.values():
            await var.ready.wait()
        if self.engine_url is None or (call.models and self.engine_model not in call.models):
            return  # no engine can take it: it waits forever, as in ServeCore
        prompt = _render(call.template, call.inputs)
        sampling = call.params[call.output.name].get("sampling_config") or {}
        body = {
            "model": self.engine_model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": sampling.get("temperature", 1.0),
            "top_p": sampling.get("top_p", 1.0),
            "max_tokens": sampling.get("max_gen_length", 512),
            "stop": sampling.get("stop_str"),
        }
        self.engine_requests.append(body)
        try:
            async with httpx.AsyncClient(timeout=600) as client:
                resp = await client.post(f"{self.engine_url}/chat/completions", json=body)
                resp.raise_for_status()
                text = resp.json()["choices"][0]["message"]["content"]
        except Exception:
            session.bad = True  # ServeCore marks the session bad and sweeps it; its gets never return
            return
        call.output.set(text)


def _check_parameter(p: dict) -> None:
    """ServeCore's parameter rules (user errors)."""
    for key in ("name", "is_output"):
        if key not in p:
            raise _user_error("TypeError", f"missing parameter field {key!r}")
    if p["is_output"]:
        if p.get("var_id") is not None:
            raise _user_error("ValueError", "Output parameter should not have var_id.")
    else:
        if p.get("sampling_config") is not None:
            raise _user_error("ValueError", "Input parameter should not have sampling_config.")
        if p.get("var_id") is None and p.get("value") is None:
            raise _user_error("ValueError", "Input parameter should have either var_id or value.")
    if p.get("var_id") is not None and p.get("value") is not None:
        raise _user_error("ValueError", "Parameter should not have both var_id and value.")


def _render(template: str, inputs: dict[str, _Var]) -> str:
    """The prompt: text and input contents in order, up to the output placeholder (trailing text dropped)."""
    out = []
    pos = 0
    for m in PLACEHOLDER.finditer(template):
        out.append(template[pos:m.start()])
        if m.group(1) not in inputs:
            break
        out.append(inputs[m.group(1)].content or "")
        pos = m.end()
    return "".join(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
