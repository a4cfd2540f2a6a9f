"""Tool calls in a model's output: which format its template speaks, parsing, forcing.

The format comes from the chat template's own text:

- `hermes` (Qwen 2.5/3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- `mistral`: `[TOOL_CALLS]` then a JSON list of calls;
- `llama3`: a JSON object `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`;
- `json`: any other template that takes tools, whose calls are JSON as llama3's.

In every format an output that is, as a whole, a JSON call (or list of calls) naming
one of the request's tools is a call too: small models often skip the tags. Parsing
streams: text that might still become a call is held back, never shown and then taken
back, and text that turns out not to be a call is released as content, never lost.

`call_grammar` writes a grammar that admits only calls in the template's format, for
`tool_choice` "required" or a named function, so that even a tiny model calls validly.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from accordion.structured.grammar import WHITESPACE, Grammar

MAX_PARALLEL = 8  # calls one forced output may hold: a forced output must end
TAGS = {  # format -> (opening tag, closing tag or "" for "to the end")
    "hermes": ("<tool_call>", "</tool_call>"),
    "mistral": ("[TOOL_CALLS]", ""),
    "llama3": ("<|python_tag|>", ""),
    "json": ("", ""),
}


def tool_format(template_source: str) -> str:
    if "<tool_call>" in template_source:
        return "hermes"
    if "[TOOL_CALLS]" in template_source:
        return "mistral"
    if "<|python_tag|>" in template_source or "ipython" in template_source:
        return "llama3"
    return "json"


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def tool_names(tools: list[dict[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def calls_in(text: str, names: set[str] | None = None) -> list[ToolCall] | None:
    """The calls a JSON text holds (one object or a list), or None if it holds none.
    With `names`, every call must name one of them."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = doc if isinstance(doc, list) else [doc]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as JSON text
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict) or (names is not None and item["name"] not in names):
            return None
        calls.append(ToolCall(item["name"], args))
    return calls or None


class ToolParser:
    """Feed output text as it comes; get back content to show now and finished calls."""

    def __init__(self, fmt: str, names: list[str]) -> None:
        self.open, self.close = TAGS[fmt]
        self.names = set(names)
        self.buffer = ""  # text not yet released or parsed
        self.inside = False  # after an opening tag
        self.started = False  # some content has been released: no whole-output call now

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        content, calls = "", []
        while True:
            if self.inside:
                if not self.close or self.close not in self.buffer:
                    break  # a call runs to its closing tag, or to the end
                body, self.buffer = self.buffer.split(self.close, 1)
                self.inside = False
                found = calls_in(body.strip())
                if found is None:  # not a call after all: it is content
                    content += self.open + body + self.close
                calls += found or []
                continue
            if self.open and self.open in self.buffer:
                before, self.buffer = self.buffer.split(self.open, 1)
                content += before
                self.inside, self.started = True, True
                continue
            if not self.started and self._may_be_whole_call():
                break  # held until the end decides
            keep = _partial_suffix(self.buffer, self.open)
            released = self.buffer[: len(self.buffer) - keep]
            self.buffer = self.buffer[len(released) :]
            content += released
            self.started = self.started or bool(released.strip())
            break
        return content, calls

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """A whole output at once: its content and its calls."""
        content, calls = self.feed(text)
        rest, more = self.finish()
        return content + rest, calls + more

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the output: what was held is a call or content."""
        text, self.buffer = self.buffer, ""
        if self.inside:
            found = calls_in(text.strip())  # a call left open (no closing tag)
            if found is not None:
                return "", found
            return self.open + text, []
        if not self.started:
            found = calls_in(text.strip(), self.names)
            if found is not None:
                return "", found
        return text, []

    def _may_be_whole_call(self) -> bool:
        head = self.buffer.lstrip()
        return not head or head[0] in "{["


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (it may still complete)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def call_grammar(
    fmt: str, tools: list[dict[str, Any]], name: str | None, parallel: bool, field: str
) -> Grammar:
    """A grammar admitting only calls in `fmt`: of the named tool, or of any (required)."""
    chosen = [_call_schema(t) for t in tools if name in (None, t["function"]["name"])]
    one = chosen[0] if len(chosen) == 1 else {"anyOf": chosen}
    most = MAX_PARALLEL if parallel and name is None else 1
    listed = {"type": "array", "items": one, "minItems": 1, "maxItems": most}
    if fmt == "hermes":
        call = f'"<tool_call>\\n" {_json(one)} "\\n</tool_call>"'
        more = f' ("\\n" call){{0,{most - 1}}}' if most > 1 else ""
        rule = f"start: call{more}\ncall: {call}"
    elif fmt == "mistral":
        rule = f'start: "[TOOL_CALLS]" {_json(listed)}'
    else:
        rule = f"start: {_json(listed if most > 1 else one)}"
    return Grammar.lark(rule, field)


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": {"whitespace_pattern": WHITESPACE}})
