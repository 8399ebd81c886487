"""Multi-agent coding (MetaGPT-style) as a LangGraph graph.

Roles are prompt templates with their own token caps: an architect designs the program and its
modules; one engineer per module writes code, in parallel branches (LangGraph's Send API); a
reviewer and a reviser then loop on each module for ``rounds`` rounds, counted explicitly in the
module's state; an integrator writes the entry point that ties the modules together.

LLM calls per task: ``1 + modules * (1 + 2 * rounds) + 1``; 3 modules and 2 rounds give 17, inside
the study's 15-20.

The engineer is a tool-using agent when its model can bind tools (a chat model): it writes its module as the
argument of a forced ``check_syntax`` call (`bind_tools`), the tool parses the code in-process (``ast``, no
network) in a ``check`` node of the branch, the `ToolMessage` joins the engineer's history and its verdict goes
to the reviewer. The tool runs between model calls: its time is orchestration, never a model call. A model that
cannot bind tools (a completion LLM) writes the module as plain text and no tool runs.

Example:
    >>> from langchain_core.language_models.fake import FakeListLLM
    >>> graph = build_agentic_graph(FakeListLLM(responses=["x"]), rounds=1)
    >>> import asyncio
    >>> out = asyncio.run(graph.ainvoke({"task": "snake"}))
    >>> out["calls"], len(out["results"])
    (11, 3)
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Sequence
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.tools import tool
from langchain_core.utils.json import parse_partial_json
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from chains.workloads.llm_utils import LLMSource, acall, acall_message, ainvoke_many, positive_int, resolve_llm
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
# The tool-using engineer writes the same module, as the argument of its syntax-check tool.
ENGINEER_TOOL_PROMPT = (
    "You are a Python engineer.\nTask: {brief}\nDesign:\n{design}\n\n"
    "Write the complete code of the module `{module}` only, following the design, and check its syntax with "
    "the check_syntax tool."
)
REVIEWER_PROMPT = (
    "You are a code reviewer.\nTask: {brief}\nModule `{module}`:\n```python\n{code}\n```\n\n"
    "List the bugs, missing parts and deviations from the design, most important first, one per line.\n\n"
    "Review:"
)
# The same review, with the verdict of the engineer's syntax check (when its tool ran) below the code.
REVIEWER_CHECKED_PROMPT = REVIEWER_PROMPT.replace("```\n\n", "```\nSyntax check of the module: {verdict}\n\n", 1)
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


@tool
def check_syntax(code: str) -> str:
    """Check that a Python module's source code parses; returns "ok" or the first syntax error and its line."""
    try:
        compile(code, "<module>", "exec", flags=ast.PyCF_ONLY_AST)  # parse only: the code never runs
    except SyntaxError as exc:
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    except ValueError as exc:  # e.g. a null byte in the source
        return f"SyntaxError: {exc}"
    return "ok"


def _tool_engineer(model: Any) -> Runnable | None:
    """The model bound to `check_syntax` with the call forced, or None for a model that cannot bind tools."""
    try:
        return model.bind_tools([check_syntax], tool_choice=check_syntax.name)
    except (NotImplementedError, AttributeError):
        return None


def _submitted_code(message: AIMessage) -> tuple[str, str | None]:
    """The code in the engineer's tool call and the call's id; a call cut at the token cap keeps its partial code."""
    for call in message.tool_calls:
        if call["name"] == check_syntax.name:
            return str(call["args"].get("code") or ""), call.get("id")
    for call in message.invalid_tool_calls:
        if call.get("name") in (check_syntax.name, None):
            args = parse_partial_json(call.get("args") or "") if call.get("args") else None
            code = args.get("code") if isinstance(args, dict) else None
            return str(code or ""), call.get("id")
    return message.text, None


def _sum(a: int, b: int) -> int:
    return a + b


class ModuleState(TypedDict, total=False):
    """One module's branch: written once (and its syntax checked by the engineer's tool), then reviewed and
    revised ``rounds`` times. ``messages`` is the engineer's history: its prompt, its tool call, the tool's answer."""

    brief: str
    design: str
    module: str
    code: str
    review: str
    round: int
    rounds: int
    code_tokens: int
    review_tokens: int
    messages: list[BaseMessage]
    syntax: str | None
    results: Annotated[list[dict], operator.add]
    calls: Annotated[int, _sum]
    tool_calls: Annotated[int, _sum]


