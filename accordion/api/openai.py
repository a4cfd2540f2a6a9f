"""OpenAI-compatible routes under /v1: chat completions, completions, embeddings, models.

Requests map onto the same service layer as the Ollama routes: OpenAI's sampling
fields become Ollama options, so a model's Modelfile parameters still apply
underneath, and accordion's own knobs (num_ctx, truncate, top_k, min_p,
repeat_penalty, options) ride along in the body (the client's `extra_body`).
Errors are OpenAI error objects (see app.error_response); a stream that fails
after it started reports the error as one SSE data line.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from accordion.api import constraints, prompts, service
from accordion.api.app import status_of, streamed
from accordion.api.guard import request_id
from accordion.engine.request import Event, RequestOutput
from accordion.errors import InvalidRequestError
from accordion.server.manager import Loaded
from accordion.server.store import ModelEntry
from accordion.structured import Grammar

router = APIRouter()

# Strict so that "hot" or true is a 400 rather than silently coerced; ints still pass as floats.
Num = Annotated[float, Field(strict=True)]
Count = Annotated[int, Field(strict=True, ge=0)]
Int = Annotated[int, Field(strict=True)]
Flag = Annotated[bool, Field(strict=True)]

STREAMED = streamed("text/event-stream")
ROLES = {"system", "developer", "user", "assistant", "tool"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Flag = False


class _Body(BaseModel):
    # Unknown OpenAI fields (user, metadata, store, ...) are accepted and ignored.
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: Num | None = None
    top_p: Num | None = None
    max_tokens: Count | None = None
    stop: str | list[str] | None = None
    seed: Int | None = None
    presence_penalty: Num | None = None
    frequency_penalty: Num | None = None
    n: Int | None = None
    stream: Flag = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None  # on completions too, as vLLM has it
    structured_outputs: dict[str, Any] | None = None  # vLLM's extension
    # accordion extras
    num_ctx: Int | None = None
    truncate: Flag = True
    top_k: Int | None = None
    min_p: Num | None = None
    repeat_penalty: Num | None = None
    options: dict[str, Any] | None = None

    def num_predict(self) -> int | None:
        return self.max_tokens


class ChatBody(_Body):
    messages: list[dict[str, Any]]
    max_completion_tokens: Count | None = None
    tools: list[dict[str, Any]] | None = None

    def num_predict(self) -> int | None:
        if self.max_completion_tokens is not None:  # max_tokens is deprecated for chat
            return self.max_completion_tokens
        return self.max_tokens


class CompletionBody(_Body):
    prompt: Any = None  # checked by hand: token-id prompts deserve a clearer 400
    echo: Flag = False
    suffix: str | None = None
    best_of: Int | None = None


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: Any = None
    encoding_format: str = "float"
    dimensions: Int | None = None
    truncate: Flag = True


def check_unsupported(body: _Body) -> None:
    if body.n not in (None, 1):
        raise InvalidRequestError(f"n={body.n} is not supported: only one choice per request")
    if body.logprobs:
        raise InvalidRequestError("logprobs are not supported")
    if body.logit_bias:
        raise InvalidRequestError("logit_bias is not supported")
    if isinstance(body, CompletionBody):
        if body.echo:
            raise InvalidRequestError("echo is not supported")
        if body.suffix:
            raise InvalidRequestError("suffix (insert) is not supported")
        if body.best_of not in (None, 1):
            raise InvalidRequestError("best_of is not supported")


def request_grammar(body: _Body) -> Grammar | None:
    """The output constraint the body asks for (checked, not yet compiled)."""
    return constraints.one_of(
        ("response_format", constraints.from_response_format(body.response_format)),
        ("structured_outputs", constraints.from_structured_outputs(body.structured_outputs)),
    )


def ollama_options(body: _Body) -> dict[str, Any]:
    """The request's Ollama options: its `options` dict, then OpenAI's fields on top."""
    explicit = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repeat_penalty": body.repeat_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop": body.stop,
        "num_ctx": body.num_ctx,
        "num_predict": body.num_predict(),
    }
    return {**(body.options or {}), **{k: v for k, v in explicit.items() if v is not None}}


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as templates expect them; content itself is checked by prepare_chat."""
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}, got {role!r}"
            )
        message = {**message, "role": "system" if role == "developer" else role}
        if message.get("tool_calls"):  # OpenAI sends arguments as JSON text; templates want dicts
            message["tool_calls"] = [_parsed_call(c) for c in message["tool_calls"]]
        out.append(message)
    return out


