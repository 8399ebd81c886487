"""A managed vLLM OpenAI-compatible server: start it on a free loopback port, watch it, stop it.

The server runs as a child process in its own process group, so stopping it stops the engine processes it
spawned too. The same code serves the embedded model with vLLM's CPU build and a 7B model on a GPU; only the
model and the engine knobs differ.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from langchain_energy._process import stop_process_group
from langchain_energy.backends.metrics import MetricsClient, MetricsSnapshot
from langchain_energy.errors import ConfigError, InfeasibleConfigError, ServerDiedError, ServerStartError
from langchain_energy.meters.served import serve_on_gpus
from langchain_energy.models import ModelSpec, resolve_model

# vLLM's words for "this configuration does not fit in memory" at start-up (GPU and CPU backends). They
# often sit well above the last lines of the log, so the whole log is searched.
_MEMORY_FAILURES = (
    "less than requested memory for kv",
    "no available memory for the cache blocks",
    "larger than the available kv cache memory",
    "larger than the maximum number of tokens that can be stored in kv cache",
    "out of memory",
    "outofmemoryerror",
    "cannot allocate memory",
    "insufficient memory",
)


def gpu_available() -> bool:
    """True when vLLM here is a CUDA build that sees a GPU (decides the engine defaults)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch means no GPU engine either
        return False


