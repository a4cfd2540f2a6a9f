"""What Ollama and OpenAI routes share: running a prepared request, and embeddings.

A request is counted in by the model manager when it is submitted (`start`:
a full queue is a 503 before any byte of the response) and counted out exactly
once by `Running.close`, which the guard middleware also runs when the HTTP
request is over, so a client that vanishes at any point frees its slot, its
sequence and its KV blocks. A request answered in one piece watches for the
client leaving while it waits; a streamed one learns it from the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from accordion.api.guard import register_cleanup, request_id
from accordion.api.prompts import (
    Prepared,
    context_limit,
    encode_text,
    in_worker,
    request_options,
    token_ids,
)
from accordion.engine.request import Event, RequestHandle, RequestOutput, output_of
from accordion.errors import InvalidRequestError, ModelNotFoundError
from accordion.server.manager import Loaded, ModelManager

log = logging.getLogger("accordion.api")


def manager_of(request: Request) -> ModelManager:
    return request.app.state.manager


class Running:
    """One submitted request: counted in when made, counted out once by `close`."""

    def __init__(self, manager: ModelManager, loaded: Loaded, handle: RequestHandle) -> None:
        self.manager, self.loaded, self.handle = manager, loaded, handle
        self.closed = False

    def cancel(self) -> None:
        """Ask the engine to end it; its final event still arrives."""
        if not self.handle.done:
            self.handle.cancel()
            self.manager.wake()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.handle.done:  # nobody read it to the end: the client went away
            log.info("request_id=%s client went away; cancelling", request_id.get())
            self.cancel()
        self.manager.end(self.loaded)

    async def events(self) -> AsyncIterator[Event | RequestOutput]:
        """Events as they come, then the final RequestOutput."""
        try:
            async for event in self.handle:
                yield event
            output = output_of(self.handle.seq)
            for observe in self.manager.observers:
                observe(self.loaded.name, output)
            log.info(
                "request_id=%s model=%s prompt=%d cached=%d generated=%d preemptions=%d finish=%s",
                request_id.get(),
                self.loaded.name,
                output.prompt_tokens,
                output.cached_tokens,
                len(output.token_ids),
                output.preemptions,
                output.finish_reason,
            )
            yield output
        finally:
            self.close()


def start(request: Request, loaded: Loaded, prepared: Prepared) -> Running:
    manager = manager_of(request)
    manager.begin(loaded)  # ServerBusyError: a 503 before the response starts
    try:
        if manager.loaded.get(loaded.name) is not loaded:  # unloaded since we got it
            raise ModelNotFoundError(f"model '{loaded.name}' was unloaded; retry the request")
        # a batch job's requests say so: interactive ones are admitted ahead of them
        background = request.headers.get("x-accordion-priority") == "background"
        handle = loaded.engine.submit(
            prepared.ids, prepared.options.params, prepared.limit, background
        )
    except BaseException:
        manager.end(loaded)
        raise
    running = Running(manager, loaded, handle)
    register_cleanup(request, running.close)
    manager.wake()
    return running


async def complete(request: Request, loaded: Loaded, prepared: Prepared) -> RequestOutput:
    """Run to the end, cancelling if the client disconnects while it waits."""
    running = start(request, loaded, prepared)
    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(lambda task: task.cancelled() or running.cancel())
    final: RequestOutput | None = None
    try:
        async for item in running.events():
            if isinstance(item, RequestOutput):
                final = item
    finally:
        watcher.cancel()
    assert final is not None
    return final


async def _disconnected(request: Request) -> None:
    """Returns when the client is gone (the body has been read, so only that is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def raise_for(output: RequestOutput) -> None:
    """A request the engine ended with an error surfaces it to the HTTP layer."""
    if output.error is not None and output.finish_reason == "error":
        raise output.error


async def embed_texts(
    request: Request,
    loaded: Loaded,
    texts: list[str | list[int]],
    truncate: bool = True,
    options: dict[str, Any] | None = None,
) -> tuple[list[list[float]], int]:
    """One normalized mean-pooled vector per text, and the tokens read."""
    manager = manager_of(request)
    limit = context_limit(loaded, request_options(loaded, options))
    vectors, count = [], 0
    manager.begin(loaded)  # counts as in use, so it is not unloaded under us
    try:
        for index, text in enumerate(texts):
            if isinstance(text, list):
                ids = token_ids(loaded, text, f"input[{index}]")
            else:
                ids = await in_worker(_embed_ids, loaded, text)
            if len(ids) > limit:
                if not truncate:
                    raise InvalidRequestError(
                        f"input[{index}] is {len(ids)} tokens but the context limit is"
                        f" {limit} tokens"
                    )
                ids = ids[:limit]
            count += len(ids)
            vectors.append(await manager.compute(loaded, "embed", ids))
    finally:
        manager.end(loaded)
    return vectors, count


def _embed_ids(loaded: Loaded, text: str) -> list[int]:
    tokenizer = loaded.model.tokenizer
    return encode_text(loaded, text) or [tokenizer.bos_id or 0]