def _parsed_call(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            return {**call, "function": {**fn, "arguments": json.loads(fn["arguments"])}}
        except json.JSONDecodeError:
            pass  # leave it as text; the template decides what to do with it
    return call


async def load(request: Request, model: str) -> Loaded:
    loaded, _ = await service.manager_of(request).get(model)
    return loaded


def finish_reason(out: RequestOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


def usage(out: RequestOutput) -> dict[str, Any]:
    completion = len(out.token_ids)
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": out.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": out.cached_tokens},
    }


def sse(doc: dict[str, Any] | str) -> bytes:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc)}\n\n".encode()


async def prime(stream: AsyncGenerator[Event | RequestOutput, None]) -> list[Event | RequestOutput]:
    """Read up to the first text (or the end) so that early failures are still HTTP errors."""
    buffered: list[Event | RequestOutput] = []
    try:
        async for item in stream:
            buffered.append(item)
            if isinstance(item, RequestOutput):
                service.raise_for(item)
                break
            if item.text:
                break
    except BaseException:
        await stream.aclose()  # runs Running.events' finally: cancel, count out
        raise
    return buffered


async def respond(
    request: Request, body: _Body, loaded: Loaded, prepared: prompts.Prepared, chat: bool
) -> Any:
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.model,
    }
    extra = {"truncated": prepared.truncated} if prepared.truncated else {}

    if not body.stream:
        out = await service.complete(request, loaded, prepared)
        service.raise_for(out)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason(out)}
        if chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice["text"] = out.text
        return JSONResponse({**head, "choices": [choice], "usage": usage(out), **extra})

    head["object"] += ".chunk" if chat else ""  # legacy completions chunks keep their name
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            delta = {} if text is None else {"content": text}
            choice["delta"] = {"role": "assistant", **delta} if role else delta
        else:
            choice["text"] = text or ""
        return {**head, "choices": [choice]}

    def lines(item: Event | RequestOutput) -> list[bytes]:
        if isinstance(item, Event):
            return [sse(chunk(item.text))] if item.text else []
        if item.error is not None and item.finish_reason == "error":
            # The 200 and its headers are gone: the error travels in-band, which the
            # official clients raise as an APIError.
            status = status_of(item.error)
            kind = "server_error" if status >= 500 else "invalid_request_error"
            error = {"message": str(item.error), "type": kind, "param": None, "code": None}
            return [sse({"error": error})]
        out = [sse({**chunk(None, finish_reason(item)), **extra})]
        if include_usage:
            out.append(sse({**head, "choices": [], "usage": usage(item)}))
        return [*out, sse("[DONE]")]

    stream = service.start(request, loaded, prepared).events()
    buffered = await prime(stream)

    async def events() -> AsyncIterator[bytes]:
        async with aclosing(stream):  # a disconnect closes the run, which cancels the request
            if chat:
                yield sse(chunk("", role=True))
            for item in buffered:
                for line in lines(item):
                    yield line
            async for item in stream:
                for line in lines(item):
                    yield line

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/v1/chat/completions", responses=STREAMED)
async def chat_completions(body: ChatBody, request: Request) -> Any:
    check_unsupported(body)
    grammar = request_grammar(body)
    messages = chat_messages(body.messages)  # before loading: a bad request costs nothing
    loaded = await load(request, body.model)
    if body.tools and not loaded.model.template.supports_tools:
        raise InvalidRequestError(f"model '{body.model}' does not support tools")
    prepared = await prompts.in_worker(
        prompts.prepare_chat,
        loaded,
        messages,
        ollama_options(body),
        body.truncate,
        body.tools or None,
        request_id.get(),
    )
    await constraints.constrain(loaded, prepared, grammar)
    return await respond(request, body, loaded, prepared, chat=True)


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
    return await respond(request, body, loaded, prepared, chat=False)


def completion_prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise InvalidRequestError("prompt must be a string (or a list of exactly one string)")
    return value


def embedding_texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int | list) for t in value):
        raise InvalidRequestError("token-id input is not supported: send text")
    raise InvalidRequestError("input must be a string or a non-empty list of strings")


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
