"""Benchmark of `EnergyBudgetMiddleware`: its overhead per model call of a `create_agent` run (target: under 0.2 ms).

The agent's model is a test double that answers at once (so only the agent and middleware machinery is timed): it
calls a no-op tool ``MODEL_CALLS - 1`` times, then answers, so each agent run makes ``MODEL_CALLS`` model calls. One
double reports like this package's models (its message gets the call's joules, which the middleware reads), one like
any other chat model (the middleware asks the ledger). Prints a markdown table.

    python -m bench.bench_middleware [--calls 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.messages.tool import tool_call
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool

from langchain_energy.callbacks import EnergyCallbackHandler
from langchain_energy.meters import auto_meter
from langchain_energy.middleware import EnergyBudgetMiddleware

TARGET_MS = 0.2
MODEL_CALLS = 4


@tool
def noop(step: int) -> str:
    """Do nothing (the agent's tool)."""
    return "ok"


class InstantChat(BaseChatModel):
    """Test double of a served chat model: answers at once, with usage; ``served`` adds the timings that this
    package's models report (then an energy handler puts the call's joules on the message)."""

    served: bool = True

    @property
    def _llm_type(self) -> str:
        return "instant-chat"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        meta = {"latency_s": 1e-4, "ttft_s": 5e-5} if self.served else {}
        step = sum(isinstance(m, ToolMessage) for m in messages)
        calls = [tool_call(name="noop", args={"step": step}, id=f"c{step}")] if step < MODEL_CALLS - 1 else []
        message = AIMessage(content="" if calls else "done", tool_calls=calls, response_metadata=meta,
                            usage_metadata={"input_tokens": 8, "output_tokens": 2, "total_tokens": 10})
        return ChatResult(generations=[ChatGeneration(message=message)])


def _per_call_s(agent: Any, runs: int) -> float:
    """Seconds per model call over ``runs`` agent runs."""
    t0 = time.perf_counter()
    for _ in range(runs):
        agent.invoke({"messages": [("user", "hi")]})
    return (time.perf_counter() - t0) / (runs * MODEL_CALLS)


def overhead_ms(served: bool, calls: int, rounds: int) -> tuple[float, float, int]:
    """Median per-call ms of the agent without and with the middleware, and the model calls it metered."""
    model = InstantChat(served=served)
    middleware = EnergyBudgetMiddleware(budget_j=1e12, handler=EnergyCallbackHandler(meter=auto_meter()))
    bare = create_agent(model, tools=[noop])
    metered = create_agent(model, tools=[noop], middleware=[middleware])
    _per_call_s(bare, 50), _per_call_s(metered, 50)  # warm up imports and caches
    plain, with_mw = [], []
    for _ in range(rounds):
        plain.append(_per_call_s(bare, calls))
        with_mw.append(_per_call_s(metered, calls))
    state = metered.invoke({"messages": [("user", "hi")]})
    middleware.handler.close()
    if state["energy"]["model_calls"] != MODEL_CALLS:  # the timing means nothing unless every call was metered
        raise RuntimeError(f"the middleware metered {state['energy']['model_calls']} of {MODEL_CALLS} model calls")
    return statistics.median(plain) * 1e3, statistics.median(with_mw) * 1e3, state["energy"]["model_calls"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=150, help=f"agent runs ({MODEL_CALLS} model calls each) per round")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (the median is reported)")
    args = p.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        p.error("--calls and --rounds must be >= 1")
    print(f"| middleware benchmark (per model call; agent runs of {MODEL_CALLS} model calls and "
          f"{MODEL_CALLS - 1} tool calls) | without | with EnergyBudgetMiddleware | overhead | target | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    for served, label in ((True, "this package's models (energy read from the message)"),
                          (False, "any other chat model (energy from the ledger)")):
        bare, metered, _ = overhead_ms(served, args.calls, args.rounds)
        over = metered - bare
        print(f"| create_agent: {label} | {bare:.3f} ms | {metered:.3f} ms | {over:.3f} ms | "
              f"< {TARGET_MS} ms | {'yes' if over < TARGET_MS else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
