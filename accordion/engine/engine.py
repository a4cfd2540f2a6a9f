"""One engine per loaded model: a step loop serving every request of the model.

Callers `submit` token ids and get a RequestHandle to iterate (sync or async),
cancel, or wait on. Each step drains new requests and cancellations, schedules
decode tokens plus prefill chunks, runs them, samples, applies stops, and hands
each request its events. When idle long enough the loop shrinks the KV cache
back to its warm floor.

Who drives the loop: `run_loop` blocks and is meant for the process's main
thread (the server runs HTTP on another thread). On CPU, torch's OpenMP kernels
called from a non-main thread pay ~75 us per parallel region here (the int4
matmul: 25 us on the main thread, 100 us on another), which halves decode
speed; `start` still offers a background thread where that does not matter.
Without a loop, a handle drives `step` itself from the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import psutil
import torch

from accordion.engine.request import Event, RequestHandle
from accordion.engine.runner import run
from accordion.engine.sampler import adjust, choose, logprob_of, new_generator
from accordion.engine.scheduler import Scheduler
from accordion.engine.score import prompt_logprobs
from accordion.engine.sequence import Sequence
from accordion.engine.stops import StopStrings
from accordion.errors import InvalidRequestError, RequestCancelledError
from accordion.kv.cache import KVCache
from accordion.loader.detokenizer import IncrementalDetokenizer
from accordion.loader.model import LoadedModel
from accordion.models.embed import embed
from accordion.sampling_params import SamplingParams
from accordion.structured import Compiler, Constraint

log = logging.getLogger("accordion.engine")


@dataclass
class EngineConfig:
    kv_budget_bytes: int | None = None  # None: half of the memory available at start
    block_size: int = 16
    num_batch: int = 512  # tokens per step, decode and prefill together
    max_running: int | None = None  # optional cap on concurrent sequences
    segment_tokens: int = 32  # growth / shrink granularity of the KV cache
    warm_tokens: int = 32  # KV capacity kept when idle
    idle_shrink_s: float = 2.0


def context_of(
    model: LoadedModel, prompt_ids: list[int], params: SamplingParams, num_ctx: int | None
) -> int:
    """The request's context limit, after checking it fits (InvalidRequestError)."""
    trained = model.config.context_length
    limit = min(num_ctx or trained, trained)
    if not prompt_ids:
        raise InvalidRequestError("prompt is empty")
    if len(prompt_ids) >= limit:
        raise InvalidRequestError(
            f"prompt has {len(prompt_ids)} tokens but the context limit is {limit}"
        )
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for t in prompt_ids):  # else a row past the embedding's, or
        # a negative id numpy would wrap around to another token's row
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
    if any(not 0 <= t < vocab for t in params.logit_bias):
        raise InvalidRequestError(f"logit_bias keys must be token ids in [0, {vocab})")
    return limit


