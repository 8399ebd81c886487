"""Multi-agent coding (MetaGPT-style) as a LangGraph graph.

Roles are prompt templates with their own token caps: an architect designs the program and its
modules; one engineer per module writes code, in parallel branches (LangGraph's Send API); a
reviewer and a reviser then loop on each module for ``rounds`` rounds, counted explicitly in the
module's state; an integrator writes the entry point that ties the modules together.

LLM calls per task: ``1 + modules * (1 + 2 * rounds) + 1``; 3 modules and 2 rounds give 17, inside
the study's 15-20.

Example:
    >>> from langchain_core.language_models.fake import FakeListLLM
    >>> graph = build_agentic_graph(FakeListLLM(responses=["x"]), rounds=1)
    >>> import asyncio
    >>> out = asyncio.run(graph.ainvoke({"task": "snake"}))
    >>> out["calls"], len(out["results"])
    (11, 3)
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Annotated, TypedDict

from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from chains.workloads.llm_utils import LLMSource, acall, ainvoke_many, positive_int, resolve_llm
from langchain_energy.errors import ConfigError, DataError

# Coding tasks: a one-paragraph brief and the modules the architect splits it into. Fixed module
# lists keep the DAG (and so the number of calls) the same across trials.
TASKS: dict[str, dict] = {
    "snake": {
        "brief": "A terminal snake game in Python: the snake moves on a grid, eats food to grow, and the game "
        "ends when it hits a wall or itself; the score is shown.",
        "modules": ["game_state", "renderer", "input_loop"],
    },
    "todo": {
        "brief": "A command-line to-do list manager in Python that adds, lists, completes and deletes tasks and "
        "keeps them in a JSON file.",
        "modules": ["storage", "commands", "cli"],
    },
    "calculator": {
        "brief": "A calculator in Python that parses arithmetic expressions with parentheses and the four "
        "operators and evaluates them without eval().",
        "modules": ["tokenizer", "parser", "evaluator"],
    },
    "weather": {
        "brief": "A Python tool that reads hourly temperature records from a CSV file and reports daily minimum, "
        "maximum and mean temperatures, with a text chart.",
        "modules": ["reader", "statistics", "report"],
    },
}

ARCHITECT_PROMPT = (
    "You are the software architect of a small team.\nTask: {brief}\n"
    "The program has these modules: {modules}.\n"
    "Write the design: the purpose of each module, the functions it exposes with their signatures, and the "
    "data passed between modules. Be brief and precise.\n\nDesign:"
)
ENGINEER_PROMPT = (
    "You are a Python engineer.\nTask: {brief}\nDesign:\n{design}\n\n"
    "Write the complete code of the module `{module}` only, following the design. Output only code.\n\n"
    "```python\n"
)
REVIEWER_PROMPT = (
    "You are a code reviewer.\nTask: {brief}\nModule `{module}`:\n```python\n{code}\n```\n\n"
    "List the bugs, missing parts and deviations from the design, most important first, one per line.\n\n"
    "Review:"
)
REVISER_PROMPT = (
    "You are a Python engineer fixing your module after a review.\nTask: {brief}\nModule `{module}`:\n"
    "```python\n{code}\n```\nReview:\n{review}\n\nWrite the corrected code of `{module}`. Output only code.\n\n"
    "```python\n"
)
INTEGRATOR_PROMPT = (
    "You are the lead engineer.\nTask: {brief}\nDesign:\n{design}\n\nModules (excerpts):\n{excerpts}\n\n"
    "Write main.py, which imports the modules and runs the program. Output only code.\n\n```python\n"
)
# Bounded excerpts keep the integrator's prompt inside a 4k context whatever the code caps.
EXCERPT_CHARS = 600
DESIGN_CHARS = 2000


def resolve_task(name_or_brief: str) -> dict:
    """A bundled task by name, or a free-text brief split into three generic modules."""
    if name_or_brief in TASKS:
        return {"name": name_or_brief, **TASKS[name_or_brief]}
    if not name_or_brief or not name_or_brief.strip():
        raise DataError("the coding task is empty; name one of " + ", ".join(TASKS) + " or write a brief")
    return {"name": "custom", "brief": name_or_brief.strip(), "modules": ["core", "interface", "main_loop"]}


def _sum(a: int, b: int) -> int:
    return a + b


class ModuleState(TypedDict, total=False):
    """One module's branch: written once, then reviewed and revised ``rounds`` times."""

    brief: str
    design: str
    module: str
    code: str
    review: str
    round: int
    rounds: int
    code_tokens: int
    review_tokens: int
    results: Annotated[list[dict], operator.add]
    calls: Annotated[int, _sum]


