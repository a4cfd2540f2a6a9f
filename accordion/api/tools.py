"""A request's tools: checked, rendered by the template, forced by `tool_choice`, parsed.

`tool_choice` (OpenAI): "auto" (the default with tools) renders the tools and parses
calls from what the model writes; "none" neither renders nor parses them; "required"
and a named function (`{"type": "function", "function": {"name": ...}}`) also force
the output, by grammar, to be calls in the template's format. `parallel_tool_calls:
false` allows one call. Ollama's API has no tool_choice: its tools are "auto".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from accordion.errors import InvalidRequestError
from accordion.server.manager import Loaded
from accordion.structured import Grammar
from accordion.structured.tools import ToolCall, ToolParser, call_grammar, tool_format

CHOICES = ("auto", "none", "required")


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]] | None  # what the template renders
    fmt: str = "json"
    grammar: Grammar | None = None

    def parser(self) -> ToolParser | None:
        if not self.tools:
            return None
        return ToolParser(self.fmt, [t["function"]["name"] for t in self.tools])


def check_tools(tools: list[dict[str, Any]] | None) -> None:
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            raise InvalidRequestError(f"tools[{i}] must be {{'type': 'function', 'function': ...}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequestError(f"tools[{i}].function.name must be a non-empty string")
        if not isinstance(fn.get("parameters", {}), dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema")


def forced_name(tool_choice: Any, tools: list[dict[str, Any]] | None) -> str | None:
    """The function a named tool_choice asks for (checked against the tools)."""
    if tool_choice is None or tool_choice in CHOICES:
        if tool_choice == "required" and not tools:
            raise InvalidRequestError("tool_choice 'required' needs tools")
        return None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequestError(
            "tool_choice must be 'auto', 'none', 'required' or"
            " {'type': 'function', 'function': {'name': ...}}"
        )
    names = [t["function"]["name"] for t in tools or []]
    if fn["name"] not in names:
        raise InvalidRequestError(f"tool_choice names {fn['name']!r}, which is not in tools")
    return fn["name"]


def plan(
    loaded: Loaded,
    model: str,
    tools: list[dict[str, Any]] | None,
    tool_choice: Any = None,
    parallel: bool | None = None,
) -> ToolPlan:
    check_tools(tools)
    name = forced_name(tool_choice, tools)
    if not tools or tool_choice == "none":
        return ToolPlan(None)
    template = loaded.model.template
    if not template.supports_tools:
        raise InvalidRequestError(f"model '{model}' does not support tools")
    fmt = tool_format(template.source)
    forced = tool_choice == "required" or name is not None
    grammar = (
        call_grammar(fmt, tools, name, parallel is not False, "tool_choice") if forced else None
    )
    return ToolPlan(tools, fmt, grammar)


def openai_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
        }
        for c in calls
    ]


def ollama_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