class Engine:
    remote = False  # steps in this process (process/remote.py's RemoteEngine: in another)

    def __init__(self, model: LoadedModel, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = cfg = config or EngineConfig()
        budget = cfg.kv_budget_bytes or psutil.virtual_memory().available // 2
        kv_dtype = model.decoder.kv_dtype
        self.kv = KVCache(
            model.config, budget, cfg.block_size, kv_dtype, cfg.segment_tokens, cfg.warm_tokens
        )
        num_batch = min(cfg.num_batch, model.config.context_length)
        self.scheduler = Scheduler(self.kv, num_batch, cfg.max_running)
        self._handles: dict[int, RequestHandle] = {}
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._stops: dict[int, StopStrings] = {}
        self._constraints: dict[int, Constraint] = {}
        self.grammars = Compiler(model.tokenizer, model.config.vocab_size)
        self._inbox: list[Sequence] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._step_lock = threading.Lock()
        self.looping = False
        self._stopping = False
        self.steps = 0
        self.tokens_evaluated = 0  # through the model, prefill and decode (for tokens/s)
        self.tokens_generated = 0

    # -- requests ------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        num_ctx: int | None = None,
        background: bool = False,
    ) -> RequestHandle:
        params = params or SamplingParams()
        limit = context_of(self.model, prompt_ids, params, num_ctx)
        generator = new_generator(params.seed)
        seq = Sequence(list(prompt_ids), params, limit, generator, background=background)
        # compiled here, so a bad grammar fails the call; callers on an event loop
        # compile first in a worker (`grammars.compile`), leaving a cache hit for this
        constraint = self.grammars.start(params.grammar) if params.grammar else None
        handle = RequestHandle(seq, self)
        with self._lock:
            self._handles[seq.id] = handle
            if constraint is not None:
                self._constraints[seq.id] = constraint
            self._detok[seq.id] = IncrementalDetokenizer(self.model.tokenizer, prompt_ids)
            self._stops[seq.id] = StopStrings(params.stop)
            self._inbox.append(seq)
        self._wake.set()
        return handle

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True  # acted on at the start of the next step
        self._wake.set()

    def cancel_all(self) -> bool:
        """Cancel every request (their final events follow); True if there were any."""
        with self._lock:
            busy = self._all() + list(self._inbox)
        for seq in busy:
            self.cancel(seq)
        return bool(busy)

    def score(self, ids: list[int], top: int) -> list:
        """Teacher-forced logprobs of a prompt's tokens (OpenAI's echo)."""
        return prompt_logprobs(self.model.decoder, ids, top)

    def embed(self, ids: list[int]) -> list[float]:
        return embed(self.model.decoder, ids)

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work()

    # -- the loop ------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop on a background thread (slower on CPU: see the module doc)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.run_loop, name="accordion-engine", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def run_loop(self) -> None:
        """Step while there is work, shrink when idle; returns after `stop`."""
        self.looping, self._stopping = True, False
        try:
            self._loop()
        finally:
            self.looping = False

    def _loop(self) -> None:
        idle_since: float | None = None
        while not self._stopping:
            if self.has_work():
                idle_since = None
                try:
                    self.step()
                except Exception as e:  # a bug must fail its requests, not hang them
                    log.exception("engine step failed")
                    self.fail_all(e)
                continue
            now = time.perf_counter()
            if idle_since is None:
                idle_since = now
            elif now - idle_since >= self.config.idle_shrink_s:
                self.kv.shrink()
                idle_since = float("inf")  # once per idle period
            self._wake.wait(timeout=0.1 if idle_since != float("inf") else None)
            self._wake.clear()

    def step(self) -> list[Event]:
        """Admit new requests, apply cancellations, run one batch; return its events."""
        with self._step_lock:
            return self._step()

    def _step(self) -> list[Event]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for seq in inbox:
            self.scheduler.add(seq)
        events = [self._cancel(s) for s in self._all() if s.cancelled]
        work = self.scheduler.schedule()
        events += [self._end(s, "error", "") for s in self.scheduler.failed]
        self.scheduler.failed.clear()
        if work:
            now = time.perf_counter()
            for w in work:
                w.seq.first_scheduled = w.seq.first_scheduled or now
            try:
                logits, sampled = run(self.model.decoder, self.kv, work)
            except Exception as e:  # attributed to this step's sequences; the rest go on
                log.exception("forward step failed; failing its %d sequences", len(work))
                events += [self._fail(w.seq, e) for w in work]
            else:
                self.steps += 1
                self.tokens_evaluated += sum(w.n for w in work)
                events += [
                    self._advance_one(s, row) for s, row in zip(sampled, logits, strict=True)
                ]
        for event in events:
            self._deliver(event)
        return events

    def _deliver(self, event: Event) -> None:
        handle = self._handles.get(event.seq.id)
        if handle is not None:
            handle.push(event)
        if event.finished:
            self._forget(event.seq)

    def _all(self) -> list[Sequence]:
        return list(self.scheduler.running) + list(self.scheduler.waiting)

    # -- outcomes ------------------------------------------------------------------
    def _advance_one(self, seq: Sequence, logits: torch.Tensor) -> Event:
        """One sequence's next token; a failure here ends that sequence alone."""
        try:
            return self._advance(seq, logits)
        except Exception as e:
            log.exception("sampling failed seq=%d", seq.id)
            return self._fail(seq, e)

    def _fail(self, seq: Sequence, error: Exception) -> Event:
        seq.error = error
        return self._end(seq, "error", "", flush=False)

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> Event:
        p = seq.params
        if p.max_tokens == 0:
            return self._end(seq, "length", "")
        constraint = self._constraints.get(seq.id)
        if constraint is not None:
            logits = constraint.mask(logits)
        logits = adjust(logits, p, seq.token_ids)
        token = choose(logits, p, seq.generator)
        seq.first_token = seq.first_token or time.perf_counter()
        if token in self.model.tokenizer.eog_ids and not p.ignore_eos:
            return self._end(seq, "stop", "")
        if constraint is not None:
            constraint.advance(token)
        if p.logprobs is not None:
            seq.logprobs.append(logprob_of(logits, token, p.logprobs))
        seq.token_ids.append(token)
        seq.generated.append(token)
        self.tokens_generated += 1
        text, hit = self._stops[seq.id].feed(self._detok[seq.id].add(token))
        seq.text += text
        if hit:
            return self._end(seq, "stop", text, token, flush=False)
        if constraint is not None and constraint.finished:  # the grammar's output is whole
            return self._end(seq, "stop", text, token)
        if p.max_tokens is not None and len(seq.generated) >= p.max_tokens:
            return self._end(seq, "length", text, token)
        if len(seq.token_ids) >= seq.limit:
            if not p.shift:
                return self._end(seq, "length", text, token)
            self._shift(seq)
        return Event(seq, text, token, False)

    def _shift(self, seq: Sequence) -> None:
        """Context full: keep num_keep tokens and the newer half of the rest, recompute."""
        keep = min(seq.params.num_keep, seq.limit // 2)
        drop = (len(seq.token_ids) - keep) // 2
        seq.token_ids = seq.token_ids[:keep] + seq.token_ids[keep + drop :]
        seq.shifts += 1
        self.scheduler.requeue(seq)  # its cache no longer matches: prefill the kept tokens

    def _end(
        self, seq: Sequence, reason: str, text: str, token: int | None = None, flush: bool = True
    ) -> Event:
        if flush and reason != "error":  # release held bytes and held stop-prefix text
            stops = self._stops[seq.id]
            tail, _ = stops.feed(self._detok[seq.id].flush())
            tail += stops.flush()
            seq.text += tail
            text += tail
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        seq.finished_at = time.perf_counter()
        return Event(seq, text, token, True)

    def _cancel(self, seq: Sequence) -> Event:
        seq.error = RequestCancelledError("request cancelled")
        return self._end(seq, "cancelled", "", flush=False)

    def fail_all(self, error: Exception) -> None:
        """End every request with `error` (the model itself failed)."""
        for seq in self._all():
            self._deliver(self._fail(seq, error))

    def _forget(self, seq: Sequence) -> None:
        self._handles.pop(seq.id, None)
        self._detok.pop(seq.id, None)
        self._stops.pop(seq.id, None)
        self._constraints.pop(seq.id, None)

    # -- memory --------------------------------------------------------------------
    def kv_stats(self) -> dict:
        stats = self.kv.stats()
        stats["running"] = len(self.scheduler.running)
        stats["waiting"] = len(self.scheduler.waiting)
        stats["preemptions"] = self.scheduler.preemptions
        return stats
