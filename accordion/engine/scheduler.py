"""Which sequences run this step, and how many tokens each: admission and preemption.

Decode tokens of running sequences come first, then prefill chunks of waiting
ones, up to `num_batch` tokens. Admission asks the KV cache for the blocks the
step needs now (after prefix hits), never for a context size. When a running
sequence cannot grow, the most recently admitted one is preempted: its blocks
go back (full ones stay cached) and it waits at the front to be recomputed.
Waiting interactive requests go before waiting background (batch) ones.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from accordion.engine.sequence import Sequence, Status
from accordion.errors import RequestTooLargeError
from accordion.kv.cache import KVCache


@dataclass
class Work:
    seq: Sequence
    n: int  # tokens to compute this step, starting at seq.num_computed


class Scheduler:
    def __init__(self, kv: KVCache, num_batch: int, max_running: int | None = None) -> None:
        self.kv = kv
        self.num_batch = num_batch
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.failed: list[Sequence] = []  # finished by the scheduler itself (too large)
        self.preemptions = 0  # ever, for the stats

    def add(self, seq: Sequence) -> None:
        """Interactive requests queue ahead of background (batch) ones that have not
        started, so a chat arriving during a batch is not stuck behind it."""
        if not seq.background:
            for i, other in enumerate(self.waiting):
                if other.background and not other.opened:
                    self.waiting.insert(i, seq)
                    return
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Work]:
        work: list[Work] = []
        budget = self.num_batch
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed, budget)
            if self._make_room(seq, n):
                work.append(Work(seq, n))
                budget -= n
        while self.waiting and budget > 0:
            if self.max_running and len(self.running) >= self.max_running:
                break
            seq = self.waiting[0]
            if not seq.opened:
                hit = self.kv.open(seq.id, seq.token_ids)
                seq.opened, seq.num_computed = True, hit
                if self.kv.coming_soon(seq.id) and (self.running or work):
                    self._close(seq)  # another sequence is computing our prefix: share it
                    break
                if seq.preemptions == 0 and seq.shifts == 0:  # the first admission
                    seq.cached_tokens = min(hit, len(seq.prompt_ids))
            n = min(seq.num_uncomputed, budget)
            if not self.kv.try_reserve(seq.id, seq.num_computed, seq.num_computed + n):
                self._close(seq)
                if not self.running and not work:  # nothing else holds memory: it never fits
                    self.waiting.popleft()
                    self._fail(seq)
                    continue
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            work.append(Work(seq, n))
            budget -= n
        return work

    def _make_room(self, seq: Sequence, n: int) -> bool:
        """Preempt the newest sequences until `seq` holds its blocks; False if `seq` went."""
        while not self.kv.try_reserve(seq.id, seq.num_computed, seq.num_computed + n):
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                self.running.remove(seq)
                self._fail(seq)
                return False
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        self.requeue(seq)
        seq.preemptions += 1
        self.preemptions += 1

    def requeue(self, seq: Sequence) -> None:
        """Give back its blocks and wait at the front to be recomputed."""
        self.running.remove(seq)
        self._close(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._close(seq)
        seq.status = Status.FINISHED

    def _close(self, seq: Sequence) -> None:
        if seq.opened:
            self.kv.close(seq.id)
        seq.opened, seq.num_computed = False, 0

    def _fail(self, seq: Sequence) -> None:
        self._close(seq)
        budget_tokens = self.kv.budget_bytes // self.kv.bytes_per_token
        seq.error = RequestTooLargeError(len(seq.token_ids) + 1, budget_tokens)
        seq.status, seq.finish_reason = Status.FINISHED, "error"
        self.failed.append(seq)
