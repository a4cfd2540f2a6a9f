"""An engine in the engine process, as the front's routes and manager see it.

RemoteEngine has the surface of engine.Engine that the server uses: `submit` gives a
RequestHandle, the one an in-process engine gives, whose Sequence mirrors the one
stepping over there. `deliver` applies each event from the process to that mirror.
Requests are checked here, as Engine.submit checks them (a bad prompt or grammar is
an error before any byte of the response), and the numbers the stats and /api/ps
read are the process's latest.

A restarted process runs each live request again from its start (`resend`). Outputs
are a function of the request alone: greedy ones are, and a sampled request without a
seed gets one here. So the replay's first tokens are the ones already sent. `deliver`
checks them against what was sent and passes them over, and the stream resumes past
that point. A replay that differs ends the request with an error rather than send
something else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from accordion.engine.engine import EngineConfig, context_of
from accordion.engine.request import Event, RequestHandle
from accordion.engine.sequence import Logprob, Sequence
from accordion.errors import ModelBrokenError, RequestCancelledError, ResumeError
from accordion.loader.model import LoadedModel
from accordion.sampling_params import SamplingParams
from accordion.structured import Compiler

if TYPE_CHECKING:
    from accordion.process.link import Link


@dataclass
class _Replay:
    """What a request had sent before the restart, to pass over in the replay."""

    tokens: list[int]
    chars: int  # text characters
    seen: int = 0  # tokens of the replay so far

    @property
    def over(self) -> bool:
        return self.seen >= len(self.tokens) and self.chars == 0


@dataclass
class _Live:
    handle: RequestHandle
    background: bool
    replay: _Replay | None = None


class RemoteEngine:
    remote = True
    looping = True  # the engine process steps it: a handle never drives it

    def __init__(
        self,
        link: Link,
        name: str,
        model: LoadedModel,
        config: EngineConfig,
        numbers: dict[str, Any],
    ) -> None:
        self.link, self.name, self.model, self.config = link, name, model, config
        self.numbers = numbers  # the process's latest: kv_stats and token counters
        self.grammars = Compiler(model.tokenizer, model.config.vocab_size)
        self.kv = _KV(self)
        self.live: dict[int, _Live] = {}

    # -- requests ------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        num_ctx: int | None = None,
        background: bool = False,
    ) -> RequestHandle:
        if self.name in self.link.broken:
            raise ModelBrokenError(self.link.broken[self.name])
        params = params or SamplingParams()
        limit = context_of(self.model, prompt_ids, params, num_ctx)
        if params.grammar:
            self.grammars.start(params.grammar)  # a bad grammar fails the call, as in process
        if params.seed is None and params.temperature > 0:  # replayable after a restart
            params = replace(params, seed=random.getrandbits(62))
        seq = Sequence(list(prompt_ids), params, limit, torch.Generator(), background=background)
        handle = RequestHandle(seq, self)
        with self.link.lock:  # with the send: a restart's `resend` sees it sent, or not yet
            self.live[seq.id] = _Live(handle, background)
            self.link.by_rid[seq.id] = self
            self.link.send(("submit", self.name, seq.id, seq.prompt_ids, params, limit, background))
        return handle

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self.link.send(("cancel", seq.id))

    def cancel_all(self) -> bool:
        for live in list(self.live.values()):
            self.cancel(live.handle.seq)
        return bool(self.live)

    def resend(self) -> None:
        """After a restart (link.py, its lock held): every live request again."""
        for rid, live in list(self.live.items()):
            seq = live.handle.seq
            if seq.cancelled:
                seq.error = RequestCancelledError("request cancelled")
                self._finish(rid, "cancelled")
                continue
            live.replay = _Replay(list(seq.generated), len(seq.text))
            message = (seq.prompt_ids, seq.params, seq.limit, live.background)
            self.link.resubmit(("submit", self.name, rid, *message))

    def deliver(
        self,
        rid: int,
        text: str,
        token: int | None,
        finished: bool,
        logprobs: list[Logprob],
        final: dict[str, Any] | None,
    ) -> None:
        """One event from the process (the reader thread): onto the mirror, then out."""
        live = self.live.get(rid)
        if live is None:
            return
        seq = live.handle.seq
        if live.replay is not None:
            replay = live.replay
            if token is not None and replay.seen < len(replay.tokens):
                if token != replay.tokens[replay.seen]:
                    self.link.send(("cancel", rid))
                    seq.error = ResumeError("the engine restarted; the replay came out differently")
                    self._finish(rid, "error")
                    return
                replay.seen, token = replay.seen + 1, None
                logprobs = logprobs[1:]
            skipped = min(replay.chars, len(text))
            replay.chars, text = replay.chars - skipped, text[skipped:]
            if replay.over:
                live.replay = None
            elif not finished:
                return
        if token is not None:
            seq.token_ids.append(token)
            seq.generated.append(token)
        seq.text += text
        seq.logprobs += logprobs
        if finished:
            self.live.pop(rid, None)
            self.link.by_rid.pop(rid, None)
            assert final is not None
            for key, value in final.items():
                setattr(seq, key, value)
        live.handle.push(Event(seq, text, token, finished))

    def fail_all(self, error: Exception) -> None:
        for rid, live in list(self.live.items()):
            live.handle.seq.error = error
            self._finish(rid, "error")

    def _finish(self, rid: int, reason: str) -> None:
        """End a request here, without the process (it has none of it)."""
        live = self.live.pop(rid, None)
        self.link.by_rid.pop(rid, None)
        if live is not None:
            seq = live.handle.seq
            seq.finish_reason = reason
            live.handle.push(Event(seq, "", None, True))

    # -- the rest of Engine's surface -------------------------------------------------
    async def call(self, method: str, *args: Any) -> Any:
        return await self.link.call(self.name, method, args)

    def kv_stats(self) -> dict[str, Any]:
        return dict(self.numbers["kv"])

    @property
    def tokens_evaluated(self) -> int:
        return self.numbers["tokens_evaluated"]

    @property
    def tokens_generated(self) -> int:
        return self.numbers["tokens_generated"]

    def has_work(self) -> bool:
        return False  # the manager's loop has nothing to step here

    def step(self) -> list[Event]:
        return []

    def stop(self) -> None:
        self.link.release(self.name)


class _KV:
    """The engine's KV cache as the front reads it: the process's latest numbers."""

    def __init__(self, engine: RemoteEngine) -> None:
        self.engine = engine

    def stats(self) -> dict[str, Any]:
        return self.engine.kv_stats()

    @property
    def allocated_bytes(self) -> int:
        return self.engine.numbers["kv"]["allocated_bytes"]

    def shrink(self) -> None:
        self.engine.link.send(("shrink", self.engine.name))
