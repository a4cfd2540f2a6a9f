"""The step loop: schedule decode tokens and prefill chunks, run, sample, stop."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from accordion.engine.runner import Work, run
from accordion.engine.sampler import new_generator, sample_one
from accordion.engine.sequence import Sequence, Status
from accordion.engine.stops import StopStrings
from accordion.kv.block_pool import BlockPool
from accordion.kv.cache import KVCache
from accordion.loader.detokenizer import IncrementalDetokenizer
from accordion.loader.model import LoadedModel
from accordion.sampling_params import SamplingParams


@dataclass
class Event:
    """What one step produced for one sequence."""

    seq: Sequence
    text: str  # new output text (may be empty)
    token_id: int | None
    finished: bool


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        num_blocks: int = 1024,
        block_size: int = 16,
        num_batch: int = 512,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.num_batch = num_batch
        self.pool = BlockPool(num_blocks)
        self.kv = KVCache(model.config, num_blocks, block_size, model.decoder.dtype)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._stops: dict[int, StopStrings] = {}

    # -- requests -------------------------------------------------------------
    def add(
        self, prompt_ids: list[int], params: SamplingParams, num_ctx: int | None = None
    ) -> Sequence:
        limit = min(num_ctx or self.model.config.context_length, self.model.config.context_length)
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, context limit is {limit}")
        seq = Sequence(prompt_ids, params, limit, new_generator(params.seed))
        self._detok[seq.id] = IncrementalDetokenizer(self.model.tokenizer)
        self._stops[seq.id] = StopStrings(params.stop)
        self.waiting.append(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling -----------------------------------------------------------
    def _reserve(self, seq: Sequence, upto: int) -> bool:
        need = seq.blocks_needed(upto, self.block_size)
        if not self.pool.can_allocate(need):
            return False
        seq.blocks.extend(self.pool.allocate(need))
        return True

    def schedule(self) -> list[Work]:
        work: list[Work] = []
        budget = self.num_batch
        for seq in self.running:  # decode first: running sequences never starve
            if budget == 0:
                break
            n = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, seq.num_computed + n):
                raise MemoryError("KV cache full")  # elastic growth and preemption: engine issue
            work.append(Work(seq, n))
            budget -= n
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, seq.num_computed + n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            work.append(Work(seq, n))
            budget -= n
        return work

    # -- one step -------------------------------------------------------------
    def step(self) -> list[Event]:
        work = self.schedule()
        if not work:
            if self.waiting:
                raise MemoryError("KV cache cannot hold the next prompt")
            return []
        logits, sampled = run(self.model.decoder, self.kv, work, self.block_size)
        return [self._advance(seq, row) for seq, row in zip(sampled, logits, strict=True)]

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> Event:
        p = seq.params
        if p.max_tokens == 0:
            return self._finish(seq, "length", "", None)
        token = sample_one(logits, p, seq.token_ids, seq.generator)
        if token in self.model.tokenizer.eog_ids and not p.ignore_eos:
            return self._finish(seq, "stop", "", None)
        seq.token_ids.append(token)
        piece = self._detok[seq.id].add(token)
        text, hit = self._stops[seq.id].feed(piece)
        seq.text += text
        if hit:
            return self._finish(seq, "stop", text, token)
        n_out = len(seq.token_ids) - len(seq.prompt_ids)
        if (p.max_tokens is not None and n_out >= p.max_tokens) or len(seq.token_ids) >= seq.limit:
            return self._finish(seq, "length", text, token)
        return Event(seq, text, token, False)

    def _finish(self, seq: Sequence, reason: str, text: str, token: int | None) -> Event:
        if reason != "stop" or token is None:  # a stop string already cut the tail
            tail, _ = self._stops[seq.id].feed(self._detok[seq.id].flush())
            tail += self._stops[seq.id].flush()
            seq.text += tail
            text += tail
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.running.remove(seq)
        self.pool.deallocate(seq.blocks)
        seq.blocks = []
        del self._detok[seq.id], self._stops[seq.id]
        return Event(seq, text, token, True)
