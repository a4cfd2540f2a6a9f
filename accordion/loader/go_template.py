"""Ollama's template language: the subset of Go's text/template its Modelfiles use.

Actions `{{ ... }}` with trim markers `{{-` / `-}}` and comments `{{/* */}}`; pipelines
(`a | f b`); fields (`.Messages`, `.Function.Name`, `$.Tools`), variables (`$x := ...`,
`$i, $m := range ...`, `$x = ...`), literals, parenthesized pipelines; `if / else if /
else`, `range` (with `else`, `break`, `continue`), `with`; the functions `and or not
eq ne lt le gt ge len index slice print printf println json toJson`.

Values are the API's own JSON shapes (`{"role": ..., "tool_calls": [...]}`), and a
field is looked up as written, then in snake_case, then in lower case, so `.ToolCalls`
finds `tool_calls` and `.Function.Name` finds `name`, while `json` writes the API's
keys. Truth is Go's: false, 0, "", nil and empty lists or maps are false. Printing a
map or list writes JSON, as Ollama's argument types print themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from accordion.errors import InvalidRequestError, TemplateError
from accordion.loader.go_values import bind, eval_pipe, show, truth

GO_ACTION = re.compile(r"\{\{-?\s*(?:\.|\$|range\b|if\b|with\b|end\b|/\*)")
_TOKEN = re.compile(
    r"""\s*(?:
    (?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`) |
    (?P<num>-?\d+(?:\.\d+)?) |
    (?P<var>\$[A-Za-z0-9_]*) |
    (?P<field>(?:\.[A-Za-z0-9_]+)+|\.) |
    (?P<op>:=|=|\||\(|\)|,) |
    (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.X,
)
_CHAIN = re.compile(r"(\.[A-Za-z0-9_]+)+")


def is_go_template(source: str) -> bool:
    """Ollama's syntax, not Jinja's: `{{ .Field }}`, `{{ range ... }}`, and no `{% %}`."""
    return "{%" not in source and GO_ACTION.search(source) is not None


@dataclass
class Node:
    kind: str  # text, out, if, range, with, set, break, continue
    text: str = ""
    pipe: list = field(default_factory=list)  # commands: lists of operands
    names: list[str] = field(default_factory=list)  # declared variables
    declare: bool = True  # := (a new variable) or = (assign)
    body: list[Node] = field(default_factory=list)
    orelse: list[Node] = field(default_factory=list)


class _Stop(Exception):
    def __init__(self, kind: str) -> None:
        self.kind = kind


class GoTemplate:
    def __init__(self, source: str) -> None:
        self.source = source
        try:
            nodes, _ = self._parse(_actions(source), 0, ())
        except (ValueError, IndexError) as e:
            raise TemplateError(f"template does not parse: {e}") from None
        self.nodes = nodes

    def execute(self, data: dict[str, Any], limit: int) -> str:
        out = _Out(limit)
        scope = [{"$": data}]
        try:
            self._run(self.nodes, data, scope, out, limit)
        except _Stop as e:
            raise TemplateError(f"template: {{{{ {e.kind} }}}} outside range") from None
        except InvalidRequestError:
            raise
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise TemplateError(f"template failed to render: {e}") from None
        return "".join(out)

    # -- parsing --------------------------------------------------------------------
    def _parse(self, items: list[tuple[str, str]], i: int, stops: tuple[str, ...]):
        nodes: list[Node] = []
        while i < len(items):
            kind, text = items[i]
            if kind == "text":
                nodes.append(Node("text", text))
                i += 1
                continue
            words = text.split(None, 1)
            head = words[0] if words else ""
            rest = words[1] if len(words) > 1 else ""
            if head in stops:
                return nodes, i
            if head in ("if", "with", "range"):
                node = self._block(head, rest)
                node.body, i = self._parse(items, i + 1, ("else", "end"))
                i = self._tail(items, i, node)
                nodes.append(node)
            elif head in ("break", "continue"):
                nodes.append(Node(head))
                i += 1
            elif head in ("template", "define", "block"):
                raise ValueError(f"{{{{ {head} }}}} is not supported")
            else:
                nodes.append(self._block("out", text))
                i += 1
        if stops:
            raise ValueError(f"missing {{{{ end }}}} (open {stops})")
        return nodes, i

    def _tail(self, items: list[tuple[str, str]], i: int, node: Node) -> int:
        """After a block's body: `else`, `else if ...` (a nested if), then `end`."""
        head = items[i][1].split(None, 1)
        if head[0] == "end":
            return i + 1
        rest = head[1] if len(head) > 1 else ""
        if rest.startswith(("if ", "with ")):
            inner = self._block(rest.split()[0], rest.split(None, 1)[1])
            inner.body, i = self._parse(items, i + 1, ("else", "end"))
            node.orelse = [inner]
            return self._tail(items, i, inner)
        node.orelse, i = self._parse(items, i + 1, ("end",))
        return i + 1

    def _block(self, kind: str, text: str) -> Node:
        tokens = _tokens(text)
        names: list[str] = []
        declare = True
        if ":=" in [t for _, t in tokens] or (
            len(tokens) > 1 and tokens[1] == ("op", "=") and tokens[0][0] == "var"
        ):
            split = next(k for k, (_, t) in enumerate(tokens) if t in (":=", "="))
            declare = tokens[split][1] == ":="
            names = [t for kind_, t in tokens[:split] if kind_ == "var"]
            tokens = tokens[split + 1 :]
            if kind == "out":
                kind = "set"
        pipe, _ = _pipeline(tokens, 0)
        return Node(kind, pipe=pipe, names=names, declare=declare)

    # -- running --------------------------------------------------------------------
    def _run(self, nodes: list[Node], dot: Any, scope: list[dict], out: list[str], limit: int):
        for node in nodes:
            if node.kind == "text":
                out.append(node.text)
            elif node.kind == "out":
                out.append(show(eval_pipe(node.pipe, dot, scope)))
            elif node.kind == "set":
                value = eval_pipe(node.pipe, dot, scope)
                bind(scope, node.names[0], value, node.declare)
            elif node.kind in ("break", "continue"):
                raise _Stop(node.kind)
            elif node.kind == "if":
                taken = truth(eval_pipe(node.pipe, dot, scope))
                self._run(node.body if taken else node.orelse, dot, [*scope, {}], out, limit)
            elif node.kind == "with":
                value = eval_pipe(node.pipe, dot, scope)
                if truth(value):
                    self._run(node.body, value, [*scope, {}], out, limit)
                else:
                    self._run(node.orelse, dot, [*scope, {}], out, limit)
            elif node.kind == "range":
                self._range(node, dot, scope, out, limit)

    def _range(self, node: Node, dot: Any, scope: list[dict], out: list[str], limit: int):
        value = eval_pipe(node.pipe, dot, scope)
        pairs = sorted(value.items()) if isinstance(value, dict) else list(enumerate(value or []))
        if not pairs:
            self._run(node.orelse, dot, [*scope, {}], out, limit)
            return
        for key, item in pairs:
            inner: dict[str, Any] = {}
            if len(node.names) == 1:
                inner[node.names[0]] = item
            elif len(node.names) == 2:
                inner[node.names[0]], inner[node.names[1]] = key, item
            try:
                self._run(node.body, item, [*scope, inner], out, limit)
            except _Stop as stop:
                if stop.kind == "break":
                    break


class _Out(list):
    """The output pieces, bounded: a template looping over 100,000 messages stops at
    `limit` characters instead of filling memory."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.size, self.limit = 0, limit

    def append(self, piece: str) -> None:
        self.size += len(piece)
        if self.size > self.limit:
            raise InvalidRequestError(f"the rendered prompt is over {self.limit} characters")
        super().append(piece)


def _actions(source: str) -> list[tuple[str, str]]:
    """The source as ("text", s) and ("action", inside) items, trim markers applied."""
    items: list[tuple[str, str]] = []
    pos = 0
    while True:
        start = source.find("{{", pos)
        if start < 0:
            items.append(("text", source[pos:]))
            return [i for i in items if i != ("text", "")]
        end = source.find("}}", start)
        if end < 0:
            raise ValueError("unclosed action {{")
        inner = source[start + 2 : end]
        text = source[pos:start]
        if inner.startswith("- "):
            text, inner = text.rstrip(), inner[2:]
        elif inner.startswith("-") and inner[1:2] in ("\n", "\t", "\r"):
            text, inner = text.rstrip(), inner[1:]
        trim_after = inner.endswith(" -") or inner.endswith("\n-")
        if trim_after:
            inner = inner[:-2]
        items.append(("text", text))
        pos = end + 2
        if trim_after:
            rest = source[pos:]
            pos += len(rest) - len(rest.lstrip())
        inner = inner.strip()
        if not (inner.startswith("/*") and inner.endswith("*/")):
            items.append(("action", inner))


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot read {text[pos:]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _pipeline(tokens: list[tuple[str, str]], i: int) -> tuple[list, int]:
    """Commands separated by `|`, up to a `)` or the end."""
    commands, current = [], []
    while i < len(tokens):
        kind, text = tokens[i]
        if text == ")":
            break
        if text == "|":
            commands.append(current)
            current = []
        elif text == "(":
            inner, i = _pipeline(tokens, i + 1)
            current.append(("pipe", inner))
        elif kind == "var" and i + 1 < len(tokens) and tokens[i + 1][0] == "field":
            current.append(("var", text + tokens[i + 1][1]))
            i += 1
        else:
            current.append((kind, text))
        i += 1
    commands.append(current)
    return commands, i
