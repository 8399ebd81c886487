"""Measured energy of remote GPU nodes: power streamed by Zeus's daemon ``zeusd``, integrated over time.

A vLLM server on another machine (the ``openai`` backend, a Ray worker) cannot be metered by this process's
own counters. Its node's operator runs ``zeusd`` there (see the README); this meter reads it through Zeus's
``PowerStreamingClient`` (``zeus.monitor.power_streaming``), which keeps one SSE connection per node and device
type, and turns the streamed watts into the cumulative joules every `Meter` reports.

Integration is **hold-last** (zero-order hold): a sample's power counts from its timestamp until the next
sample of the same device. zeusd streams a device's power only when it *changes* (it polls at 20 Hz for GPUs,
10 Hz for CPUs, and sends a sample when the milliwatts differ from the last one sent), so a stretch without
samples on a live connection means the power stayed at the last value: holding it is exact there, where a
trapezoid between two distant samples would invent a ramp. Hold-last is also causal, so a read can extend the
last sample's power up to the read instant without waiting for the next sample.

Component keys, one node: ``gpu:<i>``, ``cpu`` and ``dram``, as a local `ZeusMeter` names them. Several nodes
(or ``qualify=True``): ``gpu:<node>_<i>``, ``cpu:<node>`` and ``dram:<node>``; node names are restricted to
``[A-Za-z0-9_]`` so that column names built from the key (``energy_gpu<node>_<i>_j``) stay plain identifiers.
`component_group` maps all of them to ``gpu``/``cpu``/``dram``. Provenance is
``measured:zeusd@<node>:gpu<i>`` per GPU, ``measured:zeusd@<node>:cpu0+cpu1`` for the CPU packages summed
(``dram0+...`` for DRAM).

Clocks: zeusd stamps samples with its node's Unix time in milliseconds; the timeline runs on this process's
``time.monotonic()``. Zeus's client estimates each node's clock offset from ``GET /time`` round trips against
``time.time()``; this meter makes the same estimate against the meter's own clock (so a step of the local wall
clock cannot move it), keeping the round trip with the smallest delay. Residual: at most half that round
trip (reported per node as ``clock_offset_bound_s``), plus up to 1 ms of zeusd's millisecond truncation, plus
the drift of the node's clock against this one since the meter started (no re-estimation: NTP-disciplined
clocks drift by well under a millisecond a minute).

A node that stops streaming never blocks a read: reads use what has arrived. When a node's SSE connection
drops, its components hold their last cumulative value (power is not extrapolated into the outage) and the
outage is recorded as a `ZeusdGap`, with one warning per node. A connection that hangs open without closing
cannot be told from constant power, so a device silent for more than `max_silence_s` stops being extrapolated
(recorded as a ``silent`` gap); if its next sample then arrives on the same connection, the held power is
counted for the whole silence, as zeusd's change-only stream implies.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from langchain_energy.errors import ConfigError, MeterError
from langchain_energy.meters.base import Clock, Reading, default_clock

logger = logging.getLogger(__name__)

#: zeusd's conventional TCP port (its documentation's ``--tcp-bind-address 0.0.0.0:4938``).
DEFAULT_PORT = 4938

_NODE_NAME = re.compile(r"^[A-Za-z0-9_]+$")

_managed: dict[str, int] = {}  # endpoint -> live ZeusdMeters streaming from it
_managed_lock = threading.Lock()


class _ReconnectNoise(logging.Filter):
    """Demotes Zeus's per-attempt reconnection warnings (each with a traceback) for endpoints a `ZeusdMeter` reads.

    A dead node is retried every ``reconnect_delay_s`` for as long as the meter lives; the meter warns once
    per node and records the gap instead, so the retries are logged at DEBUG.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "reconnecting" in str(record.msg) and isinstance(record.args, tuple):
            with _managed_lock:
                ours = any(isinstance(a, str) and a in _managed for a in record.args)
            if ours:
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                record.exc_info, record.exc_text = None, None
        return True


_noise_filter = _ReconnectNoise()


