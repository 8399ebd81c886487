"""ZeusdDouble: a TEST DOUBLE of Zeus's daemon ``zeusd`` (its HTTP API for power streaming), for machines without it.

``zeusd`` is a Rust binary run by a GPU node's operator; it cannot be installed here. This double serves the
parts of its documented API (https://ml.energy/zeus/zeusd/, "HTTP API") that Zeus's ``PowerStreamingClient``
uses, in the same shapes:

- ``GET /discover``: ``{"gpus": [{"id", "name", ...}], "cpus": [{"id", "dram_available"}],
  "enabled_api_groups": [...], "auth_required": false}``;
- ``GET /time``: ``{"timestamp_ms": <node's Unix time in ms>}``;
- ``GET /gpu/stream_power?gpu_ids=0,1``: SSE, one event per GPU sample,
  ``data: {"timestamp_ms": N, "gpu_id": N, "power_mw": N}``;
- ``GET /cpu/stream_power?cpu_ids=0``: SSE, ``data: {"timestamp_ms": N, "cpu_id": N, "cpu_mw": N,
  "dram_mw": N | null}``.

Like zeusd, each device is polled at a fixed rate (20 Hz for GPUs, 10 Hz for CPUs by default) and a sample is
sent only when its milliwatts differ from the last one sent on that connection; timestamps are the node's
Unix clock in whole milliseconds, truncated. The node's clock may be offset from this machine's
(`clock_offset_s`), for clock-alignment tests. Power follows a scripted program per device instead of
hardware, counted from the moment a client subscribes.

Not modelled: auth (no JWT), the GPU control endpoints, one shared poller per device across subscribers
(each connection polls on its own). Every sample written is recorded in `sent`, with this process's monotonic
time, so tests compare a meter's joules with what the double really sent.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

#: A power program: ``[(duration_s, watts), ...]``; a None duration lasts forever (and ends the list).
Program = Sequence[tuple[float | None, float]]


def _watts_at(program: Program, elapsed: float) -> float:
    t = 0.0
    for duration, watts in program:
        if duration is None or elapsed < t + duration:
            return float(watts)
        t += duration
    return float(program[-1][1]) if program else 0.0


@dataclass(frozen=True)
class SentSample:
    """One SSE sample the double wrote: which device, the node-clock stamp, the milliwatts, and when (local)."""

    stream: str  # "gpu" or "cpu"
    device: int
    timestamp_ms: int
    power_mw: int  # GPU power, or CPU package power
    dram_mw: int | None
    mono: float  # this process's time.monotonic() when the stamp was taken
    connection: int


@dataclass
class CpuProgram:
    """A CPU package's scripted power: the package's and, where it has one, its DRAM zone's."""

    cpu: Program
    dram: Program | None = None