class ModuleOutput(TypedDict):
    """What a module branch hands back to the task graph."""

    results: Annotated[list[dict], operator.add]
    calls: Annotated[int, _sum]


class AgenticState(TypedDict, total=False):
    """State of one coding task.

    Attributes:
        task: a bundled task name (snake, todo, calculator, weather) or a free-text brief.
        brief, modules: the resolved task.
        design: the architect's design.
        results: one ``{module, code, review, rounds}`` per module, from the parallel branches.
        product: the integrator's main.py.
        rounds: review/revise rounds per module (the explicit loop bound).
        code_tokens, review_tokens: per-role caps (code roles, review/design roles).
        calls: LLM calls made in the whole task.
    """

    task: str
    brief: str
    modules: list[str]
    design: str
    results: Annotated[list[dict], operator.add]
    product: str
    rounds: int
    code_tokens: int
    review_tokens: int
    calls: Annotated[int, _sum]


def _module_graph(llm: LLMSource):
    async def engineer(state: ModuleState, config: RunnableConfig) -> dict:
        model = resolve_llm(llm, config)
        prompt = ENGINEER_PROMPT.format(brief=state["brief"], design=state["design"], module=state["module"])
        code = await acall(model, prompt, max_tokens=state["code_tokens"], role="engineer", config=config)
        return {"code": code, "round": 0, "calls": 1}

    async def reviewer(state: ModuleState, config: RunnableConfig) -> dict:
        model = resolve_llm(llm, config)
        prompt = REVIEWER_PROMPT.format(brief=state["brief"], module=state["module"], code=state["code"])
        review = await acall(model, prompt, max_tokens=state["review_tokens"], role="reviewer", config=config)
        return {"review": review, "calls": 1}

    async def reviser(state: ModuleState, config: RunnableConfig) -> dict:
        model = resolve_llm(llm, config)
        prompt = REVISER_PROMPT.format(
            brief=state["brief"], module=state["module"], code=state["code"], review=state["review"]
        )
        code = await acall(model, prompt, max_tokens=state["code_tokens"], role="reviser", config=config)
        # A model that returns nothing keeps the previous version.
        return {"code": code or state["code"], "round": state["round"] + 1, "calls": 1}

    def submit(state: ModuleState) -> dict:
        return {"results": [{"module": state["module"], "code": state["code"], "rounds": state["round"]}]}

    def again(state: ModuleState) -> str:
        return "reviewer" if state["round"] < state["rounds"] else "submit"

    builder = StateGraph(ModuleState, output_schema=ModuleOutput)
    builder.add_node("engineer", engineer)
    builder.add_node("reviewer", reviewer)
    builder.add_node("reviser", reviser)
    builder.add_node("submit", submit)
    builder.add_edge(START, "engineer")
    builder.add_conditional_edges("engineer", again, ["reviewer", "submit"])
    builder.add_edge("reviewer", "reviser")
    builder.add_conditional_edges("reviser", again, ["reviewer", "submit"])
    builder.add_edge("submit", END)
    return builder.compile(name="module")