def _manage(endpoints: Sequence[str], add: bool) -> None:
    with _managed_lock:
        for e in endpoints:
            _managed[e] = _managed.get(e, 0) + (1 if add else -1)
            if _managed[e] <= 0:
                del _managed[e]
    zeus_logger = logging.getLogger("zeus.monitor.power_streaming")
    if _noise_filter not in zeus_logger.filters:
        zeus_logger.addFilter(_noise_filter)


@dataclass
class ZeusdGap:
    """A stretch of time during which a node's power was not known from its stream.

    Attributes:
        node: the node's name.
        source: ``"gpu"`` or ``"cpu"`` (a whole stream that disconnected), or a device such as ``"gpu:0"``
            (one device silent for longer than ``max_silence_s``).
        reason: ``"disconnected"`` or ``"silent"``.
        start: the meter's clock when the gap began.
        end: the meter's clock of the first sample after it; None while it lasts.
        counted: whether the readings include joules for the gap (a silence that ended with a sample on the
            same connection: the power held); a disconnection's joules are never counted.
    """

    node: str
    source: str
    reason: str
    start: float
    end: float | None = None
    counted: bool = False


class _Channel:
    """Hold-last integral of one device's power (a GPU, a CPU package, a package's DRAM)."""

    __slots__ = ("joules", "t", "watts", "open", "samples")

    def __init__(self) -> None:
        self.joules = 0.0  # integral up to `t`
        self.t = math.nan  # time of the last sample (meter clock); NaN before the first
        self.watts = 0.0
        self.open = False  # a sample arrived on the stream's current connection
        self.samples = 0


class _Integrator:
    """The streamed samples of every node turned into cumulative joules; fed by the stream threads."""

    def __init__(self, clock: Clock, max_silence_s: float | None) -> None:
        self.clock = clock
        self.max_silence_s = max_silence_s
        self.lock = threading.Lock()
        self.channels: dict[tuple[str, str], _Channel] = {}  # (node, "gpu:0" | "cpu:0" | "dram:0")
        self.connected: dict[tuple[str, str], bool] = {}  # (node, "gpu" | "cpu") -> stream open
        self.gaps: list[ZeusdGap] = []
        self._open_gap: dict[tuple[str, str], ZeusdGap] = {}  # (node, source) -> the gap that lasts
        self._warned: set[str] = set()
        self.stopping = False  # the meter is closing: connections end on purpose, not a gap

    @staticmethod
    def stream_of(channel: str) -> str:
        return "gpu" if channel.startswith("gpu:") else "cpu"

    def opened(self, node: str, stream: str) -> None:
        with self.lock:
            self.connected[(node, stream)] = True

    def closed(self, node: str, stream: str) -> None:
        """The stream's connection ended (or failed to open): its devices hold from now until a new sample."""
        with self.lock:
            now = self.clock()
            self.connected[(node, stream)] = False
            for (n, name), ch in self.channels.items():
                if n != node or self.stream_of(name) != stream or not ch.open:
                    continue
                end = self._extrapolation_end(ch, now)
                ch.joules += ch.watts * max(0.0, end - ch.t)
                ch.t, ch.open = max(ch.t, end), False
                silent = self._open_gap.pop((node, name), None)
                if silent is not None:
                    silent.end = end  # the silence turned out to be (part of) a disconnection
            if not self.stopping and (node, stream) not in self._open_gap:
                self._start_gap(node, stream, "disconnected", now)

    def sample(self, node: str, channel: str, t: float, watts: float) -> None:
        """One streamed sample: `watts` from time `t` (meter clock) on."""
        with self.lock:
            ch = self.channels.setdefault((node, channel), _Channel())
            if ch.open:
                ch.joules += ch.watts * max(0.0, t - ch.t)  # hold-last: the previous power up to this sample
                silent = self._open_gap.pop((node, channel), None)
                if silent is not None:
                    silent.end, silent.counted = t, True
            ch.t = t if math.isnan(ch.t) else max(ch.t, t)
            ch.watts, ch.open = watts, True
            ch.samples += 1
            gap = self._open_gap.pop((node, self.stream_of(channel)), None)
            if gap is not None:
                gap.end = t

    def _extrapolation_end(self, ch: _Channel, now: float) -> float:
        if self.max_silence_s is None:
            return now
        return min(now, ch.t + self.max_silence_s)

    def energy(self, now: float) -> dict[tuple[str, str], float]:
        """Cumulative joules per channel at `now`: each open channel's last power held up to `now`."""
        with self.lock:
            out: dict[tuple[str, str], float] = {}
            for key, ch in self.channels.items():
                joules = ch.joules
                if ch.open:
                    end = self._extrapolation_end(ch, now)
                    joules += ch.watts * max(0.0, end - ch.t)
                    if end < now and key not in self._open_gap:
                        self._start_gap(key[0], key[1], "silent", end)
                out[key] = joules
            return out

    def _start_gap(self, node: str, source: str, reason: str, start: float) -> None:
        gap = ZeusdGap(node=node, source=source, reason=reason, start=start)
        self.gaps.append(gap)
        self._open_gap[(node, source)] = gap
        if node not in self._warned:
            self._warned.add(node)
            what = (f"its {source} stream disconnected" if reason == "disconnected"
                    else f"{source} sent no sample for {self.max_silence_s:g} s")
            logger.warning(
                "zeusd node %s: %s; its components hold their last cumulative joules until it streams again "
                "(this and later gaps of %s are recorded in ZeusdMeter.gaps(), not logged again)",
                node, what, node,
            )


