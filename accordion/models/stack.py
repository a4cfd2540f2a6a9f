"""A step's blocks in one native call (native/stack.cpp).

The decoder's loop calls three native ops per block (queries, attention, finish);
at one decode token the ~90 trips a step through the interpreter and the op
dispatcher cost about as much as the attention itself. The stack holds every
block's weights once and runs those same functions in C++, so its bits are the
loop's (tests/test_native.py holds them equal). What changes per step, the
caches, slots and attention plans, comes in one call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from accordion import native
from accordion.models.batched_decode import kernel_fits, paged_plan

if TYPE_CHECKING:
    from accordion.models.decoder import Decoder, ForwardBatch, PagedKV


class NativeStack:
    def __init__(self, decoder: Decoder) -> None:
        cfg = decoder.cfg
        self.stack = torch.classes.accordion.Stack(
            cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_interleaved, cfg.attn_scale
        )
        self.blocks = list(decoder.blocks)
        self.bases = list(decoder.ropes)  # a step's RoPE tables, in this order
        for i, block in enumerate(self.blocks):
            rope = self.bases.index(decoder.rope_base(i))
            self.stack.add(*block._native_q, *block._native_f, rope)

    @staticmethod
    def fits(decoder: Decoder) -> bool:
        """Whether every block runs natively and the paged kernel takes the heads
        (else the loop runs, as attention.attend decides per call)."""
        cfg = decoder.cfg
        return (
            native.available()
            and all(b.native for b in decoder.blocks)
            and kernel_fits(cfg.head_dim, cfg.n_heads, cfg.n_kv_heads)
        )

    def run(
        self,
        x: torch.Tensor,
        tables: dict[float, tuple[torch.Tensor, torch.Tensor]],
        batch: ForwardBatch,
        kv: PagedKV,
    ) -> torch.Tensor:
        """The residual stream after every block: per block its caches, its group's
        slots and the attention plan of its (group, window), each plan built once."""
        caches: list[torch.Tensor] = []
        plans: list[torch.Tensor] = []
        slot_of: list[int] = []
        plan_of: list[int] = []
        index: dict[tuple[int, int], int] = {}
        for i, block in enumerate(self.blocks):
            caches += kv.layer(i)
            group = kv.group_of(i)
            key = (group, block.window)
            if key not in index:
                index[key] = len(index)
                plan = paged_plan(batch.attn[group], block.window)
                plans += [plan.spans, plan.ranges]
            slot_of.append(group)
            plan_of.append(index[key])
        flat = [t for base in self.bases for t in tables[base]]
        slots = [a.slots for a in batch.attn]
        return self.stack.run(x, flat, caches, slots, plans, slot_of, plan_of)
