"""Tool calling for the chat model: tool specs, ``tool_choice`` and forced calls decoded against a JSON schema.

A forced tool call (``tool_choice="any"``, ``"required"``, ``True`` or a tool's name) is not left to a server-side
parser: the engine decodes the call itself against a JSON schema (vLLM's ``response_format`` ``json_schema``), so
its arguments always parse and always match the tool's schema, whatever the model. ``"auto"`` leaves the choice to
the model and needs the server's tool-call parser.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.utils.function_calling import convert_to_openai_tool

from langchain_energy.errors import ConfigError

#: What `normalize_tool_choice` reduces every LangChain/OpenAI spelling to.
ChoiceMode = Literal["auto", "none", "forced"]


def tool_specs(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI function specs (``{"type": "function", "function": {...}}``) of LangChain tools of any form.

    Raises:
        ConfigError: a tool cannot be turned into a spec.
    """
    specs = []
    for item in tools:
        try:
            spec = convert_to_openai_tool(item)
        except Exception as exc:  # noqa: BLE001 - langchain-core raises several types for a bad tool
            raise ConfigError(f"cannot use {item!r} as a tool: {exc}") from exc
        if spec.get("type") != "function" or not spec.get("function", {}).get("name"):
            raise ConfigError(f"only function tools are supported, got {spec.get('type')!r}")
        parameters = spec["function"].get("parameters") or {"type": "object", "properties": {}}
        if parameters.get("type", "object") != "object":
            raise ConfigError(f"tool {spec['function']['name']!r}: its parameters must be a JSON object schema")
        spec["function"]["parameters"] = parameters
        # A name given twice (e.g. a pydantic class and its JSON schema) is one tool: the first spelling counts.
        if all(s["function"]["name"] != spec["function"]["name"] for s in specs):
            specs.append(spec)
    return specs


def normalize_tool_choice(choice: Any, names: Sequence[str]) -> tuple[ChoiceMode, tuple[str, ...]]:
    """Reduce a ``tool_choice`` to a mode and the tools it allows.

    Accepts None/``"auto"``, ``"none"``, ``"any"``/``"required"``/True, a tool's name, and the OpenAI
    (``{"type": "function", "function": {"name": ...}}``) and Anthropic (``{"type": "tool", "name": ...}``) forms.

    Example:
        >>> normalize_tool_choice("any", ["a", "b"])
        ('forced', ('a', 'b'))
        >>> normalize_tool_choice({"type": "function", "function": {"name": "b"}}, ["a", "b"])
        ('forced', ('b',))

    Raises:
        ConfigError: an unknown tool name or spelling, or a forced choice with no tools.
    """
    if choice is None or choice == "auto" or choice is False:
        return "auto", tuple(names)
    if choice == "none":
        return "none", ()
    if choice in ("any", "required") or choice is True:
        if not names:
            raise ConfigError(f"tool_choice={choice!r} needs at least one tool")
        return "forced", tuple(names)
    name = None
    if isinstance(choice, str):
        name = choice
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if choice.get("type") == "any":
            return normalize_tool_choice("any", names)
    if not name:
        raise ConfigError(f"tool_choice must be 'auto', 'none', 'any', 'required' or a tool's name, got {choice!r}")
    if name not in names:
        raise ConfigError(f"tool_choice names tool {name!r}, which is not bound (tools: {', '.join(names) or 'none'})")
    return "forced", (name,)