def _client_class() -> type:
    """Zeus's `PowerStreamingClient`, extended to feed an `_Integrator`; imported lazily (zeus is heavy)."""
    try:
        from zeus.monitor.power_streaming import CpuPowerReading, PowerStreamingClient
    except ImportError as exc:
        raise MeterError(f"ZeusdMeter needs zeus with zeus.monitor.power_streaming (zeus>=0.16): {exc}") from exc
    hooks = ("_init_server", "_estimate_clock_offset", "_connect_and_stream", "_store_reading")
    missing = [h for h in hooks if not hasattr(PowerStreamingClient, h)]
    if missing:
        raise MeterError(f"this zeus's PowerStreamingClient lacks {missing}; ZeusdMeter was written against zeus 0.16")

    class _StreamingClient(PowerStreamingClient):  # type: ignore[misc, valid-type]
        """Every sample goes to the integrator with its own timestamp, on the meter's clock.

        The base client keeps only the latest sample per device; energy needs each one. Its hooks are
        extended, not replaced: parsing, reconnection and auth stay Zeus's.
        """

        def __init__(self, servers: Sequence[Any], names: Mapping[str, str], sink: _Integrator, clock: Clock,
                     sync_samples: int, reconnect_delay_s: float) -> None:
            self._names, self._sink, self._meter_clock = dict(names), sink, clock
            self._sync_samples = sync_samples
            self.streams: dict[str, tuple[bool, bool]] = {}
            self.offset_bound_s: dict[str, float] = {}
            try:
                super().__init__(servers, reconnect_delay_s=reconnect_delay_s)
            except BaseException:
                self.stop()  # threads of the nodes that did start must not outlive a failed construction
                raise

        @property
        def daemon_clients(self) -> dict[str, Any]:
            return self._daemon_clients

        @property
        def clock_offsets(self) -> dict[str, float]:
            return dict(self._clock_offsets)

        def _init_server(self, server: Any) -> tuple[bool, bool]:
            streams = super()._init_server(server)
            self.streams[server.endpoint] = streams
            return streams

        def _estimate_clock_offset(self, endpoint: str, num_samples: int = 5) -> float:
            # Zeus's estimate, but against the meter's clock, and keeping the exchange with the smallest round
            # trip: the daemon read its clock somewhere inside it, so its offset is off by at most half the RTT.
            client = self._daemon_clients[endpoint]
            best: tuple[float, float] | None = None
            for _ in range(max(num_samples, self._sync_samples)):
                t1 = self._meter_clock()
                daemon_s = client.get_time()
                t2 = self._meter_clock()
                if best is None or t2 - t1 < best[0]:
                    best = (t2 - t1, (t1 + t2) / 2.0 - daemon_s)
            assert best is not None
            self.offset_bound_s[endpoint] = best[0] / 2.0
            return best[1]

        def _connect_and_stream(self, url: str, endpoint: str, process_fn: Any) -> None:
            stream = "gpu" if urlsplit(url).path.startswith("/gpu/") else "cpu"
            name = self._names[endpoint]
            self._sink.opened(name, stream)
            try:
                super()._connect_and_stream(url, endpoint, process_fn)
            finally:
                self._sink.closed(name, stream)

        def _store_reading(self, endpoint: str, timestamp_s: float, device_dict: Any, device_id: int,
                           value: Any) -> None:
            super()._store_reading(endpoint, timestamp_s, device_dict, device_id, value)
            # timestamp_s is the daemon's time plus our offset: already on the meter's clock.
            name = self._names[endpoint]
            if isinstance(value, CpuPowerReading):
                self._sink.sample(name, f"cpu:{device_id}", timestamp_s, float(value.cpu_w))
                if value.dram_w is not None:
                    self._sink.sample(name, f"dram:{device_id}", timestamp_s, float(value.dram_w))
            else:
                self._sink.sample(name, f"gpu:{device_id}", timestamp_s, float(value))

    return _StreamingClient


