"""`EnergyBudgetMiddleware`: meter every model call of a `create_agent` run and stop (or downshift) on a budget."""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from contextvars import ContextVar, Token
from typing import Annotated, Any, NotRequired
from uuid import UUID

from langchain.agents.middleware.types import (
    AgentMiddleware,
    AgentState,
    ExtendedModelResponse,
    ModelRequest,
    ModelResponse,
    OmitFromInput,
)
from langchain_core.callbacks import BaseCallbackHandler, BaseCallbackManager
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.tracers.context import register_configure_hook
from langgraph.types import Command

from langchain_energy.callbacks import EnergyCallbackHandler, _energy_callback_var
from langchain_energy.errors import ConfigError
from langchain_energy.ledger import RunRecord

__all__ = ["EnergyBudgetMiddleware", "EnergyBudgetState"]

#: Threads whose latest run is remembered (the least recently used are forgotten: a run in progress uses its
#: thread at every model call).
_THREADS_KEPT = 4096


class EnergyBudgetState(AgentState[Any]):
    """Agent state with the run's energy summary (begun afresh at each run's first model call, returned at its
    end)."""

    energy: NotRequired[Annotated[dict[str, Any], OmitFromInput]]


class _CallWatch(BaseCallbackHandler):
    """Notes the run ids of the model calls started while a model call of the agent is in flight."""

    run_inline: bool = False

    def __init__(self, run_ids: list[Hashable]) -> None:
        super().__init__()
        self.run_ids = run_ids

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.run_ids.append(run_id)

    def on_llm_start(self, serialized: Any, prompts: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.run_ids.append(run_id)


class _Call:
    """One model call of the agent as metered: the messages it answered, and how it is metered: the record the
    middleware made itself (and the joules it got at the end), or the context it set for the user's energy
    handler (and the run ids that handler's callbacks saw)."""

    __slots__ = ("run_ids", "messages", "own", "energy", "context")

    def __init__(self) -> None:
        self.run_ids: list[Hashable] = []
        self.messages: list[BaseMessage] = []
        self.own: RunRecord | None = None
        self.energy: dict[str, Any] | None = None
        self.context: tuple[Token[Any], Token[Any]] | None = None


def _handlers_of(callbacks: Any) -> list[Any]:
    if isinstance(callbacks, BaseCallbackManager):
        return callbacks.handlers
    return callbacks or []


@functools.lru_cache(maxsize=256)
def _name_properties(cls: type) -> tuple[str, ...]:
    return tuple(k for k in ("model_name", "model") if hasattr(cls, k))


def _model_name(model: Any) -> str:
    # Fields are read from the instance's dict, properties only where the class has them: asking a pydantic
    # model for an attribute it lacks costs more than much of the metering (it builds an AttributeError).
    fields = getattr(model, "__dict__", {})
    name = fields.get("model_name") or fields.get("model")
    for key in () if name else _name_properties(type(model)):
        name = getattr(model, key)
        if name:
            break
    return str(name) if name else type(model).__name__


# When an energy handler already meters the agent's model calls, handlers in these variables join every LangChain
# run configured in the context (like `energy_callback()`), so both handlers hold the one record of each call.
_watch_var: ContextVar[_CallWatch | None] = ContextVar("langchain_energy_budget_watch", default=None)
_meter_var: ContextVar[EnergyCallbackHandler | None] = ContextVar("langchain_energy_budget_meter", default=None)
register_configure_hook(_watch_var, inheritable=True)
register_configure_hook(_meter_var, inheritable=True)


class EnergyBudgetMiddleware(AgentMiddleware[EnergyBudgetState, Any, Any]):
    """Meters each model call of an agent run and enforces an energy budget per run.

    Every model call (`wrap_model_call`) is metered by an `EnergyCallbackHandler` (the process's shared timeline
    and attribution, so concurrent runs split the device's joules rather than each counting all of it). The run's
    joules, tokens and J/token are kept in the agent state under ``energy``. When the run has spent `budget_j`
    joules, or its joules per generated token reach `budget_j_per_token`, the next model call goes to
    `fallback_model` if one is given; without one the run ends cleanly with an AI message that says why. Works
    with any chat model.

    Args:
        budget_j: joules one run may spend on model calls (None: no joule budget).
        budget_j_per_token: joules per generated token the run may reach (None: no such budget).
        fallback_model: the model to switch to once the budget is spent (None: end the run).
        handler: the energy handler that meters the calls, and keeps their table (default: one made on first
            use, on the shared timeline of the automatic meter, which keeps no record of the calls once their joules
            are in the run's summary).
        min_tokens_for_rate: generated tokens the run needs before `budget_j_per_token` is judged.

    Example:
        .. code-block:: python

            from langchain.agents import create_agent
            from langchain_energy import ChatServing, EnergyBudgetMiddleware

            agent = create_agent(ChatServing(max_tokens=128), tools=[check_syntax],
                                 middleware=[EnergyBudgetMiddleware(budget_j=500.0)])
            state = agent.invoke({"messages": [("user", "Write and check a module.")]})
            state["energy"]   # {'energy_j': ..., 'output_tokens': ..., 'j_per_token': ..., 'exhausted': False, ...}
    """

    state_schema = EnergyBudgetState

    def __init__(
        self,
        budget_j: float | None = None,
        budget_j_per_token: float | None = None,
        *,
        fallback_model: BaseChatModel | None = None,
        handler: EnergyCallbackHandler | None = None,
        min_tokens_for_rate: int = 1,
    ) -> None:
        super().__init__()
        if budget_j is None and budget_j_per_token is None:
            raise ConfigError("EnergyBudgetMiddleware needs budget_j or budget_j_per_token")
        for name, value in (("budget_j", budget_j), ("budget_j_per_token", budget_j_per_token)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{name} must be a positive number of joules, got {value!r}")
        if isinstance(min_tokens_for_rate, bool) or not isinstance(min_tokens_for_rate, int) or min_tokens_for_rate < 1:
            raise ConfigError(f"min_tokens_for_rate must be a positive integer, got {min_tokens_for_rate!r}")
        if fallback_model is not None and not isinstance(fallback_model, BaseChatModel):
            raise ConfigError(f"fallback_model must be a chat model, got {type(fallback_model).__name__}")
        self.budget_j = None if budget_j is None else float(budget_j)
        self.budget_j_per_token = None if budget_j_per_token is None else float(budget_j_per_token)
        self.fallback_model = fallback_model
        self.min_tokens_for_rate = min_tokens_for_rate
        self._handler = handler
        self._owns_handler = handler is None  # (its own handler keeps no record of the calls: see `_begin`)
        self._lock = threading.Lock()
        self._run_of_thread: OrderedDict[str, Any] = OrderedDict()  # thread id -> its latest run's control

    @property
    def handler(self) -> EnergyCallbackHandler:
        """The handler that meters the model calls (made on first use)."""
        if self._handler is not None:
            return self._handler
        with self._lock:
            if self._handler is None:
                self._handler = EnergyCallbackHandler()
            return self._handler

    # -- the run's summary -----------------------------------------------------------------------------
    def _fresh(self) -> dict[str, Any]:
        return {"energy_j": 0.0, "energy_measured_j": 0.0, "input_tokens": 0, "output_tokens": 0,
                "j_per_token": math.nan, "model_calls": 0, "budget_j": self.budget_j,
                "budget_j_per_token": self.budget_j_per_token, "exhausted": False, "fallback_calls": 0,
                "provenance": {}}

    def _spent(self, summary: dict[str, Any]) -> str | None:
        """Why the budget is spent, or None."""
        if self.budget_j is not None and summary["energy_j"] >= self.budget_j:
            return f"{summary['energy_j']:.1f} J of a {self.budget_j:g} J budget"
        if (self.budget_j_per_token is not None and summary["output_tokens"] >= self.min_tokens_for_rate
                and summary["j_per_token"] >= self.budget_j_per_token):
            return f"{summary['j_per_token']:.3g} J/token against a {self.budget_j_per_token:g} J/token budget"
        return None

    @staticmethod
    def _energy_on(messages: list[BaseMessage]) -> list[dict[str, Any]]:
        """The joules carried on the messages (``response_metadata["energy"]``: this package's models)."""
        return [e for m in messages if isinstance(e := m.response_metadata.get("energy"), dict)]

    def _call_energies(self, run_ids: list[Hashable], messages: list[BaseMessage]) -> list[dict[str, Any]]:
        """The joules of the model calls behind ``messages``: the split this package's models already carry on
        their message (final at the call's end), else the handler's."""
        on_messages = self._energy_on(messages)
        if on_messages and len(on_messages) >= len(run_ids):
            return on_messages
        handler = self.handler  # another chat model (or a split not yet final): ask the ledger
        return [e for e in (handler.energy_of(run_id) for run_id in run_ids) if e is not None]

    def _add_call(self, summary: dict[str, Any], energies: list[dict[str, Any]], messages: list[BaseMessage],
                  fallback: bool) -> dict[str, Any]:
        out = dict(summary)
        for energy in energies:
            out["energy_j"] += float(energy.get("energy_j", math.nan))
            out["energy_measured_j"] += float(energy.get("energy_measured_j", math.nan))
            out["provenance"] = energy.get("provenance") or out["provenance"]
        for message in messages:
            usage = message.usage_metadata if isinstance(message, AIMessage) else None
            if usage:
                out["input_tokens"] += usage.get("input_tokens") or 0
                out["output_tokens"] += usage.get("output_tokens") or 0
        out["model_calls"] += 1
        out["fallback_calls"] += fallback
        out["j_per_token"] = out["energy_j"] / out["output_tokens"] if out["output_tokens"] else math.nan
        out["exhausted"] = self._spent(out) is not None
        return out

    def _count(self, summary: dict[str, Any], call: _Call, fallback: bool) -> dict[str, Any]:
        """The run's summary with this call added."""
        if call.own is not None:  # (metered here: its joules came with its end, and are on our models' messages)
            energies = self._energy_on(call.messages) or ([] if call.energy is None else [call.energy])
            return self._add_call(summary, energies, call.messages, fallback)
        summary = self._add_call(summary, self._call_energies(call.run_ids, call.messages), call.messages, fallback)
        if self._owns_handler:
            # Beside the user's handler, the middleware's own joined the call's callbacks: it forgets the call now
            # (an agent that runs for months must not keep a record per call; a handler given by the user keeps
            # its table).
            self.handler.forget(call.run_ids)
        return summary

    @staticmethod
    def _metered_elsewhere(meter: EnergyCallbackHandler, model: Any) -> bool:
        """Whether an energy handler on `meter`'s ledger already sees the model call (the agent's callbacks, the
        model's own, or an `energy_callback()` block): then the call is one record both handlers hold."""
        if meter.timeline.handlers <= 1:  # (no other energy handler is alive on this timeline: none can see it)
            return False
        config = var_child_runnable_config.get()
        ledger = meter.ledger
        own = getattr(model, "__dict__", {}).get("callbacks")  # (a field: no pydantic attribute lookup)
        for handlers in (_handlers_of(config.get("callbacks") if config else None), _handlers_of(own),
                         (_energy_callback_var.get(),)):
            for h in handlers:
                if isinstance(h, EnergyCallbackHandler) and h.ledger is ledger:
                    return True
        return False

    def _begin(self, model: Any) -> _Call:
        """Start metering one model call. Alone, the middleware records the call itself: no callback handler
        joins the model call, so LangChain's callback machinery costs nothing. Beside the user's energy handler,
        its handler joins that call's callbacks (through context variables), so the call stays one record in the
        ledger."""
        call = _Call()
        meter = self.handler
        if self._metered_elsewhere(meter, model):
            call.context = (_watch_var.set(_CallWatch(call.run_ids)), _meter_var.set(meter))
        else:
            # (The middleware's own handler keeps no record of it: the joules come back from `end_call`.)
            call.own = meter.start_call(_model_name(model), keep=not self._owns_handler)
        return call

    def _end(self, call: _Call, error: BaseException | None = None) -> None:
        """Stop metering a call begun by `_begin` (with the error it raised, if any)."""
        if call.context is not None:
            watch_token, meter_token = call.context
            _meter_var.reset(meter_token)
            _watch_var.reset(watch_token)
        elif call.own is not None:
            call.energy = self.handler.end_call(call.own, call.messages, error=error)

    # -- hooks -----------------------------------------------------------------------------------------
    def _stopped(self, summary: dict[str, Any]) -> ExtendedModelResponse | None:
        """The run's last answer when its budget is spent and there is no fallback model: an AI message saying
        so, with no tool calls, so the agent ends there (no model is called). Done inside `wrap_model_call`
        rather than in a ``before_model`` hook: a hook is one more graph step on every model call."""
        why = self._spent(summary)
        if why is None or self.fallback_model is not None:
            return None
        note = AIMessage(content=f"Stopped: this run's energy budget is spent ({why}).",
                         response_metadata={"energy_budget": "exhausted"})
        return ExtendedModelResponse(model_response=ModelResponse(result=[note]),
                                     command=Command(update={"energy": {**summary, "exhausted": True}}))

    def _same_run(self, runtime: Any) -> bool:
        """Whether a summary already in the state is this run's. Without a checkpointer the state (and so the
        summary) begins with the run. On a thread it persists: LangGraph gives each run a fresh
        ``Runtime.control``, so the last one seen on the thread tells its runs apart (no graph step per run)."""
        thread = getattr(getattr(runtime, "execution_info", None), "thread_id", None)
        control = getattr(runtime, "control", None)
        if thread is None or control is None:  # (a LangGraph without run control: the thread shares one budget)
            return True
        with self._lock:
            same = self._run_of_thread.get(thread) is control
            self._run_of_thread[thread] = control
            self._run_of_thread.move_to_end(thread)
            if len(self._run_of_thread) > _THREADS_KEPT:
                self._run_of_thread.popitem(last=False)
        return same

    def _prepare(self, request: ModelRequest) -> tuple[ModelRequest, dict[str, Any], bool]:
        summary = request.state.get("energy")
        if not self._same_run(request.runtime) or summary is None:  # every call notes its run
            summary = self._fresh()
        fallback = self.fallback_model is not None and self._spent(summary) is not None
        if fallback:
            request = request.override(model=self.fallback_model)
        return request, summary, fallback

    def wrap_model_call(self, request: ModelRequest,
                        handler: Callable[[ModelRequest], ModelResponse]) -> ExtendedModelResponse:
        """Meter one model call (on the fallback model once the budget is spent) and add it to the run; once the
        budget is spent without a fallback, end the run with a message saying so instead of calling the model."""
        request, summary, fallback = self._prepare(request)
        stopped = self._stopped(summary)
        if stopped is not None:
            return stopped
        call = self._begin(request.model)
        try:
            response = handler(request)
        except BaseException as exc:
            self._end(call, exc)
            raise
        call.messages = response.result
        self._end(call)
        summary = self._count(summary, call, fallback)
        return ExtendedModelResponse(model_response=response, command=Command(update={"energy": summary}))

    async def awrap_model_call(self, request: ModelRequest,
                               handler: Callable[[ModelRequest], Awaitable[ModelResponse]]) -> ExtendedModelResponse:
        """Async form of `wrap_model_call`."""
        request, summary, fallback = self._prepare(request)
        stopped = self._stopped(summary)
        if stopped is not None:
            return stopped
        call = self._begin(request.model)
        try:
            response = await handler(request)
        except BaseException as exc:
            self._end(call, exc)
            raise
        call.messages = response.result
        self._end(call)
        summary = self._count(summary, call, fallback)
        return ExtendedModelResponse(model_response=response, command=Command(update={"energy": summary}))
