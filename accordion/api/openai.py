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
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from accordion.api import choices, constraints, prompts, service
from accordion.api.app import status_of, streamed
from accordion.api.guard import request_id
from accordion.api.options import with_params
from accordion.engine.request import Event, RequestOutput
from accordion.engine.sequence import Logprob
from accordion.errors import InvalidRequestError
from accordion.sampling_params import MAX_LOGPROBS
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
MAX_CHOICES = 16  # n: each choice is a request of its own in the queue
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
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None  # on completions too, as vLLM has it
    structured_outputs: dict[str, Any] | None = None  # vLLM's extension
    # accordion extras
    num_ctx: Int | None = None
    truncate: Flag = True
    top_k: Int | None = None
    min_p: Num | None = None
    repeat_penalty: Num | None = None
    ignore_eos: Flag = False  # vLLM's and llama.cpp's, which benchmark tools send
    options: dict[str, Any] | None = None

    def num_predict(self) -> int | None:
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return None


class ChatBody(_Body):
    messages: list[dict[str, Any]]
    max_completion_tokens: Count | None = None
    tools: list[dict[str, Any]] | None = None
    logprobs: Flag | None = None
    top_logprobs: Count | None = None

    def num_predict(self) -> int | None:
        if self.max_completion_tokens is not None:  # max_tokens is deprecated for chat
            return self.max_completion_tokens
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionBody(_Body):
    prompt: Any = None  # checked by hand: token-id prompts deserve a clearer 400
    echo: Flag = False
    suffix: str | None = None
    best_of: Int | None = None
    logprobs: Count | None = None  # legacy: how many alternatives, 0 for the chosen alone

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: Any = None
    encoding_format: str = "float"
    dimensions: Int | None = None
    truncate: Flag = True


def check_unsupported(body: _Body) -> None:
    if body.n is not None and not 1 <= body.n <= MAX_CHOICES:
        raise InvalidRequestError(f"n must be in [1, {MAX_CHOICES}], got {body.n}")
    if isinstance(body, ChatBody) and body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs: true")
    top = body.top_logprobs_count()
    if top is not None and top > MAX_LOGPROBS:
        field = "top_logprobs" if isinstance(body, ChatBody) else "logprobs"
        raise InvalidRequestError(f"{field} must be at most {MAX_LOGPROBS}, got {top}")
    if isinstance(body, CompletionBody):
        if body.suffix:
            raise InvalidRequestError(
                f"model '{body.model}' does not support insert (suffix): its template has"
                " no fill-in-the-middle"
            )
        if body.best_of not in (None, 1, body.n):
            raise InvalidRequestError("best_of other than n is not supported")
    logit_bias(body)


def logit_bias(body: _Body) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids as strings; values are checked with the rest
    of the sampling parameters."""
    out: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequestError(f"logit_bias[{key!r}] must be a number, got {value!r}")
        out[int(key)] = float(value)
    return out


def refine(body: _Body, prepared: prompts.Prepared) -> None:
    """The sampling fields Ollama's options do not carry, set on the prepared request."""
    prepared.options.params = with_params(
        prepared.options.params,
        logit_bias=logit_bias(body),
        logprobs=body.top_logprobs_count(),
        ignore_eos=body.ignore_eos,
    )


def shape_of(body: _Body, prepared: prompts.Prepared, chat: bool) -> choices.Shape:
    echo = isinstance(body, CompletionBody) and body.echo
    return choices.Shape(
        chat,
        n=body.n or 1,
        top=body.top_logprobs_count(),
        echo=completion_prompt(body.prompt) if echo else "",  # type: ignore[attr-defined]
    )


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
    body: _Body,
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
    # per choice: logprobs not yet sent, tokens seen, characters sent (legacy text_offset)
    pending: list[list[Logprob]] = [[] for _ in each]
    tokens, offsets = [0] * shape.n, [0] * shape.n
    started: set[int] = set()
    finals: dict[int, RequestOutput] = {}

    def chunk(index: int, text: str | None, finish: str | None = None) -> dict[str, Any]:
        first = index not in started
        started.add(index)
        if not chat and first and shape.echo:
            text = shape.echo + (text or "")
        choice: dict[str, Any] = {"index": index, "finish_reason": finish}
        choice["logprobs"] = fmt.logprobs(pending[index], offsets[index], first)
        pending[index] = []
        if chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        offsets[index] += len(text or "")
        return {**head, "choices": [choice]}

    def lines(index: int, item: Event | RequestOutput) -> list[bytes]:
        if isinstance(item, Event):
            if item.token_id is not None:  # the engine is ahead: count, don't measure
                tokens[index] += 1
                if shape.top is not None:
                    pending[index].append(item.seq.logprobs[tokens[index] - 1])
            return [sse(chunk(index, item.text))] if item.text else []
        if item.error is not None and item.finish_reason == "error":
            return [error_event(item.error)]
        finals[index] = item
        out = [sse({**chunk(index, None, choices.finish_reason(item)), **extra})]
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
    refine(body, prepared)
    return await respond(request, body, loaded, prepared, shape_of(body, prepared, chat=True))


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
    return await respond(request, body, loaded, prepared, shape_of(body, prepared, chat=False))


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
