"""What a caller holds for one request: its events, sync or async, and its output."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from accordion.engine.sequence import Logprob, Sequence

if TYPE_CHECKING:
    from accordion.engine.engine import Engine


@dataclass
class Event:
    """What one step produced for one sequence."""

    seq: Sequence
    text: str  # new output text (may be empty)
    token_id: int | None
    finished: bool


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    evaluated_tokens: int  # tokens run through the model, recomputation included
    preemptions: int
    timings: dict[str, float] = field(default_factory=dict)
    error: Exception | None = None
    logprobs: list[Logprob] = field(default_factory=list)  # per output token, when asked


def output_of(seq: Sequence) -> RequestOutput:
    return RequestOutput(
        request_id=seq.id,
        prompt_token_ids=list(seq.prompt_ids),
        text=seq.text,
        token_ids=list(seq.output_ids),
        finish_reason=seq.finish_reason,
        prompt_tokens=len(seq.prompt_ids),
        cached_tokens=seq.cached_tokens,
        evaluated_tokens=seq.evaluated_tokens,
        preemptions=seq.preemptions,
        timings=seq.timings(),
        error=seq.error,
        logprobs=list(seq.logprobs),
    )


class RequestHandle:
    """Events arrive from the engine thread; read them here or from an asyncio task."""

    def __init__(self, seq: Sequence, engine: Engine) -> None:
        self.seq = seq
        self._engine = engine
        self._events: queue.Queue[Event] = queue.Queue()
        self.done = False  # the finishing event has been handed out
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_events: asyncio.Queue[Event] | None = None
        try:  # created inside a running event loop: deliver there too
            self._loop = asyncio.get_running_loop()
            self._async_events = asyncio.Queue()
        except RuntimeError:
            pass

    @property
    def id(self) -> int:
        return self.seq.id

    def push(self, event: Event) -> None:
        if self._loop is not None and self._async_events is not None:
            if self._loop.is_closed():  # its reader's loop has ended: nobody is left to tell
                return
            self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)
        else:
            self._events.put(event)

    def cancel(self) -> None:
        self._engine.cancel(self.seq)

    def __iter__(self) -> Iterator[Event]:
        while not self.done:
            event = self._next()
            self.done = event.finished
            yield event

    def _next(self) -> Event:
        if not self._engine.looping:  # nobody runs the loop: drive the engine ourselves
            while self._events.empty():
                self._engine.step()
        return self._events.get()

    async def __aiter__(self) -> AsyncIterator[Event]:
        assert self._async_events is not None, "create the request inside the event loop"
        while not self.done:
            event = await self._async_events.get()
            self.done = event.finished
            yield event

    def result(self) -> RequestOutput:
        for _ in self:
            pass
        return output_of(self.seq)

    async def aresult(self) -> RequestOutput:
        async for _ in self:
            pass
        return output_of(self.seq)
