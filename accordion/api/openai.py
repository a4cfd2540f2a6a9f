"""OpenAI-compatible routes under /v1: chat completions, completions, embeddings, models.

Requests map onto the same service layer as the Ollama routes: OpenAI's sampling
fields become Ollama options, so a model's Modelfile parameters still apply
underneath, and accordion's own knobs (num_ctx, truncate, top_k, min_p,
repeat_penalty, options) ride along in the body (the client's `extra_body`).
Errors are OpenAI error objects (see app.error_response); a stream that fails
after it started reports the error as one SSE data line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from accordion.api import choices, constraints, prompts, service, tools
from accordion.api.app import status_of, streamed
from accordion.api.guard import request_id
from accordion.api.openai_bodies import (
    ChatBody,
    CompletionBody,
    EmbeddingsBody,
    GenerationBody,
    chat_messages,
    check_unsupported,
    completion_prompt,
    embedding_texts,
    ollama_options,
    refine,
    request_grammar,
    shape_of,
)
from accordion.engine.request import Event, RequestOutput
from accordion.errors import InvalidRequestError
from accordion.server.manager import Loaded
from accordion.server.store import ModelEntry

router = APIRouter()

STREAMED = streamed("text/event-stream")


async def load(request: Request, model: str) -> Loaded:
    loaded, _ = await service.manager_of(request).get(model)
    return loaded


def sse(doc: dict[str, Any] | str) -> bytes:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc)}\n\n".encode()


async def prime(
    stream: AsyncIterator[tuple[int, Event | RequestOutput]],
) -> list[tuple[int, Event | RequestOutput]]:
    """Read up to the first text (or an end) so that early failures are still HTTP errors."""
    buffered: list[tuple[int, Event | RequestOutput]] = []
    try:
        async for index, item in stream:
            buffered.append((index, item))
            if isinstance(item, RequestOutput):
                service.raise_for(item)
                break
            if item.text:
                break
    except BaseException:
        await stream.aclose()  # type: ignore[attr-defined]
        raise
    return buffered


def error_event(error: Exception) -> bytes:
    # The 200 and its headers are gone: the error travels in-band, which the official
    # clients raise as an APIError.
    status = status_of(error)
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return sse({"error": {"message": str(error), "type": kind, "param": None, "code": None}})


async def respond(
    request: Request,
    body: GenerationBody,
    loaded: Loaded,
    prepared: prompts.Prepared,
    shape: choices.Shape,
) -> Any:
    chat = shape.chat
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.model,
    }
    extra = {"truncated": prepared.truncated} if prepared.truncated else {}
    if shape.echo and shape.top is not None:
        shape.echo_logprobs = await choices.echo_rows(request, loaded, prepared, shape.top)
    each = [choices.choice_prepared(prepared, i) for i in range(shape.n)]
    fmt = choices.Formatter(loaded, shape)

    if not body.stream:
        outs = await asyncio.gather(*(service.complete(request, loaded, p) for p in each))
        for out in outs:
            service.raise_for(out)
        picked = [fmt.whole(i, out) for i, out in enumerate(outs)]
        return JSONResponse({**head, "choices": picked, "usage": choices.usage(outs), **extra})

    head["object"] += ".chunk" if chat else ""  # legacy completions chunks keep their name
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    streamed = [choices.StreamedChoice(i, fmt) for i in range(shape.n)]
    finals: dict[int, RequestOutput] = {}

    def lines(index: int, item: Event | RequestOutput) -> list[bytes]:
        if isinstance(item, Event):
            return [sse({**head, "choices": [c]}) for c in streamed[index].event(item)]
        if item.error is not None and item.finish_reason == "error":
            return [error_event(item.error)]
        finals[index] = item
        pieces = streamed[index].end(item)
        out = [sse({**head, "choices": [c]}) for c in pieces[:-1]]
        out.append(sse({**head, "choices": [pieces[-1]], **extra}))
        if len(finals) < shape.n:
            return out
        if include_usage:
            usage = choices.usage([finals[i] for i in range(shape.n)])
            out.append(sse({**head, "choices": [], "usage": usage}))
        return [*out, sse("[DONE]")]

    streams = [service.start(request, loaded, p).events() for p in each]
    stream = choices.merged(streams)
    buffered = await prime(stream)

    async def events() -> AsyncIterator[bytes]:
        async with aclosing(stream):  # a disconnect closes the runs, which cancels them
            if chat:
                for i in range(shape.n):
                    role = {"role": "assistant", "content": ""}
                    choice = {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
                    yield sse({**head, "choices": [choice]})
            for index, item in buffered:
                for line in lines(index, item):
                    yield line
            async for index, item in stream:
                for line in lines(index, item):
                    yield line

    return StreamingResponse(events(), media_type="text/event-stream")


async def prepare_chat_body(
    request: Request, body: ChatBody, format_field: str = "the response format"
) -> tuple[Loaded, prompts.Prepared, tools.ToolPlan]:
    """A chat body made ready to run: its checks (before the model loads, so a bad request
    costs nothing), the model, its tools, its prompt, its grammar and sampling fields."""
    check_unsupported(body)
    grammar = request_grammar(body)
    messages = chat_messages(body.messages)
    loaded = await load(request, body.model)
    plan = tools.plan(loaded, body.model, body.tools, body.tool_choice, body.parallel_tool_calls)
    grammar = constraints.one_of((format_field, grammar), ("tool_choice", plan.grammar))
    prepared = await prompts.in_worker(
        prompts.prepare_chat,
        loaded,
        messages,
        ollama_options(body),
        body.truncate,
        plan.tools,
        request_id.get(),
    )
    await constraints.constrain(loaded, prepared, grammar)
    refine(body, prepared)
    return loaded, prepared, plan


@router.post("/v1/chat/completions", responses=STREAMED)
async def chat_completions(body: ChatBody, request: Request) -> Any:
    loaded, prepared, plan = await prepare_chat_body(request, body)
    return await respond(request, body, loaded, prepared, shape_of(body, chat=True, plan=plan))


@router.post("/v1/completions", responses=STREAMED)
async def completions(body: CompletionBody, request: Request) -> Any:
    check_unsupported(body)
    grammar = request_grammar(body)
    prompt = completion_prompt(body.prompt)
    loaded = await load(request, body.model)
    prepared = await prompts.in_worker(
        prompts.prepare_generate,
        loaded,
        prompt,
        ollama_options(body),
        None,
        True,  # raw: OpenAI's completions take the prompt verbatim, no chat template
        body.truncate,
        request_id.get(),
    )
    await constraints.constrain(loaded, prepared, grammar)
    refine(body, prepared)
    tokenizer = loaded.model.tokenizer
    echo = "" if not body.echo else prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    return await respond(request, body, loaded, prepared, shape_of(body, False, echo=echo))


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsBody, request: Request) -> dict[str, Any]:
    texts = embedding_texts(body.input)
    if body.encoding_format not in ("float", "base64"):
        raise InvalidRequestError("encoding_format must be 'float' or 'base64'")
    loaded = await load(request, body.model)
    if body.dimensions is not None and body.dimensions != loaded.model.config.hidden:
        raise InvalidRequestError(
            f"model '{body.model}' embeds in {loaded.model.config.hidden} dimensions;"
            f" dimensions={body.dimensions} is not supported"
        )
    vectors, count = await service.embed_texts(request, loaded, texts, body.truncate)
    data = []
    for index, vector in enumerate(vectors):
        value: Any = vector
        if body.encoding_format == "base64":  # what the official client asks for by default
            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": count, "total_tokens": count},
    }


def model_card(entry: ModelEntry) -> dict[str, Any]:
    owner, _, _ = entry.name.rpartition("/")
    return {
        "id": entry.name,
        "object": "model",
        "created": int(entry.modified_at.timestamp()),
        "owned_by": owner or "library",
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(e) for e in request.app.state.store.list()]}


@router.get("/v1/models/{model:path}")  # :path because names may hold '/' (and ':')
async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
    return model_card(request.app.state.store.get(model))
