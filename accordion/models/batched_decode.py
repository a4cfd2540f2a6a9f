"""Decode tokens of many sequences attended in one call per layer.

Natively (native/attention.cpp) each sequence's keys are read where they lie in
the paged cache. Without the native ops the scattered ones are gathered into one
padded batch for a single scaled_dot_product_attention call; sequences whose
blocks are one run attend through views instead (see attention._attend_one).
Plans are built once per step and layer group and shared by all its layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from accordion.models.attention import AttentionBatch


@dataclass
class DecodeGather:
    """Decode sequences (one new token each) attended in one padded batch.

    Only sequences whose blocks are not one run are gathered: the others attend
    through views, which copies nothing (a per-sequence call costs about as much
    as the gather at 300 keys and less beyond). A lone scattered sequence merges
    its runs instead (see attention._attend_one).
    """

    members: list[int]  # indices into AttentionBatch.seqs
    rows: torch.Tensor  # long [B]: their rows in the flat batch
    slots: torch.Tensor  # long [B * L]: cache slot of each key, padded with slot 0
    mask: torch.Tensor  # bool [B, 1, 1, L]: real keys
    width: int  # L


def decode_gather(batch: AttentionBatch, window: int) -> DecodeGather | None:
    """Built once per step and window, shared by all layers; None for fewer than 2."""
    if window in batch.gather_plans:
        return batch.gather_plans[window]
    members = [
        i for i, s in enumerate(batch.seqs) if s.q_len == 1 and len(batch.spans(s, window)) > 1
    ]
    gather = None
    if len(members) >= 2:
        spans = []
        for i in members:
            s = batch.seqs[i]
            spans.append(s.key_slots(*batch.key_range(s, window), batch.block_size))
        width = max(len(x) for x in spans)
        slots = torch.zeros(len(spans), width, dtype=torch.long)
        mask = torch.zeros(len(spans), 1, 1, width, dtype=torch.bool)
        for j, x in enumerate(spans):
            slots[j, : len(x)] = x
            mask[j, ..., : len(x)] = True
        rows = torch.tensor([batch.seqs[i].q_start for i in members], dtype=torch.long)
        gather = DecodeGather(members, rows, slots.view(-1), mask, width)
    batch.gather_plans[window] = gather
    return gather


@dataclass
class PagedDecode:
    """Decode sequences (one new token each) for native/attention.cpp, which reads
    their keys from the cache in place, span by span: no gather, one call per layer."""

    rows: torch.Tensor | None  # long [B]: their rows in the flat batch; None = all, in order
    members: list[int]
    spans: torch.Tensor  # long [n, 2]: slot ranges [a, b), each sequence's in order
    offsets: torch.Tensor  # long [B + 1]: sequence i owns spans[offsets[i]:offsets[i + 1]]


def paged_decode(batch: AttentionBatch, window: int) -> PagedDecode | None:
    """Built once per step and window, shared by all layers; None without decode tokens."""
    if window in batch.paged_plans:
        return batch.paged_plans[window]
    members = [i for i, s in enumerate(batch.seqs) if s.q_len == 1]
    plan = None
    if members:
        spans, offsets = [], [0]
        for i in members:
            spans += batch.spans(batch.seqs[i], window)
            offsets.append(len(spans))
        rows = [batch.seqs[i].q_start for i in members]
        plan = PagedDecode(
            None if rows == list(range(len(batch.slots))) else torch.tensor(rows),
            members,
            torch.tensor(spans, dtype=torch.long),
            torch.tensor(offsets, dtype=torch.long),
        )
    batch.paged_plans[window] = plan
    return plan


def gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[:, slots] as a new [kv_heads, len(slots), head_dim] tensor."""
    out = cache.new_empty(cache.shape[0], len(slots), cache.shape[2])
    for h in range(cache.shape[0]):  # a head at a time: 2x faster than index_select on dim 1
        torch.index_select(cache[h], 0, slots, out=out[h])
    return out


def kernel_fits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """What native/attention.cpp handles: head_dim 16, 32, 64, 128 or 256 and at most
    16 query heads per kv head."""
    d, group = q.shape[-1], q.shape[1] // k_cache.shape[0]
    return d in (16, 32, 64, 128, 256) and group <= 16


def attend_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: PagedDecode,
    scale: float,
) -> torch.Tensor:
    qs = q if plan.rows is None else q.index_select(0, plan.rows)
    return torch.ops.accordion.decode_attention(
        qs, k_cache, v_cache, plan.spans, plan.offsets, scale
    )


def attend_paged_into(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: PagedDecode | None,
    scale: float,
) -> set[int]:
    """The decode tokens' rows of `out`; returns the sequences done."""
    if plan is None:
        return set()
    assert plan.rows is not None
    out.index_copy_(0, plan.rows, attend_paged(q, k_cache, v_cache, plan, scale))
    return set(plan.members)


def attend_gathered_into(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    gather: DecodeGather | None,
    scale: float,
) -> set[int]:
    """Every scattered decode token in one padded call: one gather, one kernel."""
    if gather is None:
        return set()
    n_kv, b, d = k_cache.shape[0], len(gather.members), k_cache.shape[-1]

    def gathered(cache: torch.Tensor) -> torch.Tensor:  # [B, kv_heads, L, head_dim]
        keys = gather_slots(cache, gather.slots)
        return keys.view(n_kv, b, gather.width, d).transpose(0, 1)

    qs = q.index_select(0, gather.rows).unsqueeze(2)  # [B, heads, 1, d]
    o = F.scaled_dot_product_attention(
        qs,
        gathered(k_cache),
        gathered(v_cache),
        attn_mask=gather.mask,
        scale=scale,
        enable_gqa=True,
    )
    out.index_copy_(0, gather.rows, o.squeeze(2))
    return set(gather.members)
