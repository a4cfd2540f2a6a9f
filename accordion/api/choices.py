"""An OpenAI completion's choices: n of them, with logprobs and echo, whole or streamed.

Each choice is its own engine request with the same prompt (the prefix cache computes
the prompt once; a choice whose prefix another is computing waits for it), and with
`seed`, choice i samples from seed + i, so the choices differ yet repeat. Streamed,
the choices' events interleave as they come, each chunk naming its choice's index.
Usage counts the prompt once and every choice's tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from accordion.api import logprobs, service
from accordion.api.prompts import Prepared
from accordion.api.tools import ToolPlan, openai_calls
from accordion.engine.request import Event, RequestOutput
from accordion.engine.sequence import Logprob
from accordion.server.manager import Loaded

Item = Event | RequestOutput


@dataclass
class Shape:
    """What the response carries besides text, from the request's fields."""

    chat: bool
    n: int = 1
    top: int | None = None  # logprobs asked for, with this many alternatives
    echo: str = ""  # completions: the prompt text the output starts with
    echo_logprobs: list[tuple[int, Logprob | None]] = field(default_factory=list)
    tools: ToolPlan | None = None  # chat: parse the output's tool calls


def choice_prepared(prepared: Prepared, index: int) -> Prepared:
    params = prepared.options.params
    if index == 0 or params.seed is None:
        return prepared
    options = dataclasses.replace(
        prepared.options, params=dataclasses.replace(params, seed=params.seed + index)
    )
    return dataclasses.replace(prepared, options=options)


async def echo_rows(
    request: Request, loaded: Loaded, prepared: Prepared, top: int
) -> list[tuple[int, Logprob | None]]:
    """The prompt's tokens with their teacher-forced logprobs; a BOS the tokenizer added
    is context, not text, so it is not listed."""
    ids, manager = prepared.ids, service.manager_of(request)
    manager.begin(loaded)  # in use, so it is not unloaded under us
    try:
        scored = await manager.compute(loaded, "score", ids, top)
    finally:
        manager.end(loaded)
    rows: list[tuple[int, Logprob | None]] = [(ids[0], None)]
    rows += [(lp.token, lp) for lp in scored]
    bos = loaded.model.tokenizer.bos_id
    return rows[1:] if bos is not None and ids[0] == bos else rows


def usage(outs: list[RequestOutput]) -> dict[str, Any]:
    completion = sum(len(o.token_ids) for o in outs)
    prompt = outs[0].prompt_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": outs[0].cached_tokens},
    }


def finish_reason(out: RequestOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


class Formatter:
    """Turns one choice's text and logprobs into its JSON piece."""

    def __init__(self, loaded: Loaded, shape: Shape) -> None:
        self.tokenizer = loaded.model.tokenizer
        self.shape = shape

    def logprobs(self, entries: list[Logprob], offset: int, first: bool) -> Any:
        if self.shape.top is None:
            return None
        if self.shape.chat:
            return {"content": logprobs.entries(self.tokenizer, entries), "refusal": None}
        rows = [(lp.token, lp) for lp in entries]
        if first:
            rows = self.shape.echo_logprobs + rows
        return logprobs.completion(self.tokenizer, rows, offset)

    def whole(self, index: int, out: RequestOutput) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason(out)}
        parser = self.shape.tools.parser() if self.shape.tools else None
        if parser is not None:
            content, calls = parser.parse(out.text)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["content"] = content if content.strip() else None
                message["tool_calls"] = openai_calls(calls)
                choice["finish_reason"] = "tool_calls"
            choice["message"] = message
        elif self.shape.chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice["text"] = self.shape.echo + out.text
        choice["logprobs"] = self.logprobs(out.logprobs, 0, first=True)
        return choice


class StreamedChoice:
    """One choice of a stream: its chunks' payloads as its events arrive."""

    def __init__(self, index: int, fmt: Formatter) -> None:
        self.index, self.fmt, self.shape = index, fmt, fmt.shape
        self.pending: list[Logprob] = []  # logprobs of tokens not yet sent
        self.tokens = 0  # tokens seen: the engine may be ahead, so count, don't measure
        self.offset = 0  # characters sent (legacy text_offset)
        self.started = False
        self.parser = self.shape.tools.parser() if self.shape.tools else None
        self.calls = 0

    def event(self, event: Event) -> list[dict[str, Any]]:
        if event.token_id is not None:
            self.tokens += 1
            if self.shape.top is not None:
                self.pending.append(event.seq.logprobs[self.tokens - 1])
        if not event.text:
            return []
        if self.parser is None:
            return [self.content(event.text)]
        return self.parsed(*self.parser.feed(event.text))

    def end(self, out: RequestOutput) -> list[dict[str, Any]]:
        pieces = self.parsed(*self.parser.finish()) if self.parser is not None else []
        reason = "tool_calls" if self.calls else finish_reason(out)
        return [*pieces, self.content(None, reason)]

    def parsed(self, content: str, calls: list) -> list[dict[str, Any]]:
        out = [self.content(content)] if content else []
        if calls:
            deltas = [{"index": self.calls + k, **c} for k, c in enumerate(openai_calls(calls))]
            self.calls += len(calls)
            out.append(self.choice({"tool_calls": deltas}))
        return out

    def content(self, text: str | None, finish: str | None = None) -> dict[str, Any]:
        first = not self.started
        self.started = True
        if not self.shape.chat and first and self.shape.echo:
            text = self.shape.echo + (text or "")
        choice = self.choice({} if text is None else {"content": text}, finish, first)
        self.offset += len(text or "")
        return choice

    def choice(
        self, delta: dict[str, Any], finish: str | None = None, first: bool = False
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": self.index, "finish_reason": finish}
        choice["logprobs"] = self.fmt.logprobs(self.pending, self.offset, first)
        self.pending = []
        if self.shape.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("content") or ""
        return choice


async def merged(streams: list[AsyncGenerator[Item, None]]) -> AsyncIterator[tuple[int, Item]]:
    """Items of several choices' streams as they come, tagged by choice index."""
    if len(streams) == 1:  # the common case needs no tasks
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Item | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[Item, None]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            else:
                yield index, item
    finally:  # each stream's own finally (Running.events: cancel, count out) runs
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
