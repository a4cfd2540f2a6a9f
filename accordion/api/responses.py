"""OpenAI's Responses API (/v1/responses), on the same engine as chat completions.

A request becomes a chat: `instructions` the system message, the stored conversation of
`previous_response_id` (its input and output), then `input` (text, or items: messages,
`function_call`s and `function_call_output`s). Its fields map onto the chat body, so
every check, sampling option, tool and structured-output rule is the chat route's own:
`max_output_tokens` -> `max_completion_tokens`, `text.format` -> `response_format`,
flat function tools -> chat tools. The answer is a `response` object, or with `stream`
the Responses event sequence (created, output items and their deltas, completed).
Responses are kept (unless `store: false`) in memory, the newest 1,000, for
`previous_response_id` and `GET /v1/responses/{id}`; a restart forgets them.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from accordion.api import service
from accordion.api.app import streamed
from accordion.api.openai import prepare_chat_body
from accordion.api.openai_bodies import ChatBody, Count, Flag
from accordion.api.responses_items import Output, chat_input, chat_tools
from accordion.engine.request import Event, RequestOutput
from accordion.errors import InvalidRequestError

router = APIRouter()
KEPT = 1000  # stored responses, newest first out last


class ResponsesBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # sampling extras ride along, as on chat
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    stream: Flag = False
    store: Flag = True
    max_output_tokens: Count | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


def kept(request: Request) -> OrderedDict[str, dict[str, Any]]:
    state = request.app.state
    if not hasattr(state, "responses"):
        state.responses = OrderedDict()
    return state.responses


def as_chat(body: ResponsesBody, conversation: list[dict[str, Any]]) -> ChatBody:
    """The chat body of a request whose conversation (history and input) is given."""
    if body.reasoning:
        raise InvalidRequestError("reasoning is not supported: these models do not reason")
    fmt = (body.text or {}).get("format")
    chat: dict[str, Any] = {
        k: v
        for k, v in (body.model_extra or {}).items()
        if k not in ("truncation", "user", "service_tier", "include", "top_logprobs")
    }
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    chat |= {
        "model": body.model,
        "messages": [*messages, *conversation],
        "max_completion_tokens": body.max_output_tokens,
        "tools": chat_tools(body.tools),
        "tool_choice": _chat_tool_choice(body.tool_choice),
        "response_format": _chat_format(fmt),
    }
    return ChatBody.model_validate({k: v for k, v in chat.items() if v is not None})


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _chat_format(fmt: Any) -> dict[str, Any] | None:
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return fmt
    spec = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
    return {"type": "json_schema", "json_schema": spec}


@router.post("/v1/responses", responses=streamed("text/event-stream"))
async def create_response(body: ResponsesBody, request: Request) -> Any:
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = kept(request).get(body.previous_response_id)
        if previous is None:
            raise InvalidRequestError(
                f"previous_response_id {body.previous_response_id!r} is not stored here"
            )
        history = previous["_messages"]
    conversation = [*history, *chat_input(body.input)]  # instructions are not carried over
    chat = as_chat(body, conversation)
    loaded, prepared, plan = await prepare_chat_body(request, chat, "text.format")
    output = Output(plan.parser())
    head = {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": int(time.time()),
        "model": body.model,
        "instructions": body.instructions,
        "previous_response_id": body.previous_response_id,
        "metadata": body.metadata or {},
        "tools": body.tools or [],
        "tool_choice": body.tool_choice or "auto",
        "parallel_tool_calls": chat.parallel_tool_calls is not False,
        "temperature": chat.temperature,
        "top_p": chat.top_p,
        "max_output_tokens": body.max_output_tokens,
        "text": body.text or {"format": {"type": "text"}},
        "store": body.store,
        "error": None,
    }

    def finish(out: RequestOutput) -> dict[str, Any]:
        doc = {**head, **output.final(out)}
        if body.store:
            store = kept(request)
            store[doc["id"]] = {**doc, "_messages": [*conversation, *output.as_messages()]}
            while len(store) > KEPT:
                store.popitem(last=False)
        return doc

    if not body.stream:
        out = await service.complete(request, loaded, prepared)
        service.raise_for(out)
        output.feed(out.text, done=True)
        return JSONResponse(finish(out))

    events = service.start(request, loaded, prepared).events()

    async def stream() -> AsyncIterator[bytes]:
        yield output.event("response.created", response={**head, **output.pending()})
        yield output.event("response.in_progress", response={**head, **output.pending()})
        async for item in events:
            if isinstance(item, Event):
                for line in output.feed(item.text):
                    yield line
                continue
            if item.error is not None and item.finish_reason == "error":
                error = {"code": "server_error", "message": str(item.error)}
                yield output.event("error", **error)
                return
            for line in output.feed("", done=True):
                yield line
            yield output.event("response.completed", response=finish(item))

    return StreamingResponse(stream(), media_type="text/event-stream")


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if not k.startswith("_")}


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> dict[str, Any]:
    doc = kept(request).get(response_id)
    if doc is None:
        raise HTTPException(404, f"response {response_id!r} not found")
    return _public(doc)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    if kept(request).pop(response_id, None) is None:
        raise HTTPException(404, f"response {response_id!r} not found")
    return {"id": response_id, "object": "response.deleted", "deleted": True}