def build_agentic_graph(llm: LLMSource, *, rounds: int = 2, code_tokens: int = 1000, review_tokens: int = 500):
    """One coding task as a compiled LangGraph graph.

    Structure: ``architect`` -> Send one ``module`` branch per module (each a subgraph
    engineer -> [reviewer -> reviser] x rounds -> submit) -> ``integrate``.

    Args:
        llm: a language model, or a function ``config -> model`` called at run time.
        rounds: default review/revise rounds per module (the state may override it; 0 skips review).
        code_tokens: default cap for the engineer, reviser and integrator.
        review_tokens: default cap for the architect and reviewer.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"rounds must be an integer >= 0, got {rounds!r}")
    positive_int("code_tokens", code_tokens)
    positive_int("review_tokens", review_tokens)
    module_graph = _module_graph(llm)

    async def architect(state: AgenticState, config: RunnableConfig) -> dict:
        task = resolve_task(state.get("task") or "snake")
        caps = {
            "rounds": state["rounds"] if state.get("rounds") is not None else rounds,
            "code_tokens": state.get("code_tokens") or code_tokens,
            "review_tokens": state.get("review_tokens") or review_tokens,
        }
        model = resolve_llm(llm, config)
        prompt = ARCHITECT_PROMPT.format(brief=task["brief"], modules=", ".join(task["modules"]))
        design = await acall(model, prompt, max_tokens=caps["review_tokens"], role="architect", config=config)
        return {"brief": task["brief"], "modules": task["modules"], "design": design, "calls": 1, **caps}

    def fan_out(state: AgenticState) -> list[Send]:
        return [
            Send(
                "module",
                {
                    "brief": state["brief"],
                    "design": state["design"][:DESIGN_CHARS],
                    "module": m,
                    "rounds": state["rounds"],
                    "code_tokens": state["code_tokens"],
                    "review_tokens": state["review_tokens"],
                },
            )
            for m in state["modules"]
        ]

    async def integrate(state: AgenticState, config: RunnableConfig) -> dict:
        model = resolve_llm(llm, config)
        by_module = {r["module"]: r["code"] for r in state["results"]}
        excerpts = "\n\n".join(f"# {m}.py\n{by_module.get(m, '')[:EXCERPT_CHARS]}" for m in state["modules"])
        prompt = INTEGRATOR_PROMPT.format(brief=state["brief"], design=state["design"][:DESIGN_CHARS], excerpts=excerpts)
        product = await acall(model, prompt, max_tokens=state["code_tokens"], role="integrator", config=config)
        return {"product": product, "calls": 1}

    builder = StateGraph(AgenticState)
    builder.add_node("architect", architect)
    builder.add_node("module", module_graph)
    builder.add_node("integrate", integrate)
    builder.add_edge(START, "architect")
    builder.add_conditional_edges("architect", fan_out, ["module"])
    builder.add_edge("module", "integrate")
    builder.add_edge("integrate", END)
    return builder.compile(name="agentic_coding")


def calls_per_task(n_modules: int = 3, rounds: int = 2) -> int:
    """LLM calls of one task: architect + per module (engineer + rounds x (review + revise)) + integrator."""
    return 1 + n_modules * (1 + 2 * rounds) + 1


def agentic_workload(
    llm: LLMSource, *, rounds: int = 2, code_tokens: int = 1000, review_tokens: int = 500, users: int = 1
) -> Runnable:
    """The coding workload: tasks ``users`` at a time under one root run.

    Input: a list of task names or briefs. Output: each task's final state.
    """
    positive_int("users", users)
    graph = build_agentic_graph(llm, rounds=rounds, code_tokens=code_tokens, review_tokens=review_tokens)

    async def run(tasks: Sequence[str], config: RunnableConfig) -> list[dict]:
        if not tasks:
            raise DataError("no coding tasks to run")
        for t in tasks:
            resolve_task(t)
        return await ainvoke_many(graph, [{"task": t} for t in tasks], config, users)

    return RunnableLambda(run, name="agentic")