def parse_zeusd_url(url: str) -> tuple[str, Any]:
    """A zeusd address as (default node name, ``ZeusdConfig``), without indices or token.

    Accepted: ``http://host:port``, ``host:port``, ``host`` (port 4938) and ``unix:///path/to/zeusd.sock``.

    Raises:
        ConfigError: the address is not one of those (https, a path, a bad port, no host).

    Example:
        >>> name, config = parse_zeusd_url("http://gpu-node-1.cluster:4938")
        >>> name, config.host_port
        ('gpu_node_1', 'gpu-node-1.cluster:4938')
    """
    from zeus.utils.zeusd import ZeusdConfig

    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"a zeusd address must be a non-empty string like http://node1:4938, got {url!r}")
    url = url.strip()
    if url.startswith("unix://"):
        path = url[len("unix://"):]
        if not path.startswith("/"):
            raise ConfigError(f"a zeusd socket address must be unix:///absolute/path, got {url!r}")
        return "local", ZeusdConfig.uds(path)
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise ConfigError(f"zeusd serves plain HTTP (http://host:port or unix:///socket), got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"a zeusd address is http://host:port without a path, got {url!r}")
    try:
        port = parts.port if parts.port is not None else DEFAULT_PORT
    except ValueError:
        raise ConfigError(f"bad port in zeusd address {url!r}") from None
    host = parts.hostname
    if not host:
        raise ConfigError(f"no host in zeusd address {url!r}")
    config = ZeusdConfig.tcp(f"[{host}]" if ":" in host else host, port)
    return _default_name(config), config


def _is_ip(host: str) -> bool:
    return ":" in host or all(p.isdigit() for p in host.split("."))


class ZeusdMeter:
    """Cumulative joules of remote nodes' GPUs (and CPU/DRAM) from the power their ``zeusd`` streams.

    Construction connects to every node (discovery, auth, clock offset) and starts Zeus's streaming threads;
    an unreachable node or a GPU index a node lacks fails here, not in the sampler. Reads never wait on the
    network. Components stay unique across nodes (see the module docstring for keys and provenance).

    Args:
        nodes: node name -> ``zeus.utils.zeusd.ZeusdConfig`` (its ``gpu_indices``/``cpu_indices`` pick the
            devices; None streams every one the daemon has, ``[]`` none), or a sequence of configs (names
            derived from their hosts). Names must match ``[A-Za-z0-9_]+``.
        clock: the timeline's clock; must run at real time (samples are placed on it). Default: monotonic.
        qualify: name components after their node (``gpu:<node>_<i>``); None does so only for several nodes.
        max_silence_s: a device with no sample for this long (its connection still open) stops being
            extrapolated until its next sample; None extrapolates for as long as the connection lasts.
        reconnect_delay_s: wait between reconnection attempts to a node that dropped (Zeus's client).
        clock_sync_samples: ``GET /time`` round trips per node for the clock offset.

    Example:
        ```python
        meter = ZeusdMeter.from_urls(["http://gpu-node-1:4938"], gpu_indices=[0, 1])
        meter.components()  # {"gpu:0": "measured:zeusd@gpu_node_1:gpu0", "gpu:1": ..., "cpu": ..., "dram": ...}
        handler = EnergyCallbackHandler(meter=meter)
        ```
    """

    def __init__(
        self,
        nodes: Mapping[str, Any] | Sequence[Any],
        *,
        clock: Clock = default_clock,
        qualify: bool | None = None,
        max_silence_s: float | None = 30.0,
        reconnect_delay_s: float = 1.0,
        clock_sync_samples: int = 5,
    ) -> None:
        named = self._names(nodes)
        if max_silence_s is not None and not (isinstance(max_silence_s, (int, float)) and max_silence_s > 0):
            raise ConfigError(f"max_silence_s must be > 0 seconds or None, got {max_silence_s!r}")
        if not reconnect_delay_s > 0:
            raise ConfigError(f"reconnect_delay_s must be > 0 seconds, got {reconnect_delay_s!r}")
        if not (isinstance(clock_sync_samples, int) and clock_sync_samples >= 1):
            raise ConfigError(f"clock_sync_samples must be an integer >= 1, got {clock_sync_samples!r}")
        self.clock = clock
        self.qualify = len(named) > 1 if qualify is None else bool(qualify)
        self._configs = named
        self._integrator = _Integrator(clock, max_silence_s)
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._closed = False
        endpoints = {cfg.endpoint: name for name, cfg in named.items()}
        _manage(list(endpoints), add=True)
        try:
            self._client = _client_class()(
                list(named.values()), endpoints, self._integrator, clock, clock_sync_samples, reconnect_delay_s)
        except MeterError:
            _manage(list(endpoints), add=False)
            raise
        except Exception as exc:  # unreachable daemon, missing index, token without the scope, bad answer
            _manage(list(endpoints), add=False)
            raise MeterError(f"could not start streaming power from zeusd ({', '.join(named)}): {exc}") from exc
        self._channels: dict[str, list[tuple[str, str]]] = {}  # component key -> (node, channel) summed
        self._prov: dict[str, str] = {}
        self._gpu_of: dict[tuple[str, str], int] = {}  # (node, "gpu:i") -> i, for gpu_power_w
        for name, cfg in named.items():
            self._add_node(name, cfg)

    @staticmethod
    def _names(nodes: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
        if isinstance(nodes, Mapping):
            named = dict(nodes)
        else:
            named = {}
            defaults = [(_default_name(cfg), cfg) for cfg in nodes]
            counts = {n: sum(1 for d, _ in defaults if d == n) for n, _ in defaults}
            for base, cfg in defaults:
                # Two daemons on one host (two ports) keep apart by port.
                name = base if counts[base] == 1 else f"{base}_{cfg.endpoint.rsplit(':', 1)[-1]}"
                name = re.sub(r"[^A-Za-z0-9_]", "_", name)
                if name in named:
                    raise ConfigError(f"two zeusd nodes would both be named {name!r}; pass a {{name: url}} mapping")
                named[name] = cfg
        if not named:
            raise ConfigError("ZeusdMeter needs at least one zeusd node")
        for name in named:
            if not (isinstance(name, str) and _NODE_NAME.match(name)):
                raise ConfigError(f"zeusd node names must match [A-Za-z0-9_]+ (they become column names), got {name!r}")
        return named

    @classmethod
    def from_urls(
        cls,
        urls: Sequence[str] | Mapping[str, str],
        *,
        gpu_indices: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
        cpu: bool = True,
        token: str | None = None,
        **kwargs: Any,
    ) -> ZeusdMeter:
        """A meter on the daemons at these addresses.

        Args:
            urls: ``http://host:port`` (or ``host:port``, ``host``, ``unix:///socket``) per node, or a mapping
                node name -> address; without names, nodes are named after their hosts.
            gpu_indices: the node's GPUs the engine serves on (one list for every node, or per node name);
                None streams all of them. GPUs beside the engine then are not charged to its calls.
            cpu: also stream the nodes' CPU package and DRAM power (where the daemon offers ``cpu-read``).
            token: zeusd JWT for nodes that require one (default: the ``ZEUSD_TOKEN`` environment variable).
            **kwargs: passed on to the constructor (``clock``, ``qualify``, ``max_silence_s``, ...).

        Raises:
            ConfigError: a bad address, or `gpu_indices` naming an unknown node.
            MeterError: a node did not answer or lacks a requested GPU.

        Example:
            ```python
            meter = ZeusdMeter.from_urls({"node1": "http://10.0.0.5:4938", "node2": "http://10.0.0.6:4938"})
            sorted(meter.components())  # ['cpu:node1', ..., 'gpu:node1_0', ..., 'gpu:node2_0', ...]
            ```
        """
        from zeus.utils.zeusd import ZeusdConfig

        if isinstance(urls, str):
            raise ConfigError("ZeusdMeter.from_urls takes a list of addresses, not one string")
        pairs: list[tuple[str | None, str]] = (
            [(n, u) for n, u in urls.items()] if isinstance(urls, Mapping) else [(None, u) for u in urls])
        parsed = [(n, *parse_zeusd_url(u)) for n, u in pairs]
        if isinstance(gpu_indices, Mapping):
            names = {n if n is not None else d for n, d, _ in parsed}
            unknown = sorted(set(gpu_indices) - names)
            if unknown:
                raise ConfigError(f"gpu_indices names nodes {unknown} that are not among {sorted(names)}")

        def config(name: str, base: Any) -> Any:
            gpus = gpu_indices.get(name) if isinstance(gpu_indices, Mapping) else gpu_indices
            if gpus is not None:
                gpus = [int(i) for i in gpus]
                if len(set(gpus)) != len(gpus) or any(i < 0 for i in gpus):
                    raise ConfigError(f"gpu_indices for {name} must be distinct non-negative integers, got {gpus}")
            return ZeusdConfig(host_port=base.host_port, socket_path=base.socket_path, token=token,
                               gpu_indices=gpus, cpu_indices=None if cpu else [])

        if isinstance(urls, Mapping):
            nodes: Mapping[str, Any] | list[Any] = {n: config(n, base) for n, _, base in parsed if n is not None}
        else:
            # Names are derived in the constructor; per-node gpu_indices need the derived name first.
            derived = cls._names([base for _, _, base in parsed])
            nodes = {name: config(name, base) for name, base in derived.items()}
        return cls(nodes, **kwargs)

    def _add_node(self, name: str, cfg: Any) -> None:
        daemon = self._client.daemon_clients[cfg.endpoint]
        stream_gpu, stream_cpu = self._client.streams[cfg.endpoint]
        if stream_gpu:
            gpus = list(cfg.gpu_indices) if cfg.gpu_indices is not None else list(daemon.gpu_ids)
            for i in sorted(gpus):
                key = f"gpu:{name}_{i}" if self.qualify else f"gpu:{i}"
                self._channels[key] = [(name, f"gpu:{i}")]
                self._prov[key] = f"measured:zeusd@{name}:gpu{i}"
                self._gpu_of[(name, f"gpu:{i}")] = i
        if stream_cpu:
            dram = dict(zip(daemon.cpu_ids, daemon.dram_available))
            cpus = sorted(cfg.cpu_indices if cfg.cpu_indices is not None else daemon.cpu_ids)
            if cpus:
                key = f"cpu:{name}" if self.qualify else "cpu"
                self._channels[key] = [(name, f"cpu:{c}") for c in cpus]
                self._prov[key] = f"measured:zeusd@{name}:" + "+".join(f"cpu{c}" for c in cpus)
            with_dram = [c for c in cpus if dram.get(c)]
            if with_dram:
                key = f"dram:{name}" if self.qualify else "dram"
                self._channels[key] = [(name, f"dram:{c}") for c in with_dram]
                self._prov[key] = f"measured:zeusd@{name}:" + "+".join(f"dram{c}" for c in with_dram)

    # -- the Meter protocol ------------------------------------------------------------------------------
    def components(self) -> dict[str, str]:
        """Component key -> ``measured:zeusd@<node>:<devices>``, for every streamed device."""
        return dict(self._prov)

    def read(self) -> Reading:
        """Joules so far per component: each device's streamed power held from sample to sample up to now.

        Never waits on the network; a node that stopped streaming contributes its last cumulative values.
        """
        with self._lock:
            t = self.clock()
            per_channel = self._integrator.energy(t)
            energy: dict[str, float] = {}
            for key, channels in self._channels.items():
                value = math.fsum(per_channel.get(c, 0.0) for c in channels)
                # A sample stamped before the previous read's instant revises the held power behind it; the
                # reported joules wait for the integral to catch up rather than step back.
                value = max(value, self._last.get(key, 0.0))
                self._last[key] = energy[key] = value
            power: dict[int, float] = {}
            if not self.qualify:  # Reading's per-GPU power is keyed by index alone: one node only
                with self._integrator.lock:
                    for nc, i in self._gpu_of.items():
                        ch = self._integrator.channels.get(nc)
                        if ch is not None and ch.open:
                            power[i] = ch.watts
            return Reading(t=t, energy_j=energy, gpu_power_w=power)

    def gaps(self) -> list[ZeusdGap]:
        """Every disconnection and long silence so far, oldest first (copies)."""
        with self._integrator.lock:
            return [ZeusdGap(**vars(g)) for g in self._integrator.gaps]

    def node_status(self) -> dict[str, dict[str, object]]:
        """Per node: endpoint, clock alignment, streams connected, samples received, last sample time.

        ``clock_offset_s`` maps the node's Unix seconds onto the meter's clock (added to each timestamp);
        ``clock_offset_bound_s`` bounds its error (half the best ``/time`` round trip); ``clock_skew_s`` is the
        node's clock minus this machine's wall clock, for information (it assumes a real-time meter clock).
        """
        out: dict[str, dict[str, object]] = {}
        offsets = self._client.clock_offsets
        wall_minus_clock = time.time() - self.clock()
        with self._integrator.lock:
            for name, cfg in self._configs.items():
                chans = [ch for (n, _), ch in self._integrator.channels.items() if n == name]
                last = [ch.t for ch in chans if not math.isnan(ch.t)]
                out[name] = {
                    "endpoint": cfg.endpoint,
                    "clock_offset_s": offsets.get(cfg.endpoint),
                    "clock_offset_bound_s": self._client.offset_bound_s.get(cfg.endpoint),
                    "clock_skew_s": (-offsets[cfg.endpoint] - wall_minus_clock
                                     if cfg.endpoint in offsets else None),
                    "connected": {s: c for (n, s), c in self._integrator.connected.items() if n == name},
                    "samples": sum(ch.samples for ch in chans),
                    "last_sample_t": max(last) if last else None,
                }
        return out

    def describe(self) -> dict[str, object]:
        """Nodes, their devices and clock alignment, the integration rule and the gaps so far."""
        nodes = {}
        status = self.node_status()
        for name, cfg in self._configs.items():
            daemon = self._client.daemon_clients[cfg.endpoint]
            nodes[name] = {
                "endpoint": cfg.endpoint,
                "gpus": {g.id: g.name for g in daemon.gpus
                         if (name, f"gpu:{g.id}") in self._gpu_of},
                "clock_offset_s": status[name]["clock_offset_s"],
                "clock_offset_bound_s": status[name]["clock_offset_bound_s"],
                "clock_skew_s": status[name]["clock_skew_s"],
            }
        gaps = self.gaps()
        return {"zeusd": {"nodes": nodes, "integration": "hold-last",
                          "max_silence_s": self._integrator.max_silence_s,
                          "gaps": len(gaps),
                          "gap_s_uncounted": sum((g.end if g.end is not None else self.clock()) - g.start
                                                 for g in gaps if not g.counted)}}

    def close(self) -> None:
        """Stop streaming, waiting at most a quarter second.

        A stream thread blocked reading a quiet connection (zeusd sends only changes) notices the stop at its
        next sample, or when the node closes the connection; it is a daemon thread and never delays exit.
        """
        if self._closed:
            return
        self._closed = True
        with self._integrator.lock:
            self._integrator.stopping = True
        stopper = threading.Thread(target=self._client.stop, name="zeusd-meter-close", daemon=True)
        stopper.start()
        # Zeus joins each stream thread for up to 5 s; one waiting on a quiet connection must not stall shutdown.
        stopper.join(timeout=0.25)
        _manage([cfg.endpoint for cfg in self._configs.values()], add=False)

    def __enter__(self) -> ZeusdMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _default_name(cfg: Any) -> str:
    if getattr(cfg, "socket_path", None):
        return "local"
    host = cfg.endpoint.rsplit(":", 1)[0].strip("[]")
    first = host if _is_ip(host) else host.split(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_]", "_", first).strip("_") or "node"
