"""Conversation mode: the requests accumulate in one chat, cut into chunks that fit.

Each request is sent with the chat so far: the system prompt, every earlier
request's messages and answers in this chunk, then its own messages. Before a
request goes, its prompt is estimated from real counts (the last answer's
`prompt_tokens` + `completion_tokens`, plus its new messages at two bytes a
token, which overcounts English); if that and its answer would come within
MARGIN of the context limit, a new chunk starts again from the system prompt.
Should the target still refuse the prompt as too long, the request goes again
in a new chunk. A request that does not fit even alone is its own error line.

Chunks are recorded with the results, so a resumed job rebuilds the open chunk
from the store and goes on exactly where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accordion.batch.lines import CHAT, Line, parse, read
from accordion.batch.plan import MARGIN

if TYPE_CHECKING:
    from collections.abc import Iterator

    from accordion.batch.runner import Runner

DEFAULT_CONTEXT = 2048  # a target that does not say (Ollama's default num_ctx)
DEFAULT_ANSWER = 300


class Conversation:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.system: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []  # this chunk's messages after the system's
        self.tokens = 0  # the last exchange's prompt + answer, as the target counted them
        self.chunk = 0
        self.context: int | None = None

    async def run(self, pending: Iterator[Line]) -> None:
        r = self.runner
        r.progress.limit = r.progress.planned = r.progress.lowest_limit = 1  # one chat
        self._restore()
        for line in pending:
            r.progress.inflight = r.progress.peak_inflight = 1
            if line.url != CHAT:
                r.finish_error(line, "conversation mode takes chat requests only")
                continue
            reply = await self._send(line)
            result = r.finish(line, reply, chunk=self.chunk)
            if result.ok:
                self._append(line, r.target.answer(line.url, reply))
                r.progress.plan = r.progress.plan or self.describe(line)
            r.flush(force=True)  # the next request builds on this one: it counts first
            await r.checkpoint()
            if r.stopping:
                return

    async def _send(self, line: Line) -> Any:
        r = self.runner
        system, own = _split(line.body["messages"])
        if not self.system:
            self.system = system
        if self.history and not self._fits(line, own):
            self._new_chunk()
        body = {**line.body, "messages": [*self.system, *self.history, *own]}
        reply = await r.target.post(line.url, body)
        if reply.status == 400 and _too_long(reply.body) and self.history:
            self._new_chunk()  # the estimate was short: the real count said no
            body = {**line.body, "messages": [*self.system, *own]}
            reply = await r.target.post(line.url, body)
        if self.context is None:  # the model is loaded now: its numbers are there
            stats = await r.model_stats()
            self.context = (stats or {}).get("kv", {}).get("max_tokens") or DEFAULT_CONTEXT
        return reply

    def _limit(self, line: Line) -> int:
        return line.body.get("num_ctx") or self.context or DEFAULT_CONTEXT

    def _answer(self, line: Line) -> int:
        body = line.body
        return body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_ANSWER

    def _fits(self, line: Line, own: list[dict[str, Any]]) -> bool:
        new = sum(len(json.dumps(m.get("content", ""))) for m in own) // 2 + 8 * len(own)
        return self.tokens + new + self._answer(line) + MARGIN <= self._limit(line)

    def _new_chunk(self) -> None:
        self.history, self.tokens = [], 0
        self.chunk += 1
        self.runner.progress.chunks = self.chunk + 1

    def _append(self, line: Line, body: dict[str, Any]) -> None:
        _, own = _split(line.body["messages"])
        answer = body["choices"][0]["message"]["content"]
        self.history += [*own, {"role": "assistant", "content": answer}]
        usage = body.get("usage") or {}
        self.tokens = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)

    def _restore(self) -> None:
        """A resumed job: the open chunk's exchanges, from the store and the input."""
        r = self.runner
        last = r.job.store.last_chunk()
        if last is None:
            return
        self.chunk, rows = last
        r.progress.chunks = self.chunk + 1
        wanted = {line: record for line, record in rows}
        for number, raw in read(Path(r.settings.input)):
            if number in wanted:
                line = parse(number, raw, r.settings.defaults)
                system, _ = _split(line.body["messages"])
                self.system = self.system or system
                self._append(line, json.loads(wanted[number])["response"]["body"])

    def describe(self, line: Line) -> str:
        limit, answer = self._limit(line), self._answer(line)
        return (
            f"conversation: context limit {limit} tokens, answers up to {answer}, margin"
            f" {MARGIN}; a chunk restarts from the system prompt before a prompt would pass"
            f" {limit - answer - MARGIN} tokens (the first exchange took {self.tokens})"
        )


def _split(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the leading system messages, the rest)."""
    n = 0
    while n < len(messages) and messages[n].get("role") == "system":
        n += 1
    return messages[:n], messages[n:]


def _too_long(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message", "") if isinstance(error, dict) else str(error or "")
    return "context limit" in message
