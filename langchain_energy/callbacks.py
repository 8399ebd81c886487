"""`EnergyCallbackHandler`: per-run latency, tokens and attributed energy for any LangChain/LangGraph code.

The handler only timestamps runs (on the timeline's clock) and reads token counts; energy comes from one
shared background timeline and is shared among runs by `langchain_energy.attribution` when results are
asked for, so overlapping calls never double count.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, get_buffer_string
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.tracers.context import register_configure_hook

from langchain_energy.attribution import Span, Weighting, attribute, token_rate_weights
from langchain_energy.errors import ConfigError
from langchain_energy.meters.base import COMPONENTS, UNAVAILABLE, Meter, component_group
from langchain_energy.timeline import Timeline, provenance_by_group, shared_timeline

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

CALL_KINDS = ("llm", "chat_model")

#: Per-run columns of `EnergyCallbackHandler.to_dataframe`, in order.
RUN_COLUMNS: tuple[str, ...] = (
    "run_id", "parent_run_id", "root_run_id", "name", "kind", "tags", "status",
    "t_start", "t_first_token", "t_end", "latency_s",
    "prompt_tokens", "completion_tokens", "cached_tokens", "token_source",
    "energy_j", "energy_cpu_j", "energy_gpu_j", "energy_dram_j",
    "provenance_cpu", "provenance_gpu", "provenance_dram",
    "prefill_energy_j", "decode_energy_j",
    # beyond the fixed contract:
    "orchestration_energy_j", "idle_energy_j", "active_energy_j",
    "ttft_s", "langgraph_node", "langgraph_step", "metadata", "error",
)

#: Per-workflow columns of `EnergyCallbackHandler.summary`, in order.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "workflow", "root_run_id", "latency_s", "llm_calls", "prompt_tokens", "completion_tokens",
    "cached_tokens", "throughput_tok_s", "energy_j", "energy_cpu_j", "energy_gpu_j", "energy_dram_j",
    "active_energy_j", "idle_energy_j", "energy_per_token_j", "cache_hit_rate", "provenance",
    # beyond the fixed contract:
    "status", "errors", "orchestration_energy_j", "decode_throughput_tok_s", "t_start", "t_end",
)

_NAN = float("nan")


@dataclass
class RunRecord:
    """What the handler knows about one run (LLM call, chat-model call, chain, graph node, tool)."""

    run_id: UUID
    parent_run_id: UUID | None
    root_run_id: UUID
    name: str
    kind: str
    tags: list[str]
    metadata: dict[str, Any]
    t_start: float
    status: str = "running"
    t_first_token: float | None = None
    t_end: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    token_source: str | None = None
    ttft_s: float | None = None
    error: str | None = None
    prompt_text: str | None = field(default=None, repr=False)

    @property
    def is_call(self) -> bool:
        """LLM and chat-model runs receive energy first."""
        return self.kind in CALL_KINDS


class _Lease:
    """One hold on a timeline, released at most once (explicitly or when the handler is collected)."""

    def __init__(self, timeline: Timeline) -> None:
        self._tl: Timeline | None = timeline
        self._lock = threading.Lock()
        timeline.acquire()

    def release(self) -> None:
        with self._lock:
            tl, self._tl = self._tl, None
        if tl is not None:
            tl.release()


def _run_name(serialized: Mapping[str, Any] | None, kwargs: Mapping[str, Any], default: str) -> str:
    # LangGraph passes serialized=None for nodes and puts the node name in kwargs["name"].
    name = kwargs.get("name")
    if name:
        return str(name)
    if serialized:
        if serialized.get("name"):
            return str(serialized["name"])
        ids = serialized.get("id")
        if isinstance(ids, list) and ids:
            return str(ids[-1])
    return default


def _as_int(x: Any) -> int | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _sum_opt(values: Sequence[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


class EnergyCallbackHandler(BaseCallbackHandler):
    """Records every run's timing, tokens and attributed CPU/GPU/DRAM energy.

    Pass it as a callback to any chain, graph, LLM or chat model (sync or async, `batch`/`abatch`, concurrent
    graphs). Energy is sampled by one shared background timeline (started at the first run, stopped by
    `close()`), and shared among overlapping LLM calls so that the per-run numbers add up to what the meter saw.

    Args:
        meter: where joules come from; the process-wide automatic meter (`auto_meter()`) by default.
        sample_interval_s: sampling period of the timeline when this handler creates it.
        weighting: ``"equal"`` shares among overlapping calls, or ``"tokens"`` (by each call's token rate).
        idle_power_w: idle baseline in watts (a number, or watts per component), ``"measure"`` to measure it
            now for `idle_measure_s` seconds, ``"model"`` for the meter's own idle model (estimates have one),
            or None for no baseline (active/idle energy are then NaN).
        token_counter: counts tokens of a text when a run reports none (e.g. ``llm.get_num_tokens``);
            such counts are flagged ``token_source="counted"``.
        timeline: a timeline to use instead of the shared one for `meter`.
        idle_measure_s: seconds of idle measurement for ``idle_power_w="measure"``.

    Example:
        ```python
        handler = EnergyCallbackHandler()
        chain.invoke({"text": doc}, config={"callbacks": [handler]})
        handler.close()
        handler.to_dataframe()   # one row per run: energy_j, energy_cpu_j, provenance_cpu, ...
        print(handler.report())
        ```
    """

    raise_error: bool = False
    run_inline: bool = True  # timestamps taken in the caller's event loop, not an executor queue

    def __init__(
        self,
        meter: Meter | None = None,
        sample_interval_s: float = 0.1,
        weighting: Weighting = "equal",
        idle_power_w: float | Mapping[str, float] | str | None = None,
        token_counter: Callable[[str], int] | None = None,
        timeline: Timeline | None = None,
        idle_measure_s: float = 2.0,
    ) -> None:
        super().__init__()
        if weighting not in ("equal", "tokens"):
            raise ConfigError(f"weighting must be 'equal' or 'tokens', got {weighting!r}")
        self.weighting: Weighting = weighting
        self.timeline = timeline if timeline is not None else shared_timeline(meter, sample_interval_s)
        self._clock = self.timeline.clock
        self._edge_age_s = self.timeline.interval_s / 4
        self.token_counter = token_counter
        self._lock = threading.RLock()
        self._runs: dict[UUID, RunRecord] = {}
        self._lease: _Lease | None = None
        self._finalizer: weakref.finalize | None = None
        self._version = 0
        self._cache: tuple[int, int, Any] | None = None
        self.idle_power_w: dict[str, float] | None = self._resolve_idle(idle_power_w, idle_measure_s)

    # -- set-up ------------------------------------------------------------------------------------------
    def _resolve_idle(self, idle: Any, measure_s: float) -> dict[str, float] | None:
        if idle is None:
            return None
        if isinstance(idle, str):
            if idle == "measure":
                return self.measure_idle(measure_s)
            if idle == "model":
                fn = getattr(self.timeline.meter, "idle_power_w", None)
                known = fn() if fn else None
                if not known:
                    raise ConfigError("idle_power_w='model' needs a meter with an idle model (an estimated one)")
                return dict(known)
            raise ConfigError(f"idle_power_w must be watts, a dict, 'measure', 'model' or None, got {idle!r}")
        if isinstance(idle, Mapping):
            out = {str(k): float(v) for k, v in idle.items()}
        else:
            out = {"total": float(idle)}
        if any(not math.isfinite(v) or v < 0 for v in out.values()):
            raise ConfigError(f"idle power must be finite and >= 0 watts, got {idle!r}")
        return out

    def measure_idle(self, duration_s: float = 2.0) -> dict[str, float]:
        """Measure the idle baseline now (nothing should run meanwhile) and use it from here on.

        Returns:
            Watts per component over the measurement.
        """
        if not duration_s > 0:
            raise ConfigError(f"idle measurement needs a positive duration, got {duration_s}")
        self._ensure_started()
        # Measure between two samples (not clock reads) so the window's edges are exact.
        self.timeline.sample_now()
        t0 = self.timeline.last_sample_t
        time.sleep(duration_s)
        self.timeline.sample_now()
        t1 = self.timeline.last_sample_t
        if t0 is None or t1 is None or t1 <= t0:
            raise ConfigError("the meter's clock did not advance during the idle measurement")
        watts = {k: j / (t1 - t0) for k, j in self.timeline.energy_between(t0, t1).items()}
        self.idle_power_w = watts
        return watts

    def _ensure_started(self) -> None:
        if self._lease is None:
            with self._lock:
                if self._lease is None:
                    self._lease = _Lease(self.timeline)
                    self._finalizer = weakref.finalize(self, self._lease.release)

    def close(self) -> None:
        """Stop holding the timeline (its sampler stops when no handler holds it). Results stay readable."""
        with self._lock:
            lease, self._lease = self._lease, None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        if lease is not None:
            lease.release()

    def __enter__(self) -> EnergyCallbackHandler:
        self._ensure_started()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recording ---------------------------------------------------------------------------------------
    def _start(self, run_id: UUID, parent_run_id: UUID | None, kind: str, name: str,
               tags: list[str] | None, metadata: dict[str, Any] | None, prompt_text: str | None = None) -> None:
        if self._lease is None:
            self._ensure_started()
        t = self._clock()
        with self._lock:
            parent = self._runs.get(parent_run_id) if parent_run_id is not None else None
            rec = RunRecord(
                run_id=run_id, parent_run_id=parent_run_id,
                root_run_id=parent.root_run_id if parent is not None else run_id,
                name=name, kind=kind, tags=list(tags or []), metadata=dict(metadata or {}), t_start=t,
                prompt_text=prompt_text if self.token_counter is not None else None,
            )
            self._runs[run_id] = rec
            self._version += 1
        if parent is None:
            # A sharp left edge for each workflow, skipped when a sample is fresh: reading a meter costs
            # tens of microseconds, which matters for rapid-fire calls and not at all for interpolation.
            self.timeline.sample_if_stale(self._edge_age_s)

    def _finish(self, run_id: UUID, status: str, error: BaseException | None = None,
                response: LLMResult | None = None) -> None:
        t = self._clock()
        with self._lock:
            rec = self._runs.get(run_id)
            if rec is None:
                return
            rec.t_end = t
            rec.status = status
            if error is not None:
                rec.error = f"{type(error).__name__}: {error}"
            if response is not None:
                self._read_tokens(rec, response)
            rec.prompt_text = None
            self._version += 1
            is_root = rec.root_run_id == rec.run_id
        if is_root:
            self.timeline.sample_if_stale(self._edge_age_s)  # a sharp right edge

    def _read_tokens(self, rec: RunRecord, response: LLMResult) -> None:
        gens = [g for candidates in response.generations for g in candidates]
        infos = [g.generation_info or {} for g in gens]
        firsts = [(c[0].generation_info or {}) for c in response.generations if c]
        if any("prompt_tokens" in i or "completion_tokens" in i for i in infos):
            # Per-call accounting placed by the serving LLM in each generation.
            rec.prompt_tokens = _sum_opt([_as_int(i.get("prompt_tokens")) for i in firsts])
            rec.completion_tokens = _sum_opt([_as_int(i.get("completion_tokens")) for i in infos])
            rec.cached_tokens = _sum_opt([_as_int(i.get("cached_tokens")) for i in firsts])
            rec.token_source = str(next((i["token_source"] for i in infos if i.get("token_source")), "generation_info"))
            ttfts = [float(i["ttft_s"]) for i in infos if i.get("ttft_s") is not None]
            if ttfts:
                rec.ttft_s = min(ttfts)
        else:
            usages = [g.message.usage_metadata for g in gens
                      if isinstance(g, ChatGeneration) and getattr(g.message, "usage_metadata", None)]
            token_usage = (response.llm_output or {}).get("token_usage") or {}
            if usages:
                rec.prompt_tokens = sum(int(u.get("input_tokens", 0)) for u in usages)
                rec.completion_tokens = sum(int(u.get("output_tokens", 0)) for u in usages)
                cached = [(u.get("input_token_details") or {}).get("cache_read") for u in usages]
                rec.cached_tokens = _sum_opt([_as_int(c) for c in cached])
                rec.token_source = "usage_metadata"
            elif token_usage.get("prompt_tokens") is not None or token_usage.get("completion_tokens") is not None:
                rec.prompt_tokens = _as_int(token_usage.get("prompt_tokens"))
                rec.completion_tokens = _as_int(token_usage.get("completion_tokens"))
                details = token_usage.get("prompt_tokens_details") or {}
                rec.cached_tokens = _as_int(token_usage.get("cached_tokens", details.get("cached_tokens")))
                rec.token_source = "llm_output"
            elif self.token_counter is not None:
                try:
                    rec.prompt_tokens = self.token_counter(rec.prompt_text or "")
                    rec.completion_tokens = sum(self.token_counter(g.text) for g in gens)
                    rec.token_source = "counted"
                except Exception as exc:  # a tokenizer failure must not break the user's chain
                    logger.warning("token counting failed for run %s: %s", rec.run_id, exc)
        if rec.t_first_token is None and rec.ttft_s is not None and rec.t_end is not None:
            rec.t_first_token = min(rec.t_start + rec.ttft_s, rec.t_end)

    # LangChain callback methods -------------------------------------------------------------------------
    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     parent_run_id: UUID | None = None, tags: list[str] | None = None,
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Record the start of an LLM call."""
        self._start(run_id, parent_run_id, "llm", _run_name(serialized, kwargs, "llm"), tags, metadata,
                    "\n".join(prompts) if self.token_counter is not None else None)

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *,
                            run_id: UUID, parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Record the start of a chat-model call."""
        text = "\n".join(get_buffer_string(m) for m in messages) if self.token_counter is not None else None
        self._start(run_id, parent_run_id, "chat_model", _run_name(serialized, kwargs, "chat_model"), tags,
                    metadata, text)

    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        """Note the first streamed token's time."""
        rec = self._runs.get(run_id)
        if rec is not None and rec.t_first_token is None:
            t = self._clock()
            with self._lock:
                if rec.t_first_token is None:
                    rec.t_first_token = t

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the end of an LLM or chat-model call and its tokens."""
        self._finish(run_id, "ok", response=response)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record a failed LLM call (the error is kept; the chain goes on as LangChain decides)."""
        self._finish(run_id, "error", error=error)

    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *, run_id: UUID,
                       parent_run_id: UUID | None = None, tags: list[str] | None = None,
                       metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Record the start of a chain, runnable or graph node."""
        self._start(run_id, parent_run_id, "chain", _run_name(serialized, kwargs, "chain"), tags, metadata)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the end of a chain."""
        self._finish(run_id, "ok")

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record a failed chain."""
        self._finish(run_id, "error", error=error)

    def on_tool_start(self, serialized: dict[str, Any], input_str: str, *, run_id: UUID,
                      parent_run_id: UUID | None = None, tags: list[str] | None = None,
                      metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Record the start of a tool run."""
        self._start(run_id, parent_run_id, "tool", _run_name(serialized, kwargs, "tool"), tags, metadata)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the end of a tool run."""
        self._finish(run_id, "ok")

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record a failed tool run."""
        self._finish(run_id, "error", error=error)

    def on_retriever_start(self, serialized: dict[str, Any], query: str, *, run_id: UUID,
                           parent_run_id: UUID | None = None, tags: list[str] | None = None,
                           metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Record the start of a retriever run."""
        self._start(run_id, parent_run_id, "retriever", _run_name(serialized, kwargs, "retriever"), tags, metadata)

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the end of a retriever run."""
        self._finish(run_id, "ok")

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record a failed retriever run."""
        self._finish(run_id, "error", error=error)

    # -- results -----------------------------------------------------------------------------------------
    @property
    def runs(self) -> list[RunRecord]:
        """A copy of the run records, in start order."""
        with self._lock:
            return sorted((RunRecord(**{k: getattr(r, k) for k in r.__dataclass_fields__}) for r in self._runs.values()),
                          key=lambda r: r.t_start)

    def reset(self) -> None:
        """Forget recorded runs (the timeline keeps sampling)."""
        with self._lock:
            self._runs.clear()
            self._version += 1

    def _spans(self, records: list[RunRecord], now: float) -> list[Span]:
        spans = []
        for r in records:
            t_end = r.t_end if r.t_end is not None else max(now, r.t_start)
            pw, dw = 1.0, None
            if self.weighting == "tokens" and r.is_call:
                pw, dw = token_rate_weights(r.prompt_tokens, r.completion_tokens, r.t_start, t_end,
                                            r.t_first_token, r.cached_tokens)
            first = r.t_first_token if r.is_call else None
            spans.append(Span(run_id=r.run_id, t_start=r.t_start, t_end=t_end, is_call=r.is_call,
                              parent_id=r.parent_run_id if r.parent_run_id in self._runs else None,
                              t_first_token=first, prefill_weight=pw, decode_weight=dw))
        return spans

    def _compute(self) -> tuple[list[RunRecord], list[Span], Any, dict[Any, dict[str, float]],
                                dict[Any, dict[str, float]]]:
        records = self.runs
        now = self._clock()
        last = self.timeline.last_sample_t
        if records and (last is None or last < max(r.t_end if r.t_end is not None else now for r in records)):
            self.timeline.sample_now()  # cover the right edge of the newest run
        samples = self.timeline.snapshot()
        spans = self._spans(records, now)
        cumulative = dict(samples.energy_j)
        if self.idle_power_w is not None and samples.t:
            # The idle baseline is attributed like a component of constant power, so per-run idle shares add up.
            watts = math.fsum(self.idle_power_w.values())
            cumulative["__idle__"] = [watts * (t - samples.t[0]) for t in samples.t]
        result = attribute(samples.t, cumulative, spans, weighting=self.weighting)
        inclusive = result.inclusive(spans)
        zero = {c: 0.0 for c in result.components}
        calls_only = type(result)(total=result.total, outside=result.outside, window=result.window,
                                  prefill=result.prefill, decode=result.decode, components=result.components,
                                  direct={s.run_id: (result.direct[s.run_id] if s.is_call else zero) for s in spans})
        return records, spans, result, inclusive, calls_only.inclusive(spans)

    def _energy_cols(self, energy: Mapping[str, float]) -> dict[str, float]:
        groups = provenance_by_group(self.timeline.provenance)
        out: dict[str, float] = {}
        for g in COMPONENTS:
            if groups[g] == UNAVAILABLE:
                out[f"energy_{g}_j"] = _NAN
            else:
                out[f"energy_{g}_j"] = math.fsum(v for k, v in energy.items() if component_group(k) == g)
        known = [v for v in out.values() if not math.isnan(v)]
        out["energy_j"] = math.fsum(known) if known else _NAN
        return out

    def _idle(self, energy: Mapping[str, float]) -> float:
        return energy.get("__idle__", _NAN) if self.idle_power_w is not None else _NAN

    def to_dataframe(self) -> pd.DataFrame:
        """One row per run with timing, tokens, energy by component and provenance (columns: `RUN_COLUMNS`)."""
        import pandas as pd

        records, spans, result, inclusive, calls_inc = self._compute()
        prov = provenance_by_group(self.timeline.provenance)
        rows = []
        for r in records:
            e = self._energy_cols(inclusive[r.run_id])
            calls_e = self._energy_cols(calls_inc[r.run_id])["energy_j"]
            idle = self._idle(inclusive[r.run_id])
            pre = result.prefill.get(r.run_id)
            dec = result.decode.get(r.run_id)
            t_end = r.t_end
            rows.append({
                "run_id": str(r.run_id),
                "parent_run_id": str(r.parent_run_id) if r.parent_run_id else None,
                "root_run_id": str(r.root_run_id),
                "name": r.name, "kind": r.kind, "tags": list(r.tags), "status": r.status,
                "t_start": r.t_start, "t_first_token": r.t_first_token, "t_end": t_end,
                "latency_s": (t_end - r.t_start) if t_end is not None else _NAN,
                "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "cached_tokens": r.cached_tokens, "token_source": r.token_source,
                **e,
                "provenance_cpu": prov["cpu"], "provenance_gpu": prov["gpu"], "provenance_dram": prov["dram"],
                "prefill_energy_j": self._energy_cols(pre)["energy_j"] if pre is not None else _NAN,
                "decode_energy_j": self._energy_cols(dec)["energy_j"] if dec is not None else _NAN,
                "orchestration_energy_j": e["energy_j"] - calls_e,
                "idle_energy_j": idle, "active_energy_j": e["energy_j"] - idle,
                "ttft_s": (r.t_first_token - r.t_start) if r.t_first_token is not None else r.ttft_s,
                "langgraph_node": r.metadata.get("langgraph_node"),
                "langgraph_step": r.metadata.get("langgraph_step"),
                "metadata": dict(r.metadata), "error": r.error,
            })
        df = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
        for col in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            df[col] = df[col].astype("Int64")
        return df

    def summary(self) -> pd.DataFrame:
        """One row per workflow (root run): latency, tokens, throughput, energy, energy per token, cache hits."""
        import pandas as pd

        records, spans, result, inclusive, calls_inc = self._compute()
        prov = provenance_by_group(self.timeline.provenance)
        prov_str = "; ".join(f"{g}={prov[g]}" for g in COMPONENTS)
        by_root: dict[UUID, list[RunRecord]] = {}
        for r in records:
            by_root.setdefault(r.root_run_id, []).append(r)
        now = self._clock()
        rows = []
        for root_id, members in by_root.items():
            root = next((m for m in members if m.run_id == root_id), members[0])
            calls = [m for m in members if m.is_call]
            t_end = max((m.t_end if m.t_end is not None else now) for m in members)
            t_start = min(m.t_start for m in members)
            latency = t_end - t_start
            prompt = _sum_opt([c.prompt_tokens for c in calls])
            completion = _sum_opt([c.completion_tokens for c in calls])
            with_cache = [c for c in calls if c.cached_tokens is not None and c.prompt_tokens]
            cached = _sum_opt([c.cached_tokens for c in with_cache])
            hit_rate = (cached / sum(c.prompt_tokens or 0 for c in with_cache)) if with_cache else _NAN
            e = self._energy_cols(inclusive[root.run_id])
            calls_e = self._energy_cols(calls_inc[root.run_id])["energy_j"]
            idle = self._idle(inclusive[root.run_id])
            decode_time = _union_length([(c.t_first_token, c.t_end) for c in calls
                                         if c.t_first_token is not None and c.t_end is not None])
            rows.append({
                "workflow": root.name, "root_run_id": str(root_id), "latency_s": latency,
                "llm_calls": len(calls), "prompt_tokens": prompt, "completion_tokens": completion,
                "cached_tokens": cached,
                "throughput_tok_s": (completion / latency) if completion is not None and latency > 0 else _NAN,
                **e,
                "active_energy_j": e["energy_j"] - idle, "idle_energy_j": idle,
                "energy_per_token_j": (e["energy_j"] / completion) if completion else _NAN,
                "cache_hit_rate": hit_rate, "provenance": prov_str,
                "status": "error" if any(m.status == "error" for m in members) else
                          ("running" if any(m.status == "running" for m in members) else "ok"),
                "errors": sum(m.status == "error" for m in members),
                "orchestration_energy_j": e["energy_j"] - calls_e,
                "decode_throughput_tok_s": (completion / decode_time) if completion and decode_time > 0 else _NAN,
                "t_start": t_start, "t_end": t_end,
            })
        df = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
        for col in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            df[col] = df[col].astype("Int64")
        return df

    def totals(self) -> dict[str, float]:
        """Metered joules per component over the recorded runs' window, and what no run received.

        Returns:
            ``{"metered_j", "calls_j", "orchestration_j", "outside_j"}``: calls + orchestration + outside
            equals metered (the conservation law).
        """
        records, spans, result, _, _ = self._compute()
        comps = [c for c in result.components if c != "__idle__"]
        calls = math.fsum(result.direct[s.run_id][c] for s in spans if s.is_call for c in comps)
        orch = math.fsum(result.direct[s.run_id][c] for s in spans if not s.is_call for c in comps)
        return {"metered_j": math.fsum(result.total[c] for c in comps), "calls_j": calls,
                "orchestration_j": orch, "outside_j": math.fsum(result.outside[c] for c in comps)}

    def timeline_frame(self) -> pd.DataFrame:
        """The sampled timeline: one row per sample with cumulative joules and mean watts since the previous one.

        Columns: ``t``, ``energy_<component>_j`` (cumulative), ``power_<component>_w`` and
        ``gpu_util_<index>`` where reported and ``cpu_util`` (the machine's, percent since the previous sample).
        """
        import pandas as pd

        snap = self.timeline.snapshot()
        data: dict[str, list[float]] = {"t": list(snap.t)}
        for key, cum in snap.energy_j.items():
            name = key.replace(":", "")
            data[f"energy_{name}_j"] = list(cum)
            watts = [_NAN]
            for i in range(1, len(cum)):
                dt = snap.t[i] - snap.t[i - 1]
                watts.append((cum[i] - cum[i - 1]) / dt if dt > 0 else _NAN)
            data[f"power_{name}_w"] = watts
        for idx, util in snap.gpu_util.items():
            data[f"gpu_util_{idx}"] = list(util)
        if len(snap.cpu_util) == len(snap.t):
            data["cpu_util"] = list(snap.cpu_util)
        return pd.DataFrame(data)

    def report(self) -> str:
        """A readable text report: one block per workflow, then where the numbers come from."""
        s = self.summary()
        lines = ["Energy report", "============="]
        if s.empty:
            lines.append("(no runs recorded)")
        for _, row in s.iterrows():
            lines.append(f"workflow {row.workflow} [{row.status}]  run {row.root_run_id}")
            lines.append(f"  latency {row.latency_s:.3f} s, {row.llm_calls} LLM calls, "
                         f"tokens in/out/cached {_fmt_int(row.prompt_tokens)}/{_fmt_int(row.completion_tokens)}/"
                         f"{_fmt_int(row.cached_tokens)}, throughput {_fmt(row.throughput_tok_s)} tok/s")
            lines.append(f"  energy {_fmt(row.energy_j)} J (cpu {_fmt(row.energy_cpu_j)}, gpu {_fmt(row.energy_gpu_j)}, "
                         f"dram {_fmt(row.energy_dram_j)}); active {_fmt(row.active_energy_j)} J, "
                         f"idle {_fmt(row.idle_energy_j)} J; {_fmt(row.energy_per_token_j, 4)} J/token; "
                         f"cache hit rate {_fmt(row.cache_hit_rate, 3)}")
        lines.append("provenance: " + "; ".join(f"{g}={p}" for g, p in provenance_by_group(self.timeline.provenance).items()))
        lines.append(f"meter: {self.timeline.meter.describe()}")
        lines.append(f"sampling every {self.timeline.interval_s:.3f} s, {len(self.timeline)} samples, "
                     f"weighting={self.weighting}, idle baseline="
                     f"{'none' if self.idle_power_w is None else f'{math.fsum(self.idle_power_w.values()):.2f} W'}")
        if self.timeline.errors:
            lines.append(f"meter read failures: {self.timeline.errors} (last: {self.timeline.last_error})")
        return "\n".join(lines)


def _fmt(x: Any, digits: int = 2) -> str:
    try:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return "n/a"


def _fmt_int(x: Any) -> str:
    try:
        return "n/a" if x is None or x is getattr(__import__("pandas"), "NA") else str(int(x))
    except (TypeError, ValueError):
        return "n/a"


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


# Registered once, like langchain-core's usage callback: runs started inside `energy_callback()` pick the
# handler up without passing callbacks explicitly.
_energy_callback_var: ContextVar[EnergyCallbackHandler | None] = ContextVar("langchain_energy_callback", default=None)
register_configure_hook(_energy_callback_var, inheritable=True)


@contextmanager
def energy_callback(**handler_kwargs: Any) -> Iterator[EnergyCallbackHandler]:
    """Meter every LangChain run started in this context (and its threads/tasks) with one handler.

    Args:
        **handler_kwargs: passed to `EnergyCallbackHandler`.

    Yields:
        The handler; read its results inside or after the block.

    Example:
        ```python
        with energy_callback() as cb:
            chain.invoke({"text": doc})
        print(cb.report())
        ```
    """
    cb = EnergyCallbackHandler(**handler_kwargs)
    token = _energy_callback_var.set(cb)
    try:
        yield cb
    finally:
        _energy_callback_var.reset(token)
        cb.close()
