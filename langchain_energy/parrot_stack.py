"""A managed Parrot stack: ServeCore and its "openai" engine in front of an OpenAI-compatible vLLM server.

ParrotServe is a research prototype that is not on PyPI. With its source tree at ``PARROT_SRC`` (the
directory holding its ``parrot/`` package; it also needs ``pip install parse``), `ParrotStack` writes the two
configuration files, starts ServeCore and the engine as child processes on free loopback ports, waits until
the engine has registered, and stops both. Parrot's simulated network latency is switched off.

Example:
    >>> with VLLMServer(EngineConfig()) as vllm, ParrotStack(vllm.base_url, vllm.served_model_name,  # doctest: +SKIP
    ...                                                      tokenizer=vllm.spec.path) as parrot:
    ...     llm = ServingLLM(backend="parrot", base_url=parrot.base_url, model=vllm.served_model_name)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from langchain_energy._process import stop_process_group
from langchain_energy.errors import ConfigError, ServerDiedError, ServerStartError


def parrot_source(path: str | os.PathLike | None = None) -> Path:
    """The ParrotServe source tree: ``path`` or ``$PARROT_SRC``.

    Raises:
        ConfigError: neither is set, or the directory holds no ``parrot/serve`` package.
    """
    raw = path or os.environ.get("PARROT_SRC")
    if not raw:
        raise ConfigError("set PARROT_SRC to a ParrotServe source tree (the directory holding its parrot/ package)")
    root = Path(raw).expanduser()
    if not (root / "parrot" / "serve" / "http_server.py").is_file():
        raise ConfigError(f"{root} is not a ParrotServe source tree: parrot/serve/http_server.py is missing")
    return root


@dataclass
class SchedulerFeatures:
    """ServeCore's global scheduler switches (all on: Parrot's workflow-aware scheduling)."""

    app_fifo: bool = True
    graph_group: bool = True
    ctx_group: bool = True
    ctx_aware: bool = True
    max_queue_size: int = 2048


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ParrotStack:
    """ServeCore plus one "openai" engine, as managed child processes.

    Args:
        vllm_url: the OpenAI-compatible server the engine forwards to (ending in ``/v1``).
        model: its served model name (semantic calls name it in ``models``).
        tokenizer: the model directory (ServeCore keeps the engine's tokenizer name).
        parrot_src: the ParrotServe source tree (default: ``$PARROT_SRC``).
        scheduler: ServeCore's scheduling features.
        session_life_span_s: seconds an idle session lives in ServeCore.
        engine_heartbeat_timeout_s: seconds after the engine's last heartbeat before ServeCore drops it.
        startup_timeout_s: seconds to wait for each process to come up.
        log_dir: where the configs and logs go (default: a new temporary directory).
    """

    vllm_url: str
    model: str
    tokenizer: str
    parrot_src: str | None = None
    scheduler: SchedulerFeatures = field(default_factory=SchedulerFeatures)
    session_life_span_s: int = 3600
    engine_heartbeat_timeout_s: int = 30
    startup_timeout_s: float = 60.0
    log_dir: Path | None = None

    def __post_init__(self) -> None:
        self.src = parrot_source(self.parrot_src)
        self.core_port = 0
        self.engine_port = 0
        self._core: subprocess.Popen | None = None
        self._engine: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        """ServeCore's address, for `ParrotBackend` / ``ServingLLM(backend="parrot")``."""
        return f"http://127.0.0.1:{self.core_port}"

    def core_config(self) -> dict:
        """ServeCore's configuration."""
        return {
            "host": "127.0.0.1",
            "port": self.core_port,
            "max_sessions_num": 512,
            "max_engines_num": 4,
            "session_life_span": self.session_life_span_s,
            "engine_heartbeat_timeout": self.engine_heartbeat_timeout_s,
            "global_scheduler": {
                "app_fifo": self.scheduler.app_fifo,
                "graph_group": self.scheduler.graph_group,
                "ctx_group": self.scheduler.ctx_group,
                "ctx_aware": self.scheduler.ctx_aware,
                "max_queue_size": self.scheduler.max_queue_size,
            },
        }

    def engine_config(self) -> dict:
        """The openai engine's configuration. Its "chat" endpoint is the one that works with vLLM."""
        return {
            "model": self.model,
            "engine_name": f"openai-{self.model}",
            "host": "127.0.0.1",
            "port": self.engine_port,
            "engine_type": "openai",
            "random_seed": 0,
            "tasks_capacity": 256,
            "tokenizer": self.tokenizer,
            "instance": {"api_key": "unused", "api_endpoint": "chat", "base_url": self.vllm_url.rstrip("/"), "is_azure": False},
            "scheduler": {"max_batch_size": 256, "max_num_batched_tokens": 10**8, "max_total_tokens": 10**8},
            "serve_core": {"host": "127.0.0.1", "port": self.core_port},
        }

    def _env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(self.src), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "SIMULATE_NETWORK_LATENCY_PRT": "0", "PYTHONUNBUFFERED": "1"}

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self._env(), start_new_session=True)

    def start(self) -> ParrotStack:
        """Start ServeCore, then the engine; return when the engine has registered with ServeCore.

        Raises:
            ServerStartError: a process exited or did not come up in time (the message quotes its log).
        """
        if self._core is not None:
            return self
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="parrot-stack-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.core_port, self.engine_port = _free_port(), _free_port()
        core_cfg, engine_cfg = self.log_dir / "core.json", self.log_dir / "engine.json"
        core_cfg.write_text(json.dumps(self.core_config(), indent=2))
        engine_cfg.write_text(json.dumps(self.engine_config(), indent=2))
        try:
            self._core = self._spawn(["-m", "parrot.serve.http_server", "--config_path", str(core_cfg), "--release_mode"],
                                     self.log_dir / "servecore.log")
            # Any answer (404 included) means ServeCore's HTTP server is up.
            self._wait(self._core, "ServeCore", "servecore.log", lambda c: c.get(self.base_url + "/"))
            self._engine = self._spawn(["-m", "langchain_energy._parrot_engine", "--config_path", str(engine_cfg), "--release_mode"],
                                       self.log_dir / "engine.log")
            # The engine registers with ServeCore before its own server starts: /ping answering means registered.
            self._wait(self._engine, "the Parrot engine", "engine.log",
                       lambda c: c.post(f"http://127.0.0.1:{self.engine_port}/ping", json={}))
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, process: subprocess.Popen, what: str, log: str, probe) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise ServerStartError(f"{what} exited with code {process.returncode}; last lines of "
                                           f"{self.log_dir / log}:\n{self.log_tail(log)}")
                with contextlib.suppress(httpx.HTTPError):
                    probe(client)
                    return
                time.sleep(0.3)
        raise ServerStartError(f"{what} did not answer within {self.startup_timeout_s:.0f} s; last lines of "
                               f"{self.log_dir / log}:\n{self.log_tail(log)}")

    def log_tail(self, name: str = "servecore.log", lines: int = 20) -> str:
        """The last lines of a log in ``log_dir`` ("servecore.log" or "engine.log")."""
        path = Path(self.log_dir or ".") / name
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise `ServerDiedError` if ServeCore or the engine has exited."""
        for proc, what, log in ((self._core, "ServeCore", "servecore.log"), (self._engine, "the Parrot engine", "engine.log")):
            if proc is not None and proc.poll() is not None:
                raise ServerDiedError(f"{what} exited with code {proc.returncode} (log: {Path(self.log_dir) / log}):\n"
                                      f"{self.log_tail(log, 10)}")

    def stop_engine(self, timeout_s: float = 10.0) -> None:
        """Stop only the engine (ServeCore stays up)."""
        stop_process_group(self._engine, timeout_s)
        self._engine = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the engine, then ServeCore (SIGTERM, SIGKILL after ``timeout_s``)."""
        self.stop_engine(timeout_s)
        stop_process_group(self._core, timeout_s)
        self._core = None

    def __enter__(self) -> ParrotStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