class ModuleOutput(TypedDict):
    """What a module branch hands back to the task graph."""

    results: Annotated[list[dict], operator.add]
    calls: Annotated[int, _sum]
    tool_calls: Annotated[int, _sum]


class AgenticState(TypedDict, total=False):
    """State of one coding task.

    Attributes:
        task: a bundled task name (snake, todo, calculator, weather) or a free-text brief.
        brief, modules: the resolved task.
        design: the architect's design.
        results: one ``{module, code, rounds, syntax}`` per module, from the parallel branches (``syntax``: the
            engineer's tool's verdict, None when no tool ran).
        product: the integrator's main.py.
        rounds: review/revise rounds per module (the explicit loop bound).
        code_tokens, review_tokens: per-role caps (code roles, review/design roles).
        calls: LLM calls made in the whole task.
        tool_calls: tool round trips made in the whole task (not LLM calls).
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
    tool_calls: Annotated[int, _sum]


def _module_graph(llm: LLMSource):
    async def engineer(state: ModuleState, config: RunnableConfig) -> dict:
        model = resolve_llm(llm, config)
        fields = {"brief": state["brief"], "design": state["design"], "module": state["module"]}
        coder = _tool_engineer(model)
        if coder is None:
            code = await acall(model, ENGINEER_PROMPT.format(**fields), max_tokens=state["code_tokens"],
                               role="engineer", config=config)
            return {"code": code, "round": 0, "calls": 1, "messages": [], "syntax": None}
        prompt = HumanMessage(ENGINEER_TOOL_PROMPT.format(**fields))
        message = await acall_message(coder, [prompt], max_tokens=state["code_tokens"], role="engineer",
                                      config=config)
        code, _ = _submitted_code(message)
        return {"code": code, "round": 0, "calls": 1, "messages": [prompt, message], "syntax": None}

    async def check(state: ModuleState, config: RunnableConfig) -> dict:
        # The engineer's tool call, run here between model calls (orchestration); a call cut at the token cap
        # is still answered, with the verdict on the partial code it carried.
        history = list(state.get("messages") or [])
        last = history[-1] if history else None
        if not isinstance(last, AIMessage):
            return {}  # no tool-calling model: nothing to run
        code, call_id = _submitted_code(last)
        answer = await check_syntax.ainvoke(
            {"name": check_syntax.name, "args": {"code": code}, "id": call_id or "call_engineer", "type": "tool_call"},
            config)
        assert isinstance(answer, ToolMessage)
        return {"messages": [*history, answer], "syntax": str(answer.content), "tool_calls": 1}

    async def reviewer(state: ModuleState, config: RunnableConfig) -> dict:
        model = resolve_llm(llm, config)
        verdict = state.get("syntax")
        fields = {"brief": state["brief"], "module": state["module"], "code": state["code"]}
        prompt = (REVIEWER_CHECKED_PROMPT.format(verdict=verdict, **fields) if verdict
                  else REVIEWER_PROMPT.format(**fields))
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
        return {"results": [{"module": state["module"], "code": state["code"], "rounds": state["round"],
                             "syntax": state.get("syntax")}]}

    def again(state: ModuleState) -> str:
        return "reviewer" if state["round"] < state["rounds"] else "submit"

    builder = StateGraph(ModuleState, output_schema=ModuleOutput)
    builder.add_node("engineer", engineer)
    builder.add_node("check", check)
    builder.add_node("reviewer", reviewer)
    builder.add_node("reviser", reviser)
    builder.add_node("submit", submit)
    builder.add_edge(START, "engineer")
    builder.add_edge("engineer", "check")
    builder.add_conditional_edges("check", again, ["reviewer", "submit"])
    builder.add_edge("reviewer", "reviser")
    builder.add_conditional_edges("reviser", again, ["reviewer", "submit"])
    builder.add_edge("submit", END)
    return builder.compile(name="module")


def build_agentic_graph(llm: LLMSource, *, rounds: int = 2, code_tokens: int = 1000, review_tokens: int = 500):
    """One coding task as a compiled LangGraph graph.

    Structure: ``architect`` -> Send one ``module`` branch per module (each a subgraph
    engineer -> check (its tool) -> [reviewer -> reviser] x rounds -> submit) -> ``integrate``.

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