class ZeusdDouble:
    """A TEST DOUBLE of ``zeusd`` on a local TCP port (see the module docstring for what it follows).

    Args:
        gpus: GPU index -> power program (watts over time since the client subscribed).
        cpus: CPU package index -> `CpuProgram`.
        clock_offset_s: the node's clock minus this machine's (``time.time()``), in seconds.
        gpu_poll_hz: GPU polling rate (zeusd's ``--gpu-power-poll-hz``, default 20).
        cpu_poll_hz: CPU polling rate (zeusd's ``--cpu-power-poll-hz``, default 10).

    Example:
        ```python
        with ZeusdDouble(gpus={0: [(1.0, 300.0), (None, 0.0)]}) as node:
            meter = ZeusdMeter.from_urls([node.url])
            ...
            node.energy_sent_j("gpu", 0)  # hold-last joules of what it streamed
        ```
    """

    def __init__(
        self,
        gpus: Mapping[int, Program] | None = None,
        cpus: Mapping[int, CpuProgram] | None = None,
        clock_offset_s: float = 0.0,
        gpu_poll_hz: float = 20.0,
        cpu_poll_hz: float = 10.0,
    ) -> None:
        self.gpus = dict(gpus or {})
        self.cpus = dict(cpus or {})
        self.clock_offset_s = clock_offset_s
        self.poll_s = {"gpu": 1.0 / gpu_poll_hz, "cpu": 1.0 / cpu_poll_hz}
        self.sent: list[SentSample] = []
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._connections = 0
        self._alive = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> ZeusdDouble:
        """Listen (on a free port the first time, on the same port after `kill`) and serve in a thread."""
        double = self

        class Handler(_Handler):
            node = double

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._alive.set()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"zeusd-double-{self.port}", daemon=True)
        self._thread.start()
        return self

    def kill(self) -> float:
        """The node goes away: open streams are cut and new connections refused. Returns the local time."""
        self._alive.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        return time.monotonic()

    def __enter__(self) -> ZeusdDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def url(self) -> str:
        """The address to give a client: ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    # -- the node's clock and record ---------------------------------------------------------------------
    def node_time_ms(self) -> int:
        """The node's Unix time in whole milliseconds (truncated, as zeusd's ``as_millis``)."""
        return math.floor((time.time() + self.clock_offset_s) * 1000.0)

    def samples(self, stream: str, device: int) -> list[SentSample]:
        """What was sent for one device, in order."""
        with self._lock:
            return [s for s in self.sent if s.stream == stream and s.device == device]

    def energy_sent_j(self, stream: str, device: int, dram: bool = False) -> float:
        """Hold-last joules of the samples sent, from each one to the next on the same connection (node clock)."""
        total = 0.0
        rows = self.samples(stream, device)
        for a, b in zip(rows, rows[1:]):
            if a.connection == b.connection:
                watts = (a.dram_mw or 0) / 1000.0 if dram else a.power_mw / 1000.0
                total += watts * (b.timestamp_ms - a.timestamp_ms) / 1000.0
        return total

    def _record(self, sample: SentSample) -> None:
        with self._lock:
            self.sent.append(sample)

    def _new_connection(self) -> int:
        with self._lock:
            self._connections += 1
            return self._connections


class _Handler(BaseHTTPRequestHandler):
    """zeusd's routes; the response body of a stream ends when the connection closes (HTTP/1.0)."""

    node: ZeusdDouble
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def _json(self, body: object, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        parts = urlsplit(self.path)
        self.node.requests.append(parts.path)
        if parts.path == "/discover":
            self._json({
                "gpus": [{"id": i, "name": "Double GPU", "pci_address": f"0000:{i:02x}:00.0",
                          "cumulative_energy_available": True} for i in sorted(self.node.gpus)],
                "cpus": [{"id": i, "dram_available": p.dram is not None} for i, p in sorted(self.node.cpus.items())],
                "enabled_api_groups": ["gpu-read", "cpu-read"],
                "auth_required": False,
            })
        elif parts.path == "/time":
            self._json({"timestamp_ms": self.node.node_time_ms()})
        elif parts.path in ("/gpu/stream_power", "/cpu/stream_power"):
            stream = parts.path.split("/")[1]
            known = self.node.gpus if stream == "gpu" else self.node.cpus
            raw = parse_qs(parts.query).get(f"{stream}_ids", [""])[0]
            ids = [int(x) for x in raw.split(",") if x] or sorted(known)
            unknown = [i for i in ids if i not in known]
            if unknown:
                self._json({"error": f"unknown {stream} ids {unknown}"}, status=400)
                return
            self._stream(stream, ids)
        else:
            self._json({"error": f"no route {parts.path}"}, status=404)

    def _stream(self, stream: str, ids: list[int]) -> None:
        node = self.node
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.flush()
        conn = node._new_connection()
        start = time.monotonic()
        last: dict[int, tuple[int, int | None]] = {}
        next_tick = start
        try:
            while node._alive.is_set():
                elapsed = time.monotonic() - start
                for i in ids:
                    if stream == "gpu":
                        mw, dram = round(_watts_at(node.gpus[i], elapsed) * 1000), None
                    else:
                        prog = node.cpus[i]
                        mw = round(_watts_at(prog.cpu, elapsed) * 1000)
                        dram = round(_watts_at(prog.dram, elapsed) * 1000) if prog.dram is not None else None
                    if last.get(i) == (mw, dram):
                        continue  # zeusd sends a device's power only when it changed
                    ts, mono = node.node_time_ms(), time.monotonic()
                    body = ({"timestamp_ms": ts, "gpu_id": i, "power_mw": mw} if stream == "gpu"
                            else {"timestamp_ms": ts, "cpu_id": i, "cpu_mw": mw, "dram_mw": dram})
                    self.wfile.write(f"data: {json.dumps(body)}\n\n".encode())
                    self.wfile.flush()
                    last[i] = (mw, dram)
                    node._record(SentSample(stream, i, ts, mw, dram, mono, conn))
                next_tick += node.poll_s[stream]
                time.sleep(max(0.0, next_tick - time.monotonic()))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