@dataclass(frozen=True)
class EngineConfig:
    """The engine knobs of one vLLM server. Changing any of them needs a new engine.

    Attributes:
        model: registry name, model directory or hub name (see `langchain_energy.models`).
        max_num_seqs: batch size, the most sequences the engine runs in one step.
        max_num_batched_tokens: the most tokens in one engine step (None: max(max_model_len, 8192)).
        enable_prefix_caching: reuse the KV cache of shared prompt prefixes.
        max_model_len: context window (None: the model's, capped at 8192 on the CPU).
        enforce_eager: skip graph capture/compilation (faster start, slightly slower steps).
        memory_fraction: vLLM's --gpu-memory-utilization (on the CPU: fraction of the NUMA node's memory).
        cpu_kvcache_gib: KV cache size on the CPU backend (VLLM_CPU_KVCACHE_SPACE), None to leave it to vLLM.
        load_format: "auto", or "dummy" for random weights (None: the model registry's choice).
        dtype: weights dtype (None: the registry's choice).
        seed: engine seed, for repeatable sampling.
        scheduling_policy: "fcfs" or "priority" (then requests may carry a priority, lower first).
        tool_call_parser: vLLM's tool-call parser for the model (e.g. "hermes"), which lets chat models use
            ``tool_choice="auto"``; None: no parser (forced tool calls still work, by JSON-schema decoding).
        tensor_parallel_size: GPUs the engine's weights are split over (vLLM ``--tensor-parallel-size``).
        extra_args: more command-line flags passed through unchanged.

    Example:
        >>> EngineConfig(max_num_seqs=4).with_changes(max_num_seqs=16).max_num_seqs
        16
    """

    model: str = "smollm2-135m"
    max_num_seqs: int = 8
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    enforce_eager: bool = True
    memory_fraction: float | None = None
    cpu_kvcache_gib: int | None = None
    load_format: str | None = None
    dtype: str | None = None
    seed: int = 0
    scheduling_policy: str = "fcfs"
    tool_call_parser: str | None = None
    tensor_parallel_size: int = 1
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"memory_fraction must be in (0, 1], got {self.memory_fraction!r}")
        if self.cpu_kvcache_gib is not None and (
            isinstance(self.cpu_kvcache_gib, bool) or not isinstance(self.cpu_kvcache_gib, int) or self.cpu_kvcache_gib < 1
        ):
            # vLLM reads VLLM_CPU_KVCACHE_SPACE as whole GiB.
            raise ConfigError(f"cpu_kvcache_gib must be a whole number of GiB >= 1, got {self.cpu_kvcache_gib!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")

    def with_changes(self, **changes) -> EngineConfig:
        """A copy with some knobs changed."""
        return replace(self, **changes)

    @property
    def gpu_count(self) -> int:
        """How many GPUs the engine occupies on a GPU host: tensor x pipeline x data parallel sizes.

        vLLM places its workers on the first that many of the devices it sees; the sizes come from
        `extra_args` (``--tensor-parallel-size``/``-tp``, ``--pipeline-parallel-size``/``-pp``,
        ``--data-parallel-size``/``-dp``, each 1 when absent; the tensor size from `tensor_parallel_size`
        when `extra_args` does not name it).

        Example:
            >>> EngineConfig(extra_args=("--tensor-parallel-size", "2", "-pp=2")).gpu_count
            4
            >>> EngineConfig(tensor_parallel_size=2).gpu_count
            2
        """
        count = 1
        for flags in _PARALLEL_FLAGS:
            value = _flag_value(self.extra_args, flags)
            if value is None:
                if flags is _PARALLEL_FLAGS[0]:
                    count *= self.tensor_parallel_size
                continue
            try:
                size = int(value)
            except ValueError:
                size = 0
            if size < 1:
                raise ConfigError(f"{flags[0]} must be a positive integer, got {value!r}")
            count *= size
        return count

    def to_dict(self) -> dict:
        """Plain dict, for metadata files."""
        return asdict(self)

    def server_args(self, spec: ModelSpec, on_gpu: bool) -> list[str]:
        """The command-line flags of vLLM's OpenAI server for this configuration."""
        max_model_len = self.max_model_len or (spec.max_model_len if on_gpu else min(spec.max_model_len or 8192, 8192))
        batched = self.max_num_batched_tokens or max(max_model_len or 0, 8192)
        fraction = self.memory_fraction or (0.85 if on_gpu else 0.3)
        args = [
            "--model", spec.path,
            "--served-model-name", spec.served_name,
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(batched),
            "--gpu-memory-utilization", str(fraction),
            "--load-format", self.load_format or spec.load_format,
            "--dtype", self.dtype or spec.dtype,
            "--seed", str(self.seed),
            "--scheduling-policy", self.scheduling_policy,
            "--enable-prompt-tokens-details",
            "--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching",
        ]
        if max_model_len:
            args += ["--max-model-len", str(max_model_len)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.tensor_parallel_size > 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.tool_call_parser:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        return args + list(self.extra_args)

    @property
    def auto_tool_choice(self) -> bool:
        """Whether the server parses free-form tool calls (``tool_choice="auto"``): a parser is configured.

        Example:
            >>> EngineConfig(tool_call_parser="hermes").auto_tool_choice
            True
        """
        return bool(self.tool_call_parser or _flag_value(self.extra_args, ("--tool-call-parser",)))


_PARALLEL_FLAGS = (
    ("--tensor-parallel-size", "-tp"),
    ("--pipeline-parallel-size", "-pp"),
    ("--data-parallel-size", "-dp"),
)


def _flag_value(args: tuple[str, ...], names: tuple[str, ...]) -> str | None:
    """The value of the last of `names` in a command line (``--flag V`` or ``--flag=V``), or None."""
    value = None
    for i, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if name in names:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def _visible_devices(value: str) -> list[str]:
    """The entries of a ``CUDA_VISIBLE_DEVICES`` value ("" means none)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _free_port(preferred: int | None = None) -> int:
    """`preferred` when it can be bound (a restart keeps its address), else any free loopback port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the server's own socket does: a port in TIME_WAIT after a stop can be bound again.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise ServerStartError("no free loopback port")  # pragma: no cover - binding port 0 does not fail


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM us if the parent dies, so no engine outlives a killed client."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_LIVE_SERVERS: weakref.WeakSet[VLLMServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE_SERVERS):
        server.stop()


class VLLMServer:
    """vLLM's OpenAI-compatible server as a managed child process on a free loopback port.

    Example:
        >>> with VLLMServer(EngineConfig(max_num_seqs=8)) as server:  # doctest: +SKIP
        ...     print(server.base_url)            # http://127.0.0.1:PORT/v1
        ...     before = server.metrics()
        ...     ...                                # send requests
        ...     delta = server.metrics() - before  # counters accumulated in between
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        startup_timeout_s: float = 600.0,
        log_dir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Describe the server; nothing starts until `start()` or `with`.

        Args:
            config: engine knobs (default: the embedded model, batch size 8).
            startup_timeout_s: how long to wait for /health before giving up.
            log_dir: where the server's log goes (default: a new temporary directory).
            env: extra environment variables for the server process.
        """
        self.config = config or EngineConfig()
        self.startup_timeout_s = startup_timeout_s
        self._log_dir = Path(log_dir) if log_dir else None
        self._env = dict(env or {})
        self._process: subprocess.Popen | None = None
        self._lock = threading.RLock()
        self.port: int | None = None
        self.log_path: Path | None = None
        self.spec: ModelSpec | None = None
        self.on_gpu = gpu_available()
        self.startup_s: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def root_url(self) -> str:
        """http://127.0.0.1:PORT (where /health and /metrics live)."""
        if self.port is None:
            raise ServerDiedError("the vLLM server is not running; call start() first")
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, ending in /v1."""
        return self.root_url + "/v1"

    @property
    def served_model_name(self) -> str:
        """The model name that requests must carry."""
        return (self.spec or resolve_model(self.config.model)).served_name

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server process's PID while it runs (its engine processes are its descendants), else None."""
        return self._process.pid if self.running else None

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        """The GPUs the engine serves on, as this process's meters index them; ``()`` for a CPU engine.

        vLLM puts its `EngineConfig.gpu_count` workers on the first devices it sees: those named by the
        ``CUDA_VISIBLE_DEVICES`` the server is given (through ``env``, else inherited), or all. Zeus indexes the
        GPUs *this* process sees, so the engine's devices are mapped into this process's list. Build the meter
        from it so that idle GPUs beside the engine are not charged to its calls:
        ``auto_meter(gpu_indices=server.gpu_indices)``.

        Raises:
            ConfigError: the engine's GPUs are not visible to this process, or are named by UUID/MIG ids that
                cannot be matched (pass ``gpu_indices`` to the meter yourself then).
        """
        if not self.on_gpu:
            return ()
        ours = os.environ.get("CUDA_VISIBLE_DEVICES")
        theirs = self._env.get("CUDA_VISIBLE_DEVICES", ours)
        count = self.config.gpu_count
        if theirs == ours:
            # The engine sees exactly what we see: its device i is our device i.
            return tuple(range(count)) if ours is None else tuple(range(min(count, len(_visible_devices(ours)))))
        # The server was given its own list (theirs differs from ours, so it came through env).
        mine = _visible_devices(ours) if ours is not None else None
        out = []
        for device in _visible_devices(theirs or "")[:count]:
            if mine is not None and device in mine:
                out.append(mine.index(device))
            elif not device.isdigit():
                raise ConfigError(f"cannot match the engine's GPU {device!r} to this process's GPUs; "
                                  "pass gpu_indices to the meter yourself")
            elif mine is None:
                out.append(int(device))  # we see every GPU: Zeus's index is the device's own
            else:
                raise ConfigError(f"the engine's GPU {device} is not visible to this process "
                                  f"(CUDA_VISIBLE_DEVICES={ours}), so it cannot be metered here")
        return tuple(out)

    def start(self) -> VLLMServer:
        """Start the server and wait until /health answers.

        Raises:
            InfeasibleConfigError: the engine could not start for lack of memory.
            ServerStartError: it exited or did not become healthy in time (the message quotes its log).
        """
        with self._lock:
            if self.running:
                return self
            self.spec = resolve_model(self.config.model)
            self.port = _free_port(self.port)  # LLMs built from this server keep working after a restart
            log_dir = self._log_dir or Path(tempfile.mkdtemp(prefix="vllm-server-"))
            log_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = log_dir / f"vllm-{self.port}.log"
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_SERVER_DEV_MODE": "1", **self._env}
            if self.config.cpu_kvcache_gib is not None:
                env["VLLM_CPU_KVCACHE_SPACE"] = str(self.config.cpu_kvcache_gib)
            command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                       "--host", "127.0.0.1", "--port", str(self.port),
                       *self.config.server_args(self.spec, self.on_gpu)]
            in_main_thread = threading.current_thread() is threading.main_thread()
            started = time.monotonic()
            with open(self.log_path, "wb") as log:
                self._process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True,  # its own process group: we stop the engine workers with it
                    preexec_fn=_die_with_parent if in_main_thread else None,
                )
            _LIVE_SERVERS.add(self)
            try:
                self._wait_healthy()
            except BaseException:
                self.stop()
                raise
            self.startup_s = time.monotonic() - started
            if self.on_gpu:
                with contextlib.suppress(ConfigError):  # unmatched devices: every metered GPU stays attributed
                    serve_on_gpus(self.gpu_indices)
            return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise self._start_failure(f"the vLLM server exited with code {self._process.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.root_url + "/health").status_code == 200:
                        return
                time.sleep(0.5)
        raise self._start_failure(f"the vLLM server did not answer /health within {self.startup_timeout_s:.0f} s")

    def _start_failure(self, what: str) -> ServerStartError:
        tail = self.log_tail()
        memory = self.memory_failure()
        if memory:
            return InfeasibleConfigError(f"{what}: not enough memory for this configuration: {memory} "
                                         f"(log: {self.log_path})")
        return ServerStartError(f"{what} (log: {self.log_path}); last lines:\n{tail}")

    def memory_failure(self) -> str | None:
        """The first line of the server's log that says the engine ran out of memory, or None."""
        if not self.log_path or not self.log_path.exists():
            return None
        for line in self.log_path.read_text(errors="replace").splitlines():
            if any(phrase in line.lower() for phrase in _MEMORY_FAILURES):
                return line.split("] ", 1)[-1].strip()[:300]
        return None

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the server's log."""
        if not self.log_path or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 64_000))
            return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise `ServerDiedError` (naming the log) if the server process has exited."""
        if self._process is not None and self._process.poll() is not None:
            raise ServerDiedError(
                f"the vLLM server exited with code {self._process.returncode} while in use "
                f"(log: {self.log_path}); last lines:\n{self.log_tail(10)}"
            )

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server and every process it started (SIGTERM, then SIGKILL after `timeout_s`)."""
        with self._lock:
            process, self._process = self._process, None
            _LIVE_SERVERS.discard(self)
            stop_process_group(process, timeout_s)

    def restart(self, config: EngineConfig | None = None) -> VLLMServer:
        """Stop and start again, with new engine knobs if given (max_num_seqs etc. need a new engine).

        The server keeps its port when it is still free, so LLMs built from it keep working.
        """
        self.stop()
        if config is not None:
            self.config = config
        return self.start()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- while running ---------------------------------------------------------------------------------
    def metrics(self) -> MetricsSnapshot:
        """Read /metrics now (cumulative counters; subtract two snapshots for a delta)."""
        self.check_alive()
        return MetricsClient(self.root_url).read()

    def reset_prefix_cache(self) -> None:
        """Empty the prefix cache so that the next trial starts cold."""
        self.check_alive()
        response = httpx.post(self.root_url + "/reset_prefix_cache", timeout=30)
        if response.status_code != 200:
            raise ServerDiedError(f"reset_prefix_cache failed with HTTP {response.status_code}: {response.text[:200]}")


_SHARED: dict[EngineConfig, VLLMServer] = {}
_SHARED_LOCK = threading.Lock()


def shared_server(config: EngineConfig) -> VLLMServer:
    """The process's managed server for `config`, started on first use and stopped at exit.

    `ServingLLM(backend="vllm")` uses this, so several LLM objects with the same knobs share one engine.
    """
    with _SHARED_LOCK:
        server = _SHARED.get(config)
        if server is None or not server.running:
            server = _SHARED[config] = VLLMServer(config).start()
        return server
