"""A request's state inside the engine: tokens, progress, output, accounting."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from accordion.sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    """One position's log-probabilities: the chosen token's and the most likely ones."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    limit: int  # context limit: prompt + output never exceed it
    generator: torch.Generator
    id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(default_factory=list)  # what the model sees: prompt, output
    generated: list[int] = field(default_factory=list)  # every output token, shifts or not
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    opened: bool = False  # holds blocks in the KV cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: Exception | None = None
    text: str = ""  # output text emitted so far (stop strings removed)
    logprobs: list[Logprob] = field(default_factory=list)  # one per output token, if asked
    cancelled: bool = False
    background: bool = False  # a batch's request: interactive ones are admitted first
    # accounting
    cached_tokens: int = 0  # prompt tokens served from the prefix cache on admission
    evaluated_tokens: int = 0  # tokens run through the model (recomputation included)
    preemptions: int = 0
    shifts: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    finished_at: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.generated

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def timings(self) -> dict[str, float]:
        """Seconds spent queued, in prefill (to the first token) and decoding."""
        start = self.first_scheduled or self.arrival
        first = self.first_token or self.finished_at or start
        end = self.finished_at or time.perf_counter()
        return {"queue": start - self.arrival, "prefill": first - start, "decode": end - first}
