"""Benchmark of `EnergyBudgetMiddleware`: its overhead per model call of a `create_agent` run (target: under 0.2 ms).

The agent's model is a test double that answers at once (so only the agent and middleware machinery is timed): it
calls a no-op tool ``MODEL_CALLS - 1`` times, then answers, so each agent run makes ``MODEL_CALLS`` model calls. One
double reports like this package's models (its message gets the call's joules, which the middleware reads), one like
any other chat model (the middleware asks the ledger). Alone (no energy handler of the user's on the agent), the
middleware meters each call itself and adds no callback handler to it. Its own overhead is what it adds over a
pass-through ``wrap_model_call`` middleware, whose cost (LangChain's wrapping of the call) any such middleware pays;
the overhead over no middleware at all is shown beside it. Prints a markdown table.

    python -m bench.bench_middleware [--runs 1500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.messages.tool import tool_call
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool

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


def _per_call_s(agent: Any, runs: int = 1) -> float:
    """Seconds per model call over ``runs`` agent runs."""
    t0 = time.perf_counter()
    for _ in range(runs):
        agent.invoke({"messages": [("user", "hi")]})
    return (time.perf_counter() - t0) / (runs * MODEL_CALLS)


class PassThrough(AgentMiddleware):
    """A middleware that only passes each model call on: what LangChain costs for any ``wrap_model_call``."""

    def wrap_model_call(self, request: Any, handler: Any) -> Any:
        return handler(request)


def timings_ms(served: bool, runs: int) -> dict[str, float]:
    """Median per-call ms of the agent with no middleware, a pass-through one and EnergyBudgetMiddleware, and the
    medians of the differences. The three take turns one agent run at a time (in a rotating order), so a slow
    spell of the machine hits them alike and each difference is between runs a few milliseconds apart."""
    model = InstantChat(served=served)
    middleware = EnergyBudgetMiddleware(budget_j=1e12)  # (as users make it: its own handler, the automatic meter)
    agents = {"bare": create_agent(model, tools=[noop]),
              "pass": create_agent(model, tools=[noop], middleware=[PassThrough()]),
              "energy": create_agent(model, tools=[noop], middleware=[middleware])}
    for agent in agents.values():
        _per_call_s(agent, 50)  # warm up imports and caches
    per_run: dict[str, list[float]] = {"bare": [], "pass": [], "energy": [], "own": [], "total": []}
    names = list(agents)
    for i in range(runs):
        order = names[i % 3:] + names[:i % 3]
        t = {name: _per_call_s(agents[name]) for name in order}
        for name, seconds in t.items():
            per_run[name].append(seconds)
        per_run["own"].append(t["energy"] - t["pass"])
        per_run["total"].append(t["energy"] - t["bare"])
    state = agents["energy"].invoke({"messages": [("user", "hi")]})
    middleware.handler.close()
    if state["energy"]["model_calls"] != MODEL_CALLS:  # the timing means nothing unless every call was metered
        raise RuntimeError(f"the middleware metered {state['energy']['model_calls']} of {MODEL_CALLS} model calls")
    return {name: statistics.median(values) * 1e3 for name, values in per_run.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1500,
                   help=f"agent runs ({MODEL_CALLS} model calls each) of each variant (medians are reported)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    print(f"| middleware benchmark (per model call; agent runs of {MODEL_CALLS} model calls and "
          f"{MODEL_CALLS - 1} tool calls) | no middleware | pass-through middleware | EnergyBudgetMiddleware | "
          "its own overhead (over pass-through) | own overhead / no middleware | overhead over no middleware | "
          "target (own) | met |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for served, label in ((True, "this package's models (energy read from the message)"),
                          (False, "any other chat model (energy from the ledger)")):
        ms = timings_ms(served, args.runs)
        # (The ratio, measured in one run, moves less with the machine's speed than the milliseconds do.)
        print(f"| create_agent: {label} | {ms['bare']:.3f} ms | {ms['pass']:.3f} ms | {ms['energy']:.3f} ms | "
              f"{ms['own']:.3f} ms | {100 * ms['own'] / ms['bare']:.1f} % | {ms['total']:.3f} ms | < {TARGET_MS} ms | "
              f"{'yes' if ms['own'] < TARGET_MS else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
