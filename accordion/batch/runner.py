"""Independent mode: many requests in flight on the target's continuous batching.

The loop, top to bottom: the first two pending requests run one after the other,
so the model is loaded and the shared system prompt sits in the prefix cache
before the flood (and the second one's cached tokens measure that prefix). Then
the plan: as many in flight as the KV budget holds for the measured prompt and
answer sizes, capped by `max_inflight`. While it runs, each second the target's
own numbers (`/api/stats`, where it has them) adapt it: a preemption lowers the
count by a quarter, headroom with nothing waiting raises it by an eighth.

Results are committed every `COMMIT_S` (or `COMMIT_N` results) in one transaction,
then appended to the output files; reading the input, committing and writing all
happen here, between awaits, never on the engine's thread.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from accordion.batch.conversation import Conversation
from accordion.batch.job import Job, Scan, Settings
from accordion.batch.lines import Line, parse, read
from accordion.batch.plan import Shape, plan
from accordion.batch.store import Result, Sink
from accordion.batch.target import Reply, Target

COMMIT_S, COMMIT_N = 0.25, 256
ADAPT_S = 1.0


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    inflight: int = 0
    limit: int = 1
    planned: int = 1
    peak_inflight: int = 0
    lowest_limit: int | None = None
    preemptions: int = 0
    kv_used_bytes: int | None = None
    kv_budget_bytes: int | None = None
    kv_bytes_per_token: int | None = None
    started: float = field(default_factory=time.monotonic)
    finished_here: int = 0  # results this run committed (the rate's numerator)
    tokens_here: int = 0
    state: str = "running"
    plan: str | None = None  # conversation mode: how it cuts chunks
    chunks: int = 0
    workers: int = 1  # Ray: live workers, and requests a dead one held that ran again
    requeued: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def rates(self) -> tuple[float, float]:
        span = max(time.monotonic() - self.started, 1e-9)
        return self.finished_here / span, self.tokens_here / span


class Runner:
    def __init__(
        self,
        job: Job,
        settings: Settings,
        scan: Scan,
        target: Target,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.job, self.settings, self.scan, self.target = job, settings, scan, target
        self.on_progress = on_progress or (lambda p: None)
        counts = job.store.counts()
        self.progress = Progress(
            scan.requests,
            counts.done,
            counts.failed,
            counts.prompt_tokens,
            counts.cached_tokens,
            counts.completion_tokens,
        )
        self.sinks = {
            ok: Sink(Path(settings.errors if not ok else settings.out), ok) for ok in (True, False)
        }
        self._buffer: list[Result] = []
        self._last_commit = time.monotonic()
        self._stop = asyncio.Event()
        self._preempted: int | None = None
        self._sampled_at = 0.0  # wall time of the last stats sample read
        self._last_check = time.monotonic()

    def request_stop(self) -> None:
        """Stop soon: in-flight requests are dropped, resume redoes them (any thread)."""
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(self._stop.set)

    async def run(self) -> Progress:
        self._loop = asyncio.get_running_loop()
        for sink in self.sinks.values():
            sink.open(self.job.store)
        try:
            await self._run()
        except BaseException:
            self.progress.state = "interrupted"
            raise
        finally:
            self.flush(force=True)
            for sink in self.sinks.values():
                sink.close()
            self.job.store.put(state=self.progress.state)
            self._note_target()
            await self.target.close()
            self.on_progress(self.progress)
        return self.progress

    async def _run(self) -> None:
        model = self.scan.model or ""
        self.job.check_model(model, await self._digest())
        self.job.store.put(state="running")
        pending = self._pending()
        if self.settings.mode == "conversation":
            await Conversation(self).run(pending)
            await self._last_stats()
            self._settle()
            return
        shared = 0
        for line in islice(pending, 2):  # load, cache the shared prefix, measure it
            shared = self.finish(line, await self._send(line)).cached_tokens
        self.flush(force=True)
        self._plan(await self._first_stats(), shared)
        tasks: dict[asyncio.Task, Line] = {}
        try:
            await self._drain(pending, tasks)
            await self._last_stats()
        finally:  # stopped or failed: what is in flight was never committed; resume redoes it
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._settle()

    def _settle(self) -> None:
        if self.progress.state == "running":
            complete = self.progress.done >= self.progress.total
            self.progress.state = "finished" if complete else "interrupted"

    def _note_target(self) -> None:
        self.progress.workers, self.progress.requeued = self.target.workers, self.target.requeued

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def checkpoint(self, inflight: int = 0) -> None:
        """Once a second: adapt to the target, heed `batch cancel`, report progress."""
        if time.monotonic() - self._last_check < ADAPT_S:
            return
        self._last_check = time.monotonic()
        self._note_target()
        await self._adapt(inflight)
        if self.job.store.get("state") == "cancelling":
            self.progress.state = "cancelled"
            self._stop.set()
        self.on_progress(self.progress)

    async def _drain(self, pending: Iterator[Line], tasks: dict[asyncio.Task, Line]) -> None:
        """Keep `limit` requests in flight until the input runs out or the job stops."""
        more = True
        while not self._stop.is_set():
            while more and len(tasks) < self.progress.limit:
                line = next(pending, None)
                if line is None:
                    more = False
                    break
                tasks[asyncio.ensure_future(self._send(line))] = line
            self.progress.inflight = len(tasks)
            self.progress.peak_inflight = max(self.progress.peak_inflight, len(tasks))
            if not tasks:
                return
            done, _ = await asyncio.wait(tasks, timeout=COMMIT_S, return_when="FIRST_COMPLETED")
            for task in done:
                self.finish(tasks.pop(task), task.result())
            self.flush()
            await self.checkpoint(len(tasks))

    def _pending(self) -> Iterator[Line]:
        """Input lines without a committed result, parsed again (they passed the first pass)."""
        done = self.job.store.done_lines(self.scan.last_line)
        for number, raw in read(Path(self.settings.input)):
            if not done[number]:
                yield parse(number, raw, self.settings.defaults)

    async def _send(self, line: Line) -> Reply:
        return await self.target.post(line.url, line.body)

    # -- results -----------------------------------------------------------------------
    def finish_error(self, line: Line, message: str) -> Result:
        """A line this job cannot send: an error line, no request made."""
        error = {"error": {"message": message, "type": "invalid_request_error"}}
        return self.finish(line, Reply(400, error, ""), answered=False)

    def finish(
        self, line: Line, reply: Reply, chunk: int | None = None, answered: bool = True
    ) -> Result:
        body = self.target.answer(line.url, reply) if answered else reply.body
        ok = reply.status == 200
        usage = (body.get("usage") if ok and isinstance(body, dict) else None) or {}
        details = usage.get("prompt_tokens_details") or {}
        record = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": line.custom_id,
            "response": {"status_code": reply.status, "request_id": reply.request_id, "body": body},
            "error": None if ok else error_of(reply.status, body),
        }
        text = json.dumps(record, ensure_ascii=False)
        result = Result(
            line.number,
            line.custom_id,
            ok,
            text,
            usage.get("prompt_tokens", 0),
            details.get("cached_tokens", 0) or 0,
            usage.get("completion_tokens", 0),
            chunk,
        )
        self._buffer.append(result)
        p = self.progress
        p.done, p.failed = p.done + 1, p.failed + (not ok)
        p.prompt_tokens += result.prompt_tokens
        p.cached_tokens += result.cached_tokens
        p.completion_tokens += result.completion_tokens
        p.finished_here += 1
        p.tokens_here += result.prompt_tokens + result.completion_tokens
        return result

    def flush(self, force: bool = False) -> None:
        due = time.monotonic() - self._last_commit >= COMMIT_S or len(self._buffer) >= COMMIT_N
        if not self._buffer or not (force or due):
            return
        batch, self._buffer = self._buffer, []
        self.job.store.commit(batch)  # from here they count ...
        for ok, sink in self.sinks.items():  # ... and the files follow
            sink.write([r.record for r in batch if r.ok == ok])
        self._last_commit = time.monotonic()

    # -- capacity ----------------------------------------------------------------------
    def _plan(self, stats: dict[str, Any] | None, shared: int) -> None:
        """In flight: what plan.plan fits in the KV budget for requests of the sizes seen
        so far, the shared prefix held once (8 without numbers)."""
        p, cap = self.progress, self._cap()
        limit = min(cap, 8)
        if stats is not None and p.finished_here:
            self._preempted = stats.get("preemptions", 0)
            kv = stats["kv"]
            p.kv_bytes_per_token, p.kv_budget_bytes = kv["bytes_per_token"], kv["budget_bytes"]
            block = kv["block_size"]
            groups = [(g["bytes_per_block"] // block, g["window"]) for g in kv["groups"]]
            prompt = max(p.prompt_tokens // max(p.done - p.failed, 1), 1)
            shape = Shape(shared, max(prompt - shared, 1), self._answer_tokens(), p.total)
            fitted = plan(shape, groups, block, kv["budget_bytes"], 0, (1.0, 1.0, 1.0))
            limit = max(1, min(cap, fitted.concurrency))
        p.limit = p.planned = limit
        p.lowest_limit = limit

    def _cap(self) -> int:
        """`max_inflight` is per engine: a Ray job's target has several."""
        return max(1, self.settings.max_inflight) * max(self.target.workers, 1)

    def _answer_tokens(self) -> int:
        sampling = self.settings.defaults.sampling
        asked = sampling.get("max_completion_tokens") or sampling.get("max_tokens")
        seen = self.progress.completion_tokens // max(self.progress.done, 1)
        return int(asked) if asked else max(seen * 2, 64)

    def _names(self) -> tuple[str, str]:
        """The job's model as a line names it and as a server lists it ('m' -> 'm:latest')."""
        model = self.scan.model or ""
        return model, model if ":" in model else f"{model}:latest"

    async def _digest(self) -> str | None:
        tags = await self.target.get("/api/tags")
        for entry in (tags or {}).get("models", []):
            if {entry.get("name"), entry.get("model")} & set(self._names()):
                return entry.get("digest")
        return None

    async def _stats_doc(self) -> dict[str, Any] | None:
        """/api/stats, or None from a target without it (not an accordion)."""
        doc = await self.target.get("/api/stats")
        self._sampled_at = (doc or {}).get("t") or 0.0
        return doc

    def _model_in(self, doc: dict[str, Any] | None) -> dict[str, Any] | None:
        models = (doc or {}).get("models") or {}
        key = next((k for k in self._names() if k in models), None)
        if key is None and len(models) == 1:
            key = next(iter(models))
        return models.get(key) if key else None

    async def model_stats(self) -> dict[str, Any] | None:
        """The target's numbers for the job's model (accordion's /api/stats), if it has them."""
        return self._model_in(await self._stats_doc())

    async def _first_stats(self) -> dict[str, Any] | None:
        """Stats are sampled once a second: a model just loaded may not be in them yet."""
        for _ in range(12):
            doc = await self._stats_doc()
            stats = self._model_in(doc)
            if stats is not None or doc is None or not self.progress.finished_here:
                return stats
            await asyncio.sleep(0.25)
        return None

    async def _last_stats(self) -> None:
        """The summary's preemptions: wait for a sample taken after the last request."""
        ended = time.time()
        for _ in range(12):
            if not await self._adapt(0) or self._sampled_at >= ended:
                return
            await asyncio.sleep(0.25)

    async def _adapt(self, inflight: int) -> bool:
        """Lower or raise the in-flight limit from the target's numbers; False without any."""
        stats = await self.model_stats()
        if stats is None:
            return False
        p, cap = self.progress, self._cap()
        kv = stats["kv"]
        p.kv_used_bytes, p.kv_budget_bytes = kv["used_bytes"], kv["budget_bytes"]
        p.kv_bytes_per_token = kv["bytes_per_token"]
        preempted = stats.get("preemptions", 0)
        grew = self._preempted is not None and preempted > self._preempted
        if self._preempted is not None:
            p.preemptions += max(preempted - self._preempted, 0)
        self._preempted = preempted
        if grew:
            p.limit = max(1, p.limit * 3 // 4)
        elif (
            inflight >= p.limit
            and stats.get("waiting", 0) == 0
            and kv["used_bytes"] < 0.75 * kv["budget_bytes"]
        ):
            p.limit = min(cap, p.limit + max(1, p.limit // 8))
        p.lowest_limit = min(p.lowest_limit or p.limit, p.limit)
        return True


def error_of(status: int, body: Any) -> dict[str, str]:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return {"code": str(error.get("type") or status), "message": str(error.get("message"))}
    return {"code": str(status), "message": str(error if error is not None else body)}
