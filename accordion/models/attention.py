"""Attention over a paged KV cache: the one place a faster backend slots in.

Every step runs a flat batch of tokens from many sequences (decode tokens and
prefill chunks mixed). K/V of the new tokens are written to their cache slots;
then each sequence attends to its own blocks. A layer's cache is head-major,
[kv_heads, slots, head_dim] with slot = block * block_size + offset. On CPU we
take a view when a sequence's blocks are consecutive in the pool (the common
case: the pool extends a sequence with the block after its last), and call
`scaled_dot_product_attention`. With the native ops every token, decode or
prefill, goes to the paged kernel (native/attention.cpp), which reads every
block where it lies and computes each query alone. Without them, a decode token
whose table is a few runs attends to each run through a view and merges the
parts by their log-sum-exp, and what is more
scattered is gathered (a copy of the whole context, which at 4k tokens costs as
much as the attention itself). A CUDA backend would replace `attend` with a
paged kernel reading the same block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from accordion.models.batched_decode import (
    DecodeGather,
    PagedPlan,
    attend_gathered_into,
    attend_paged,
    decode_gather,
    gather_slots,
    kernel_fits,
    paged_plan,
)

MAX_RUNS = 4  # runs of blocks a decode token reads through views; past this, gather
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # also returns the LSE


@dataclass
class SeqSlice:
    """One sequence's share of a step."""

    q_start: int  # index of its first new token in the flat batch
    q_len: int  # new tokens this step
    ctx_len: int  # tokens it holds after this step (cached + new)
    blocks: list[int]  # block table (for a window group: only the blocks still held)
    start_pos: int = 0  # position of the first token of blocks[0]
    _slots: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _spans: dict[int, list[tuple[int, int]]] = field(default_factory=dict, repr=False)

    def key_slots(self, lo: int, hi: int, block_size: int) -> torch.Tensor:
        """Cache slots of positions [lo, hi), built once per step and shared by all layers."""
        if lo not in self._slots:
            blocks = torch.tensor(self.blocks, dtype=torch.long)
            pos = torch.arange(lo, hi) - self.start_pos
            self._slots[lo] = blocks[pos // block_size] * block_size + pos % block_size
        return self._slots[lo]

    def key_spans(self, lo: int, hi: int, block_size: int) -> list[tuple[int, int]]:
        """Slot ranges [a, b) holding positions [lo, hi) in order: one per run of
        consecutive block ids. Built once per step and shared by all layers."""
        if lo not in self._spans:
            spans: list[tuple[int, int]] = []
            first = (lo - self.start_pos) // block_size
            last = -(-(hi - self.start_pos) // block_size)
            for j in range(first, last):
                pos_a = max(lo, self.start_pos + j * block_size)
                pos_b = min(hi, self.start_pos + (j + 1) * block_size)
                a = self.blocks[j] * block_size + (pos_a - self.start_pos) % block_size
                if spans and spans[-1][1] == a:
                    spans[-1] = (spans[-1][0], a + pos_b - pos_a)
                else:
                    spans.append((a, a + pos_b - pos_a))
            self._spans[lo] = spans
        return self._spans[lo]


@dataclass
class AttentionBatch:
    """What attention needs for one layer group in one step."""

    slots: torch.Tensor  # long [T]: block_id * block_size + offset for each new token
    seqs: list[SeqSlice]
    block_size: int
    _masks: dict[tuple[int, int], torch.Tensor | None] = field(default_factory=dict, repr=False)
    # per window, built on first use and shared by all layers (see batched_decode)
    gather_plans: dict[int, DecodeGather | None] = field(default_factory=dict, repr=False)
    paged_plans: dict[int, PagedPlan] = field(default_factory=dict, repr=False)

    def key_range(self, s: SeqSlice, window: int) -> tuple[int, int]:
        """Absolute positions [lo, hi) of the keys any new token of `s` may see."""
        lo = s.start_pos
        if window:
            lo = max(lo, s.ctx_len - s.q_len - window + 1)
        return lo, s.ctx_len

    def spans(self, s: SeqSlice, window: int) -> list[tuple[int, int]]:
        return s.key_spans(*self.key_range(s, window), self.block_size)

    def mask(self, i: int, window: int) -> torch.Tensor | None:
        """Boolean [q_len, keys] mask (True = attend), built once and shared by all layers."""
        key = (i, window)
        if key not in self._masks:
            s = self.seqs[i]
            lo, hi = self.key_range(s, window)
            if s.q_len == 1:
                m = None
            else:
                qpos = torch.arange(hi - s.q_len, hi).unsqueeze(1)
                kpos = torch.arange(lo, hi).unsqueeze(0)
                m = kpos <= qpos
                if window:
                    m &= qpos - kpos < window
            self._masks[key] = m
        return self._masks[key]


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Store the new tokens' K/V ([T, kv_heads, head_dim]) at their slots."""
    k_cache.index_copy_(1, slots, k.transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(1, slots, v.transpose(0, 1).to(v_cache.dtype))


def _keys(cache: torch.Tensor, s: SeqSlice, lo: int, hi: int, block_size: int) -> torch.Tensor:
    """[1, kv_heads, hi - lo, head_dim] keys or values of positions [lo, hi) of `s`."""
    spans = s.key_spans(lo, hi, block_size)
    if len(spans) == 1:  # consecutive blocks: a view, nothing copied
        return cache[:, spans[0][0] : spans[0][1]].unsqueeze(0)
    return gather_slots(cache, s.key_slots(lo, hi, block_size)).unsqueeze(0)


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    window: int = 0,
    native: bool = False,
) -> torch.Tensor:
    """q [T, heads, head_dim] -> [T, heads, head_dim] attending over each sequence's cache.
    `native`: every token goes to native/attention.cpp, decode or prefill, which
    computes each alone, so a token's numbers depend neither on its batch nor on
    how its prompt was cut in chunks."""
    if native and kernel_fits(q.shape[-1], q.shape[1], k_cache.shape[0]):
        return attend_paged(q, k_cache, v_cache, paged_plan(batch, window), scale)
    if len(batch.seqs) == 1:  # one sequence: its output is the whole output, no copy
        return _attend_one(q, k_cache, v_cache, batch, 0, scale, window).transpose(0, 1)
    out = torch.empty_like(q)
    done = attend_gathered_into(out, q, k_cache, v_cache, decode_gather(batch, window), scale)
    for i, s in enumerate(batch.seqs):
        if i not in done:
            o = _attend_one(q, k_cache, v_cache, batch, i, scale, window)
            out[s.q_start : s.q_start + s.q_len] = o.transpose(0, 1)
    return out


def _attend_one(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    i: int,
    scale: float,
    window: int,
) -> torch.Tensor:
    """[heads, q_len, head_dim]: sequence i's new tokens attending over its keys."""
    s, bs = batch.seqs[i], batch.block_size
    lo, hi = batch.key_range(s, window)
    qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0)
    spans = batch.spans(s, window)
    if s.q_len == 1 and 1 < len(spans) <= MAX_RUNS:
        return _attend_runs(qs, k_cache, v_cache, spans, scale)[0]
    o = F.scaled_dot_product_attention(
        qs,
        _keys(k_cache, s, lo, hi, bs),
        _keys(v_cache, s, lo, hi, bs),
        attn_mask=batch.mask(i, window),
        scale=scale,
        enable_gqa=True,
    )
    return o[0]


def _attend_runs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    spans: list[tuple[int, int]],
    scale: float,
) -> torch.Tensor:
    """One decode query [1, heads, 1, d] over several runs of keys: each run through a
    view, the partial outputs weighted by the softmax of their log-sum-exps."""
    parts = [
        _flash(q, k_cache[:, a:b].unsqueeze(0), v_cache[:, a:b].unsqueeze(0), scale=scale)
        for a, b in spans
    ]
    outs = torch.stack([o for o, _ in parts])  # [runs, 1, heads, 1, d]
    weights = torch.softmax(torch.stack([lse for _, lse in parts]), dim=0)  # [runs, 1, heads, 1]
    return (outs.float() * weights.unsqueeze(-1)).sum(0).to(q.dtype)
