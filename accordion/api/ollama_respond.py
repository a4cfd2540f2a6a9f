"""Ollama's generation answers: one JSON object, or NDJSON chunks and a final object
with the request's statistics, logprobs, tool calls and (generate) context."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from accordion.api import logprobs, prompts, service
from accordion.api.tools import ollama_calls
from accordion.engine.request import Event, RequestOutput
from accordion.engine.sequence import Logprob
from accordion.server.manager import Loaded
from accordion.structured.tools import ToolCall, ToolParser

NDJSON = "application/x-ndjson"


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def stats(out: RequestOutput, load_s: float, start: float) -> dict[str, Any]:
    t = out.timings
    doc: dict[str, Any] = {
        "done_reason": out.finish_reason if out.finish_reason in ("stop", "length") else "stop",
        "total_duration": int((time.perf_counter() - start) * 1e9),
        "load_duration": int(load_s * 1e9),
        "prompt_eval_count": max(1, out.prompt_tokens - out.cached_tokens),
        "prompt_eval_duration": int(t.get("prefill", 0) * 1e9),
        "eval_count": len(out.token_ids),
        "eval_duration": int(t.get("decode", 0) * 1e9),
        "prompt_cache_count": out.cached_tokens,
    }
    return doc


async def respond(
    request: Request,
    body: Any,  # the route's body: its model and stream fields
    loaded: Loaded,
    load_s: float,
    prepared: prompts.Prepared,
    piece: Any,
    start: float,
    parser: ToolParser | None = None,
    context: bool = False,
) -> Any:
    """Stream NDJSON chunks (or one object); `piece(text)` shapes a chunk's payload.
    With a tool parser (chat with tools), text inside a call is held back and each call
    comes whole in a chunk of its own, as `message.tool_calls`."""
    head = {"model": body.model}

    tokenizer = loaded.model.tokenizer
    asked = prepared.options.params.logprobs is not None
    pending: list[Logprob] = []  # logprobs of tokens whose text is not sent yet

    def with_logprobs(doc: dict[str, Any], entries: list[Logprob]) -> dict[str, Any]:
        if asked:
            doc["logprobs"] = logprobs.entries(tokenizer, entries)
        return doc

    def final(out: RequestOutput, text: str, entries: list[Logprob]) -> dict[str, Any]:
        doc = {
            **head,
            "created_at": now(),
            **piece(text),
            "done": True,
            **stats(out, load_s, start),
        }
        if prepared.truncated:
            doc["truncated"] = prepared.truncated
        if context:  # the conversation's ids, for the next request's `context`
            doc["context"] = prepared.ids + out.token_ids
        return with_logprobs(doc, entries)

    def with_calls(doc: dict[str, Any], calls: list[ToolCall]) -> dict[str, Any]:
        if calls:
            doc["message"]["tool_calls"] = ollama_calls(calls)
        return doc

    if not body.stream:
        out = await service.complete(request, loaded, prepared)
        service.raise_for(out)
        if parser is None:
            return JSONResponse(final(out, out.text, out.logprobs))
        content, calls = parser.parse(out.text)
        return JSONResponse(with_calls(final(out, content, out.logprobs), calls))

    def chunks(text: str, calls: list[ToolCall]) -> Iterator[bytes]:
        pieces = [(text, [])] if text else []
        pieces += [("", [call]) for call in calls]  # each call whole, in a chunk of its own
        for content, called in pieces:
            chunk = {**head, "created_at": now(), **piece(content), "done": False}
            doc = with_calls(with_logprobs(chunk, pending), called)
            pending.clear()
            yield (json.dumps(doc) + "\n").encode()

    running = service.start(request, loaded, prepared)  # a full queue: 503, not an empty 200

    async def lines() -> AsyncIterator[bytes]:
        seen = 0  # the engine may be tokens ahead of this loop: count, don't measure
        async for item in running.events():
            if isinstance(item, Event):
                if item.token_id is not None:
                    if asked:
                        pending.append(item.seq.logprobs[seen])
                    seen += 1
                if item.text:
                    text, calls = parser.feed(item.text) if parser else (item.text, [])
                    for line in chunks(text, calls):
                        yield line
            elif item.error is not None and item.finish_reason == "error":
                yield (json.dumps({"error": str(item.error)}) + "\n").encode()
            else:
                for line in chunks(*parser.finish()) if parser else ():
                    yield line
                yield (json.dumps(final(item, "", pending)) + "\n").encode()

    return StreamingResponse(lines(), media_type=NDJSON)
