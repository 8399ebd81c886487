"""The multi-agent coding workload on Parrot: the architect and the independent module branches as one DAG.

Same prompts, calls and caps as `chains.workloads.agentic`. The architect's design, each engineer's code and each
review are semantic variables: every module branch (engineer -> [reviewer -> reviser] x rounds) hangs off
the design variable, and all branches are submitted together, so Parrot's scheduler sees them as
independent chains it may run side by side. The integrator needs bounded excerpts of every module (a
client-side cut that a template cannot express), so it is submitted after the branches finish.

Example:
    >>> wl = agentic_parrot_workload("http://127.0.0.1:9000", "smollm2-135m", tokenizer=model_dir)  # doctest: +SKIP
    >>> wl.invoke(["snake"], config={"callbacks": [handler]})[0]["calls"]  # doctest: +SKIP
    17
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda

from chains.workloads.agentic import (
    ARCHITECT_PROMPT,
    DESIGN_CHARS,
    ENGINEER_PROMPT,
    EXCERPT_CHARS,
    INTEGRATOR_PROMPT,
    REVIEWER_PROMPT,
    REVISER_PROMPT,
    resolve_task,
)
from chains.workloads.llm_utils import positive_int
from langchain_energy._loop import run_sync
from langchain_energy.backends.base import SamplingParams
from langchain_energy.backends.parrot import ParrotClient, TokenCounter, resolve_token_counter
from langchain_energy.backends.parrot_program import SemanticProgram
from langchain_energy.errors import ConfigError, DataError


def build_branches_program(task: dict, *, rounds: int, code: SamplingParams, review: SamplingParams) -> SemanticProgram:
    """Architect plus every module branch, as one program; the last call of each branch is ``final_<module>``."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"rounds must be an integer >= 0, got {rounds!r}")
    program = SemanticProgram(f"agentic_{task['name']}")
    design = program.call("architect", ARCHITECT_PROMPT, {"brief": task["brief"], "modules": ", ".join(task["modules"])},
                          review, tags=["role:architect"], metadata={"role": "architect"})
    for module in task["modules"]:
        base = {"brief": task["brief"], "module": module}
        last = program.call(f"engineer_{module}" if rounds else f"final_{module}", ENGINEER_PROMPT,
                            {**base, "design": design}, code, tags=["role:engineer"], metadata={"role": "engineer"})
        for r in range(1, rounds + 1):
            rev = program.call(f"reviewer_{module}_{r}", REVIEWER_PROMPT, {**base, "code": last}, review,
                               tags=["role:reviewer"], metadata={"role": "reviewer"})
            name = f"final_{module}" if r == rounds else f"reviser_{module}_{r}"
            last = program.call(name, REVISER_PROMPT, {**base, "code": last, "review": rev}, code,
                                tags=["role:reviser"], metadata={"role": "reviser"})
    return program


async def arun_agentic_parrot(
    tasks: Sequence[str],
    *,
    base_url: str,
    model: str,
    tokenizer: Any = None,
    rounds: int = 2,
    code_tokens: int = 1000,
    review_tokens: int = 500,
    users: int = 1,
    temperature: float = 0.7,
    criteria: str = "latency",
    timeout_s: float = 600.0,
    config: RunnableConfig | None = None,
) -> list[dict]:
    """Run coding tasks on Parrot, ``users`` at a time; each result has ``product``, ``results`` and ``calls``."""
    positive_int("users", users)
    positive_int("code_tokens", code_tokens)
    positive_int("review_tokens", review_tokens)
    if not tasks:
        raise DataError("no coding tasks to run")
    resolved = [resolve_task(t) for t in tasks]
    code = SamplingParams(max_tokens=code_tokens, temperature=temperature)
    review = SamplingParams(max_tokens=review_tokens, temperature=temperature)
    counter: TokenCounter = resolve_token_counter(tokenizer, model)
    callbacks = (config or {}).get("callbacks")
    gate = asyncio.Semaphore(users)

    async with ParrotClient(base_url, request_timeout=60.0) as client:
        async def one(task: dict) -> dict:
            async with gate:
                branches = build_branches_program(task, rounds=rounds, code=code, review=review)
                done = await branches.arun(base_url, model, counter, criteria=criteria, timeout_s=timeout_s,
                                           callbacks=callbacks, client=client)
                codes = {m: done.outputs[f"final_{m}"] for m in task["modules"]}
                excerpts = "\n\n".join(f"# {m}.py\n{codes[m][:EXCERPT_CHARS]}" for m in task["modules"])
                integrator = SemanticProgram(f"agentic_{task['name']}_integrate")
                integrator.call("integrator", INTEGRATOR_PROMPT, {"brief": task["brief"], "excerpts": excerpts,
                                "design": done.outputs["architect"][:DESIGN_CHARS]}, code,
                                tags=["role:integrator"], metadata={"role": "integrator"})
                final = await integrator.arun(base_url, model, counter, criteria=criteria, timeout_s=timeout_s,
                                              callbacks=callbacks, client=client)
                return {
                    "task": task["name"],
                    "design": done.outputs["architect"],
                    "results": [{"module": m, "code": codes[m], "rounds": rounds} for m in task["modules"]],
                    "product": final.final,
                    "calls": len(done.completions) + len(final.completions),
                    "latency_s": done.latency_s + final.latency_s,
                }

        return list(await asyncio.gather(*(one(t) for t in resolved)))


def agentic_parrot_workload(base_url: str, model: str, *, tokenizer: Any = None, **options: Any) -> Runnable:
    """The coding workload on Parrot as a runnable: task names or briefs in, each task's result out."""
    async def run(tasks: Sequence[str], config: RunnableConfig) -> list[dict]:
        return await arun_agentic_parrot(tasks, base_url=base_url, model=model, tokenizer=tokenizer, config=config, **options)

    def run_blocking(tasks: Sequence[str], config: RunnableConfig) -> list[dict]:
        return run_sync(run(tasks, config))

    return RunnableLambda(run_blocking, afunc=run, name="agentic")
