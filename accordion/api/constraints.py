"""Each API dialect's output constraint, as one `Grammar`, compiled before the request runs.

- Ollama: `format: "json"` or `format: <JSON schema>` (generate and chat).
- OpenAI: `response_format` `{"type": "json_object"}` or `{"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}}`; a constraint is always enforced,
  so `strict` changes nothing.
- vLLM's extension: `structured_outputs: {json | regex | choice | grammar | json_object}`.

Compiling runs on the worker pool: the first constrained request of a model reads its
vocabulary into llguidance (up to ~1.5 s), which must not stall the HTTP thread. A
grammar the library cannot honour is a 400 naming the field, never a silent fallback.
"""

from __future__ import annotations

from typing import Any

from accordion.api.prompts import Prepared, in_worker
from accordion.errors import InvalidRequestError
from accordion.server.manager import Loaded
from accordion.structured import Grammar
from accordion.structured.grammar import ANY_OBJECT

STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def from_ollama(value: Any) -> Grammar | None:
    if value is None or value == "":
        return None
    if value == "json":
        return Grammar.json_schema(ANY_OBJECT, "format")
    if isinstance(value, dict):
        return Grammar.json_schema(value, "format")
    raise InvalidRequestError(f'format must be "json" or a JSON schema object, got {value!r}')


def from_response_format(value: dict[str, Any] | None) -> Grammar | None:
    if value is None:
        return None
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_schema(ANY_OBJECT, "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InvalidRequestError(
                "response_format.json_schema must be an object with a 'schema'"
            )
        return Grammar.json_schema(spec["schema"], "response_format.json_schema.schema")
    raise InvalidRequestError(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}"
    )


def from_structured_outputs(value: dict[str, Any] | None) -> Grammar | None:
    if value is None:
        return None
    given = [k for k in STRUCTURED_KINDS if value.get(k) not in (None, False)]
    unknown = sorted(set(value) - set(STRUCTURED_KINDS))
    if unknown:
        raise InvalidRequestError(f"structured_outputs does not support {', '.join(unknown)}")
    if len(given) != 1:
        raise InvalidRequestError(
            f"structured_outputs needs exactly one of {', '.join(STRUCTURED_KINDS)}"
        )
    kind = given[0]
    field, text = f"structured_outputs.{kind}", value[kind]
    if kind == "json_object":
        return Grammar.json_schema(ANY_OBJECT, field)
    if kind == "json":
        return Grammar.json_schema(text, field)
    if kind == "regex":
        return Grammar.regex(text, field)
    if kind == "choice":
        return Grammar.choice(text, field)
    return Grammar.lark(text, field)


def one_of(*grammars: tuple[str, Grammar | None]) -> Grammar | None:
    """The request's constraint; two fields that each constrain it are a 400."""
    given = [(name, g) for name, g in grammars if g is not None]
    if len(given) > 1:
        raise InvalidRequestError(
            f"{' and '.join(name for name, _ in given)} both constrain the output; send one"
        )
    return given[0][1] if given else None


async def constrain(loaded: Loaded, prepared: Prepared, grammar: Grammar | None) -> None:
    """Compile the grammar (a 400 if refused) and set it on the request's parameters."""
    if grammar is None:
        return
    await in_worker(loaded.engine.grammars.compile, grammar)
    prepared.options.params.grammar = grammar
