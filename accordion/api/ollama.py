"""Ollama's generation routes: /api/generate, /api/chat, /api/embed(dings), /api/ps."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from accordion.api import constraints, prompts, service, tools
from accordion.api.app import streamed
from accordion.api.guard import request_id
from accordion.api.ollama_respond import NDJSON, now, respond
from accordion.api.options import with_params
from accordion.errors import InvalidRequestError
from accordion.sampling_params import MAX_LOGPROBS
from accordion.server.durations import parse_keep_alive
from accordion.server.manager import Loaded

router = APIRouter()
STREAMED = streamed(NDJSON)
ROLES = ("system", "user", "assistant", "tool")


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    stream: StrictBool = True  # strict: "yes" is a 400, as in Ollama, not True
    truncate: StrictBool = True
    shift: StrictBool = False
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(default=None, strict=True, ge=0, le=MAX_LOGPROBS)

    def top(self) -> int | None:
        """How many alternatives to report per token; None: no logprobs at all."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class GenerateBody(_Body):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: StrictBool = False
    images: list[str] | None = None
    context: list[int] | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[Any] | None = ""
    images: list[str] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class EmbedBody(BaseModel):
    model: str
    input: str | list[str] | None = None
    prompt: str | None = None  # /api/embeddings
    truncate: StrictBool = True
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


async def load(request: Request, body: _Body | EmbedBody) -> tuple[Loaded, float]:
    keep_alive = None if body.keep_alive is None else parse_keep_alive(body.keep_alive)
    return await service.manager_of(request).get(body.model, keep_alive)


def check_unsupported(body: _Body, loaded: Loaded, images: list[str] | None) -> None:
    if images:
        raise InvalidRequestError(f"model '{body.model}' does not support images")
    if body.think not in (None, False, ""):  # Ollama's answer for a model that cannot think
        source = loaded.model.template.source
        if "<think>" not in source and "enable_thinking" not in source:
            raise InvalidRequestError(f"model '{body.model}' does not support thinking")
        raise InvalidRequestError(
            f"think is not supported yet: model '{body.model}' could think, but its"
            " thinking is not separated from the answer"
        )


def load_reply(body: _Body, request: Request, loaded: Loaded, chat: bool) -> JSONResponse:
    unload = body.keep_alive is not None and parse_keep_alive(body.keep_alive) == 0
    if unload:
        service.manager_of(request).unload(loaded.name)
    doc = {
        "model": body.model,
        "created_at": now(),
        "done": True,
        "done_reason": "unload" if unload else "load",
    }
    doc.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return JSONResponse(doc)


@router.post("/api/generate", responses=STREAMED)
async def generate(body: GenerateBody, request: Request) -> Any:
    start = time.perf_counter()
    body.top()  # its 400 before the model loads
    grammar = constraints.from_ollama(body.format)
    loaded, load_s = await load(request, body)
    if not body.prompt and not body.suffix:
        return load_reply(body, request, loaded, chat=False)
    check_unsupported(body, loaded, body.images)
    if body.suffix:
        raise InvalidRequestError(f"model '{body.model}' does not support insert (suffix)")
    prepared = await prompts.in_worker(
        prompts.prepare_generate,
        loaded,
        body.prompt,
        body.options,
        body.system,
        body.raw,
        body.truncate,
        request_id.get(),
        body.context,
        body.template,
    )
    prepared.options.params = with_params(
        prepared.options.params, shift=body.shift, logprobs=body.top()
    )
    await constraints.constrain(loaded, prepared, grammar)
    return await respond(
        request,
        body,
        loaded,
        load_s,
        prepared,
        lambda text: {"response": text},
        start,
        context=not body.raw,  # Ollama returns no context in raw mode
    )


@router.post("/api/chat", responses=STREAMED)
async def chat(body: ChatBody, request: Request) -> Any:
    start = time.perf_counter()
    if not body.messages:
        raise InvalidRequestError("messages must not be empty")
    for i, m in enumerate(body.messages):
        if m.role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}"
            )
    body.top()  # its 400 before the model loads
    grammar = constraints.from_ollama(body.format)
    loaded, load_s = await load(request, body)
    check_unsupported(body, loaded, [i for m in body.messages for i in (m.images or [])])
    plan = tools.plan(loaded, body.model, body.tools)
    rid = request_id.get()

    def prepare() -> prompts.Prepared:  # dumping 20k messages takes long: not on the loop
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        return prompts.prepare_chat(loaded, messages, body.options, body.truncate, plan.tools, rid)

    prepared = await prompts.in_worker(prepare)
    prepared.options.params = with_params(
        prepared.options.params, shift=body.shift, logprobs=body.top()
    )
    await constraints.constrain(loaded, prepared, grammar)
    return await respond(
        request,
        body,
        loaded,
        load_s,
        prepared,
        lambda text: {"message": {"role": "assistant", "content": text}},
        start,
        plan.parser(),
    )


async def _embeddings(request: Request, body: EmbedBody, texts: list[str]) -> tuple[list, int]:
    loaded, _ = await load(request, body)
    return await service.embed_texts(request, loaded, texts, body.truncate, body.options)


@router.post("/api/embed")
async def embed_route(body: EmbedBody, request: Request) -> dict[str, Any]:
    start = time.perf_counter()
    texts = [body.input] if isinstance(body.input, str) else list(body.input or [])
    if not texts:
        raise InvalidRequestError("input must be a string or a non-empty list of strings")
    vectors, count = await _embeddings(request, body, texts)
    return {
        "model": body.model,
        "embeddings": vectors,
        "total_duration": int((time.perf_counter() - start) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": count,
    }


@router.post("/api/embeddings")
async def embeddings_route(body: EmbedBody, request: Request) -> dict[str, Any]:
    if body.prompt is None:
        raise InvalidRequestError("prompt is required")
    vectors, _ = await _embeddings(request, body, [body.prompt])
    return {"embedding": vectors[0]}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    from accordion.api.store_routes import details

    models = []
    for entry in list(service.manager_of(request).loaded.values()):
        stats_ = entry.engine.kv_stats()
        size = entry.weight_bytes + stats_["allocated_bytes"]
        expires = datetime.fromtimestamp(min(entry.expires_at, 4102444800), UTC)
        models.append(
            {
                "name": entry.name,
                "model": entry.name,
                "size": size,
                "size_vram": 0,
                "digest": entry.entry.digest,
                "details": details(entry.entry, entry.model),
                "expires_at": expires.isoformat().replace("+00:00", "Z"),
                "context_length": stats_["max_tokens"],
                "context": {
                    "max": stats_["max_tokens"],
                    "allocated": stats_["allocated_tokens"],
                    "used": stats_["used_tokens"],
                    "cached": stats_["cached_tokens"],
                },
                "kv_bytes": {"allocated": stats_["allocated_bytes"], "used": stats_["used_bytes"]},
                "active": entry.active,
                "engine_id": entry.engine_id,
            }
        )
    link = service.manager_of(request).link
    if link is None:
        return {"models": models}
    engine = {"pid": link.pid, "restarts": link.restarts, "broken": dict(link.broken)}
    return {"models": models, "engine_process": engine}