@dataclass(frozen=True)
class ForcedCall:
    """A tool call the engine must emit, decoded against a JSON schema and read back into a `ToolCall`.

    With one eligible tool the engine decodes the arguments object itself (the tool's own schema); with several
    it decodes ``{"name": <one of them>, "arguments": <that tool's schema>}``.

    Example:
        >>> spec = {"type": "function", "function": {"name": "add", "description": "Add two integers.",
        ...         "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
        >>> call = ForcedCall((spec,))
        >>> call.parse('{"a": 2}')[0][0]["args"]
        {'a': 2}
    """

    specs: tuple[dict[str, Any], ...]

    @property
    def single(self) -> bool:
        """Whether exactly one tool is eligible (then only its arguments are decoded)."""
        return len(self.specs) == 1

    @property
    def names(self) -> tuple[str, ...]:
        """The eligible tools' names."""
        return tuple(s["function"]["name"] for s in self.specs)

    def schema(self) -> dict[str, Any]:
        """The JSON schema the engine decodes against."""
        if self.single:
            return _closed(self.specs[0]["function"]["parameters"])
        return {"anyOf": [
            {"type": "object",
             "properties": {"name": {"type": "string", "enum": [s["function"]["name"]]},
                            "arguments": _closed(s["function"]["parameters"])},
             "required": ["name", "arguments"], "additionalProperties": False}
            for s in self.specs
        ]}

    def response_format(self) -> dict[str, Any]:
        """vLLM's ``response_format`` for the call."""
        name = self.names[0] if self.single else "tool_call"
        return {"type": "json_schema", "json_schema": {"name": schema_name(name), "schema": self.schema(),
                                                       "strict": True}}

    def instruction(self) -> str:
        """The system instruction that tells the model which tool it is calling and what its arguments are."""
        if self.single:
            fn = self.specs[0]["function"]
            return (f"You are calling the tool `{fn['name']}`: {fn.get('description') or ''}\n"
                    "Reply with only its arguments, as one JSON object, taking every value from the conversation. "
                    f"Arguments:\n{_describe(fn['parameters'])}")
        tools = "\n".join(f"- `{s['function']['name']}`: {s['function'].get('description') or ''} Arguments:\n"
                          + _describe(s["function"]["parameters"], indent="    ") for s in self.specs)
        return ('Call one of these tools. Reply with only a JSON object {"name": <tool name>, "arguments": {...}}, '
                "taking every value from the conversation.\nTools:\n" + tools)

    def parse(self, text: str, call_id: str | None = None) -> tuple[list[ToolCall], list[InvalidToolCall]]:
        """The tool call in the engine's decoded `text` (an invalid call when it is incomplete)."""
        call_id = call_id or new_call_id()
        try:
            value = json.loads(text)
        except ValueError as exc:
            name = self.names[0] if self.single else None
            why = f"the arguments are not complete JSON ({exc}); raise max_tokens"
            return [], [invalid_tool_call(name=name, args=text, id=call_id, error=why)]
        if self.single:
            return [tool_call(name=self.names[0], args=value, id=call_id)], []
        return [tool_call(name=value["name"], args=value["arguments"], id=call_id)], []


def new_call_id() -> str:
    """A fresh tool-call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _describe(parameters: dict[str, Any], indent: str = "") -> str:
    """One line per argument: name, type, whether required, description."""
    required = set(parameters.get("required") or ())
    lines = []
    for name, prop in (parameters.get("properties") or {}).items():
        kind = prop.get("type") or json.dumps({k: v for k, v in prop.items() if k not in ("title", "description")},
                                              ensure_ascii=False)
        need = "required" if name in required else "optional"
        lines.append(f"{indent}- {name} ({kind}, {need}): {prop.get('description') or prop.get('title') or ''}")
    return "\n".join(lines) or f"{indent}(none: reply with {{}})"


def _closed(parameters: dict[str, Any]) -> dict[str, Any]:
    """The tool's parameter schema, with no properties beyond the declared ones unless it says otherwise."""
    out = dict(parameters)
    out.setdefault("type", "object")
    out.setdefault("properties", {})
    out.setdefault("additionalProperties", False)
    return out


def schema_name(name: str) -> str:
    """A ``json_schema`` name OpenAI-style servers accept: letters, digits, ``_`` and ``-``, at most 64."""
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:64]
    return cleaned or "output"
