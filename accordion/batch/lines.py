"""Input lines: OpenAI Batch JSONL or the short form, streamed, each checked alone.

A full line is `{"custom_id", "method": "POST", "url", "body"}`; its body is checked
by the very models and rules the server's route applies, so a line that passes
here is one the route accepts. A short line is a chat body plus its `custom_id`:
`{"custom_id", "messages": [...]}`, or `"prompt": "..."` for a single user
message. The job's defaults fill what a line leaves out: the model, sampling
fields, `truncate: false` (a batch never shortens a prompt unless asked), and
for short lines the system message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from accordion.errors import InvalidRequestError

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
URLS = (CHAT, COMPLETIONS, EMBEDDINGS)
FULL_KEYS = {"custom_id", "method", "url", "body"}
MAX_ID = 512  # characters of a custom_id


class BadLine(ValueError):
    """A line that cannot run; `custom_id` is its id when it has a usable one."""

    def __init__(self, number: int, message: str, custom_id: str | None = None) -> None:
        super().__init__(f"line {number}: {message}")
        self.number, self.reason, self.custom_id = number, message, custom_id


@dataclass
class Defaults:
    """What the job's flags give every line that does not say otherwise."""

    model: str | None = None
    system: str | None = None  # prepended to short lines as their system message
    sampling: dict[str, Any] = field(default_factory=dict)  # body fields: temperature, ...
    truncate: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "system": self.system,
            "sampling": self.sampling,
            "truncate": self.truncate,
        }


@dataclass
class Line:
    number: int  # 1-based, counting every line of the file
    custom_id: str
    url: str
    body: dict[str, Any]


def read(path: Path, digest: Any = None) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for every non-blank line, read as a stream; every byte,
    blank lines too, goes to `digest` when one is given."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if digest is not None:
                digest.update(raw)
            if raw.strip():
                yield number, raw


def parse(number: int, raw: bytes, defaults: Defaults) -> Line:
    """The line as a request the route accepts, or BadLine saying why not."""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadLine(number, f"invalid JSON: {getattr(e, 'msg', e)}") from None
    except RecursionError:
        raise BadLine(number, "invalid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise BadLine(number, "a line must be a JSON object")
    custom_id = doc.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadLine(number, "custom_id must be a non-empty string")
    if len(custom_id) > MAX_ID:
        raise BadLine(number, f"custom_id is longer than {MAX_ID} characters")
    try:
        url, body = _full(doc) if "body" in doc or "url" in doc else _short(doc, defaults)
        body = _with_defaults(url, body, defaults)
        check(url, body)
    except (InvalidRequestError, ValidationError) as e:
        raise BadLine(number, _message(e), custom_id) from None
    return Line(number, custom_id, url, body)


def _full(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    extra = sorted(set(doc) - FULL_KEYS)
    if extra:
        raise InvalidRequestError(f"unknown keys {extra} beside custom_id, method, url and body")
    if doc.get("method", "POST") != "POST":
        raise InvalidRequestError(f"method must be POST, got {doc.get('method')!r}")
    url = doc.get("url")
    if url not in URLS:
        raise InvalidRequestError(f"url must be one of {', '.join(URLS)}, got {url!r}")
    if not isinstance(doc.get("body"), dict):
        raise InvalidRequestError("body must be a JSON object")
    return url, dict(doc["body"])


def _short(doc: dict[str, Any], defaults: Defaults) -> tuple[str, dict[str, Any]]:
    body = {k: v for k, v in doc.items() if k != "custom_id"}
    if ("messages" in body) == ("prompt" in body):
        raise InvalidRequestError("a short line has exactly one of messages or prompt")
    if "prompt" in body:
        prompt = body.pop("prompt")
        if not isinstance(prompt, str):
            raise InvalidRequestError("prompt must be a string")
        body["messages"] = [{"role": "user", "content": prompt}]
    messages = body["messages"]
    if not isinstance(messages, list):
        raise InvalidRequestError("messages must be a list")
    has_system = any(isinstance(m, dict) and m.get("role") == "system" for m in messages)
    if defaults.system is not None and not has_system:
        body["messages"] = [{"role": "system", "content": defaults.system}, *messages]
    return CHAT, body


def _with_defaults(url: str, body: dict[str, Any], defaults: Defaults) -> dict[str, Any]:
    if defaults.model is not None:
        body.setdefault("model", defaults.model)
    if url != EMBEDDINGS:  # sampling means nothing to an embedding
        for key, value in defaults.sampling.items():
            body.setdefault(key, value)
        body.setdefault("truncate", defaults.truncate)
    return body


def check(url: str, body: dict[str, Any]) -> None:
    """Everything the route checks before it loads a model, without loading one."""
    # the route's own models, imported here: they bring the server and torch, which
    # `batch status`, `list` and `cancel` (reads and writes of the job store) do without
    from accordion.api import openai_bodies

    if "model" not in body:
        raise InvalidRequestError("no model: give the body a model or the job --model")
    bodies = {
        CHAT: openai_bodies.ChatBody,
        COMPLETIONS: openai_bodies.CompletionBody,
        EMBEDDINGS: openai_bodies.EmbeddingsBody,
    }
    parsed = bodies[url].model_validate(body)
    if url == EMBEDDINGS:
        assert isinstance(parsed, openai_bodies.EmbeddingsBody)
        openai_bodies.embedding_texts(parsed.input)
        if parsed.encoding_format not in ("float", "base64"):
            raise InvalidRequestError("encoding_format must be 'float' or 'base64'")
        return
    assert isinstance(parsed, openai_bodies.ChatBody | openai_bodies.CompletionBody)
    if parsed.stream:
        raise InvalidRequestError("stream is not supported in a batch: each result is one body")
    openai_bodies.check_unsupported(parsed)
    openai_bodies.request_grammar(parsed)
    if isinstance(parsed, openai_bodies.ChatBody):
        openai_bodies.chat_messages(parsed.messages)
    else:
        openai_bodies.completion_prompt(parsed.prompt)


def _message(error: Exception) -> str:
    if isinstance(error, ValidationError):  # the words the route's 400 would use
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"body.{where}: {first.get('msg', 'invalid value')}" if where else "invalid body"
    return str(error)
