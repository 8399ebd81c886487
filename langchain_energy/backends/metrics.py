"""vLLM's Prometheus /metrics: snapshots of cumulative counters and the deltas between two of them."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from langchain_energy.errors import BackendUnreachableError

# Gauges are instantaneous: a delta of them means nothing, so subtraction keeps the later value.
_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


@dataclass(frozen=True)
class MetricsSnapshot:
    """Values of vLLM's metrics at one instant, summed over label sets, keyed by sample name.

    Counters keep their ``_total`` suffix; histograms appear as ``<name>_sum`` and ``<name>_count``.

    Example:
        >>> a = MetricsSnapshot({"vllm:prefix_cache_hits_total": 10.0, "vllm:prefix_cache_queries_total": 40.0})
        >>> b = MetricsSnapshot({"vllm:prefix_cache_hits_total": 70.0, "vllm:prefix_cache_queries_total": 100.0})
        >>> (b - a).prefix_cache_hit_rate
        1.0
    """

    values: dict[str, float] = field(default_factory=dict)

    def get(self, name: str, default: float = 0.0) -> float:
        """One value by sample name (``vllm:`` prefix optional)."""
        if not name.startswith("vllm:"):
            name = "vllm:" + name
        return self.values.get(name, default)

    def __sub__(self, earlier: MetricsSnapshot) -> MetricsSnapshot:
        delta = {}
        for name, value in self.values.items():
            delta[name] = value if name in _GAUGES else value - earlier.values.get(name, 0.0)
        return MetricsSnapshot(delta)

    @property
    def prefix_cache_queries(self) -> float:
        """Prompt tokens looked up in the prefix cache."""
        return self.get("prefix_cache_queries_total")

    @property
    def prefix_cache_hits(self) -> float:
        """Prompt tokens found in the prefix cache."""
        return self.get("prefix_cache_hits_total")

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """Hits over queries (None when nothing was queried)."""
        queries = self.prefix_cache_queries
        return self.prefix_cache_hits / queries if queries else None

    @property
    def prompt_tokens(self) -> float:
        """Prompt tokens processed."""
        return self.get("prompt_tokens_total")

    @property
    def generation_tokens(self) -> float:
        """Tokens generated."""
        return self.get("generation_tokens_total")

    @property
    def requests_running(self) -> float:
        """Requests in the engine's running batch (a gauge)."""
        return self.get("num_requests_running")

    @property
    def engine_steps(self) -> float:
        """Engine steps (scheduler iterations) taken; fewer steps for the same tokens means fuller batches."""
        return self.get("iteration_tokens_total_count")

    @property
    def requests_finished(self) -> float:
        """Requests that finished, whatever the reason."""
        return self.get("request_success_total")

    def to_dict(self) -> dict[str, float | None]:
        """The counters people ask about, for records and metadata."""
        return {
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "requests_finished": self.requests_finished,
            "engine_steps": self.engine_steps,
        }


def parse_metrics(text: str) -> MetricsSnapshot:
    """Parse Prometheus exposition text into a snapshot (labels summed)."""
    values: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            values[sample.name] += float(sample.value)
    return MetricsSnapshot(dict(values))


class MetricsClient:
    """Reads /metrics of a vLLM server.

    Example:
        >>> client = MetricsClient("http://127.0.0.1:8000")  # doctest: +SKIP
        >>> before = client.read(); ...; delta = client.read() - before  # doctest: +SKIP
    """

    def __init__(self, root_url: str, timeout_s: float = 10.0) -> None:
        """Args: root_url: the server's address without /v1; timeout_s: per read."""
        self.url = root_url.rstrip("/").removesuffix("/v1") + "/metrics"
        self.timeout_s = timeout_s

    def read(self) -> MetricsSnapshot:
        """One snapshot now."""
        try:
            response = httpx.get(self.url, timeout=self.timeout_s)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise BackendUnreachableError(f"cannot read {self.url}: {exc}") from exc
        return parse_metrics(response.text)
