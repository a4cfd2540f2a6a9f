"""What Ollama and OpenAI routes share: prompts, context limits, truncation, running.

Context limit of a request = its num_ctx, else the Modelfile's, else
ACCORDION_CONTEXT_LENGTH, else the model's trained length; never above the
trained length. A prompt that does not fit is either refused (truncate=false:
400 naming the counts) or shortened by whole messages after the system prompt
(generate: tokens after num_keep), and the response reports it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from accordion.api.app import request_id
from accordion.api.options import RequestOptions, merge, to_request_options
from accordion.engine.request import Event, RequestHandle, RequestOutput, output_of
from accordion.errors import InvalidRequestError, ModelNotFoundError
from accordion.loader.chat_template import normalize_messages
from accordion.models.embed import embed
from accordion.server.manager import Loaded, ModelManager

log = logging.getLogger("accordion.api")


def manager_of(request: Request) -> ModelManager:
    return request.app.state.manager


@dataclass
class Prepared:
    ids: list[int]
    options: RequestOptions
    limit: int
    truncated: dict[str, int] | None = None


def request_options(loaded: Loaded, options: dict[str, Any] | None) -> RequestOptions:
    if options is not None and not isinstance(options, dict):
        raise InvalidRequestError("options must be an object")
    return to_request_options(merge(loaded.entry.parameters, options))


def context_limit(loaded: Loaded, opts: RequestOptions) -> int:
    trained = loaded.model.config.context_length
    env = os.environ.get("ACCORDION_CONTEXT_LENGTH")
    limit = opts.num_ctx or (int(env) if env else None) or trained
    return min(limit, trained)


def _too_long(n: int, limit: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"prompt is {n} tokens but the context limit is {limit} tokens"
        " (raise num_ctx or allow truncation)"
    )


def prepare_chat(
    loaded: Loaded,
    messages: list[dict],
    options: dict[str, Any] | None,
    truncate: bool = True,
    tools: list | None = None,
    request_id: str = "-",
) -> Prepared:
    opts = request_options(loaded, options)
    limit = context_limit(loaded, opts)
    messages = normalize_messages(messages)
    if loaded.entry.system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": loaded.entry.system}, *messages]
    ids = loaded.model.encode_chat(messages, tools)
    if len(ids) < limit:
        return Prepared(ids, opts, limit)
    if not truncate:
        raise _too_long(len(ids), limit)
    original, kept = len(ids), list(messages)
    first = 1 if kept and kept[0]["role"] == "system" else 0
    while len(ids) >= limit and len(kept) - first > 1:
        del kept[first]  # the oldest whole message after the system prompt
        ids = loaded.model.encode_chat(kept, tools)
    if len(ids) >= limit:
        raise _too_long(len(ids), limit)
    report = {"original": original, "kept": len(ids), "removed": original - len(ids)}
    log.warning("request_id=%s truncated prompt %s", request_id, report)
    return Prepared(ids, opts, limit, report)


def prepare_generate(
    loaded: Loaded,
    prompt: str,
    options: dict[str, Any] | None,
    system: str | None = None,
    raw: bool = False,
    truncate: bool = True,
    request_id: str = "-",
) -> Prepared:
    opts = request_options(loaded, options)
    limit = context_limit(loaded, opts)
    model = loaded.model
    system = system if system is not None else loaded.entry.system
    if raw or not model.template.has_template:
        text = prompt if raw or not system else f"{system}\n\n{prompt}"
        ids = model.tokenizer.encode(text)
    else:
        messages = [{"role": "user", "content": prompt}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        ids = loaded.model.encode_chat(messages)
    if len(ids) < limit:
        return Prepared(ids, opts, limit)
    if not truncate:
        raise _too_long(len(ids), limit)
    keep = min(opts.num_keep, limit - 2)
    original = len(ids)
    ids = ids[:keep] + ids[original - (limit - 1 - keep) :]  # drop the oldest after num_keep
    report = {"original": original, "kept": len(ids), "removed": original - len(ids)}
    log.warning("request_id=%s truncated prompt %s", request_id, report)
    return Prepared(ids, opts, limit, report)


async def run(
    manager: ModelManager, loaded: Loaded, prepared: Prepared
) -> AsyncIterator[Event | RequestOutput]:
    """Events as they come, then the final RequestOutput; cancels if the caller goes away."""
    manager.begin(loaded)
    handle: RequestHandle | None = None
    try:
        if manager.loaded.get(loaded.name) is not loaded:  # unloaded since we got it
            raise ModelNotFoundError(f"model '{loaded.name}' was unloaded; retry the request")
        handle = loaded.engine.submit(prepared.ids, prepared.options.params, prepared.limit)
        manager.wake()
        async for event in handle:
            yield event
        output = output_of(handle.seq)
        for observe in manager.observers:
            observe(loaded.name, output)
        log.info(
            "request_id=%s model=%s prompt=%d cached=%d generated=%d preemptions=%d finish=%s",
            request_id.get(),
            loaded.name,
            output.prompt_tokens,
            output.cached_tokens,
            len(output.token_ids),
            output.preemptions,
            output.finish_reason,
        )
        yield output
    finally:
        if handle is not None and not handle.done:  # client disconnected mid-stream
            log.info("request_id=%s client went away; cancelling", request_id.get())
            handle.cancel()
            manager.wake()
        manager.end(loaded)


async def complete(manager: ModelManager, loaded: Loaded, prepared: Prepared) -> RequestOutput:
    final: RequestOutput | None = None
    async for item in run(manager, loaded, prepared):
        if isinstance(item, RequestOutput):
            final = item
    assert final is not None
    return final


def raise_for(output: RequestOutput) -> None:
    """A request the engine ended with an error surfaces it to the HTTP layer."""
    if output.error is not None and output.finish_reason == "error":
        raise output.error


async def embed_texts(
    manager: ModelManager,
    loaded: Loaded,
    texts: list[str],
    truncate: bool = True,
    options: dict[str, Any] | None = None,
) -> tuple[list[list[float]], int]:
    """One normalized mean-pooled vector per text, and the tokens read."""
    limit = context_limit(loaded, request_options(loaded, options))
    tokenizer = loaded.model.tokenizer
    vectors, count = [], 0
    manager.begin(loaded)  # counts as in use, so it is not unloaded under us
    try:
        for index, text in enumerate(texts):
            ids = tokenizer.encode(text) or [tokenizer.bos_id or 0]
            if len(ids) > limit:
                if not truncate:
                    raise InvalidRequestError(
                        f"input[{index}] is {len(ids)} tokens but the context limit is"
                        f" {limit} tokens"
                    )
                ids = ids[:limit]
            count += len(ids)
            vectors.append(await manager.on_main(embed, loaded.model.decoder, ids))
    finally:
        manager.end(loaded)
    return vectors, count
