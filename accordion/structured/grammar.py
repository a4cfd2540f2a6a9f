"""What a request constrains its output to: a JSON schema, a regex, a choice, a grammar.

A `Grammar` is plain data (a kind and its text), hashable, so it can ride in
SamplingParams and key the compiled-grammar cache. Each API dialect's field
(`format`, `response_format`, `structured_outputs`) becomes one of these; the
`field` names that field, so that an error about the grammar names what the
client sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance

from accordion.errors import InvalidRequestError

KINDS = ("json_schema", "regex", "choice", "lark")

# Between JSON tokens: nothing, one space, or a newline and an indent of up to 16 (llama.cpp's
# schema grammars allow 20). Unbounded whitespace lets a small model emit
# blanks until max_tokens; this still admits compact and pretty-printed JSON.
WHITESPACE = r"(?:\x20|\n[\x20\t]{0,16})?"
ANY_OBJECT = {"type": "object"}


class GrammarError(InvalidRequestError):
    """A grammar the library cannot honour: invalid, unsatisfiable or unimplemented."""


@dataclass(frozen=True)
class Grammar:
    kind: str  # one of KINDS
    text: str  # the schema as JSON text, the regex, the choices as JSON, the Lark text
    field: str = "format"  # the request field it came from, for error messages

    @classmethod
    def json_schema(cls, schema: Any, field: str) -> Grammar:
        if isinstance(schema, str):  # vLLM and some clients send the schema as JSON text
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"{field} is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise GrammarError(f"{field} must be a JSON schema (an object)")
        return cls("json_schema", json.dumps(schema), field)  # key order is output order

    @classmethod
    def regex(cls, pattern: Any, field: str) -> Grammar:
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError(f"{field} must be a non-empty regular expression")
        return cls("regex", pattern, field)

    @classmethod
    def choice(cls, options: Any, field: str) -> Grammar:
        if (
            not isinstance(options, list)
            or not options
            or not all(isinstance(o, str) and o for o in options)
        ):
            raise GrammarError(f"{field} must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(options), field)

    @classmethod
    def lark(cls, text: Any, field: str) -> Grammar:
        if not isinstance(text, str) or not text.strip():
            raise GrammarError(f"{field} must be a non-empty grammar (Lark or GBNF)")
        return cls("lark", text, field)

    def to_llguidance(self) -> str:
        """The grammar in llguidance's serialized form (its own format checks come later)."""
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(
                self.text, defaults={"whitespace_pattern": WHITESPACE}
            )
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.text)
        if self.kind == "choice":
            return llguidance.grammar_from("choice", self.text)
        return llguidance.grammar_from("grammar", self.text)  # Lark, or GBNF when it has ::=
