"""A request's state inside the engine: tokens, cache blocks, progress, output."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from accordion.sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    limit: int  # context limit: prompt + output never exceed it
    generator: torch.Generator
    id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(default_factory=list)  # prompt, then output
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str = ""  # output text emitted so far (stop strings removed)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def blocks_needed(self, upto: int, block_size: int) -> int:
        """Extra blocks to hold `upto` tokens."""
        return max(0, -(-upto // block_size) - len(self.blocks))
