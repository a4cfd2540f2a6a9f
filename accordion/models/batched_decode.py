"""Query tokens of many sequences attended in one call per layer.

Natively (native/attention.cpp) every query token, decode or prefill, reads its
keys where they lie in the paged cache. Without the native ops scattered decode
tokens are gathered into one padded batch for a single
scaled_dot_product_attention call; sequences whose blocks are one run attend
through views instead (see attention._attend_one). Plans are built once per
step and layer group and shared by all its layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
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
class PagedPlan:
    """Every query token of a step for native/attention.cpp, which reads each one's
    keys from the cache in place, run by run: no gather, one call per layer."""

    spans: torch.Tensor  # long [n, 2]: slot ranges [a, b), each sequence's in order
    ranges: torch.Tensor  # long [T, 4]: a query's runs [first, last) and keys [lo, hi)


def paged_plan(batch: AttentionBatch, window: int) -> PagedPlan:
    """Built once per step and window, shared by all layers. A query at position p
    sees the keys [p - window + 1, p] (all from the sequence's first with no window),
    as a decode step of that token alone would: its result depends on it alone."""
    if window in batch.paged_plans:
        return batch.paged_plans[window]
    spans: list[tuple[int, int]] = []
    ranges = []
    for s in batch.seqs:
        lo, hi = batch.key_range(s, window)
        first = len(spans)
        spans += batch.spans(s, window)
        pos = np.arange(hi - s.q_len, hi)  # the new tokens' positions
        keys_lo = np.maximum(pos - window + 1, s.start_pos) if window else np.full_like(pos, lo)
        block = np.empty((s.q_len, 4), np.int64)
        block[:, 0], block[:, 1] = first, len(spans)
        block[:, 2], block[:, 3] = keys_lo - lo, pos + 1 - lo
        ranges.append(block)
    plan = PagedPlan(
        torch.tensor(spans, dtype=torch.long), torch.from_numpy(np.concatenate(ranges))
    )
    batch.paged_plans[window] = plan
    return plan


def gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[:, slots] as a new [kv_heads, len(slots), head_dim] tensor."""
    out = cache.new_empty(cache.shape[0], len(slots), cache.shape[2])
    for h in range(cache.shape[0]):  # a head at a time: 2x faster than index_select on dim 1
        torch.index_select(cache[h], 0, slots, out=out[h])
    return out


def kernel_fits(head_dim: int, heads: int, kv_heads: int) -> bool:
    """What native/attention.cpp handles: head_dim 16, 32, 64, 128 or 256 and at most
    16 query heads per kv head."""
    return head_dim in (16, 32, 64, 128, 256) and heads // kv_heads <= 16


def attend_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: PagedPlan,
    scale: float,
) -> torch.Tensor:
    return torch.ops.accordion.paged_attention(q, k_cache, v_cache, plan.spans, plan.ranges, scale)


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
