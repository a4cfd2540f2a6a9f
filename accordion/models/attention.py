"""Attention over a paged KV cache: the one place a faster backend slots in.

Every step runs a flat batch of tokens from many sequences (decode tokens and
prefill chunks mixed). K/V of the new tokens are written to their cache slots;
then each sequence attends to its own blocks. A layer's cache is head-major,
[kv_heads, slots, head_dim] with slot = block * block_size + offset. On CPU we
take a view when a sequence's blocks are consecutive in the pool (the common
case: the pool extends a sequence with the block after its last), and call
`scaled_dot_product_attention`. A decode token whose table is a few runs
attends to each run through a view and merges the parts by their log-sum-exp;
only what is more scattered is gathered (a copy of the whole context, which at
4k tokens costs as much as the attention itself). A CUDA backend would replace
`attend` with a paged kernel reading the same block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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
    _decode: dict[int, DecodeGather | None] = field(default_factory=dict, repr=False)

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


@dataclass
class DecodeGather:
    """Decode sequences (one new token each) attended in one padded batch.

    Only sequences whose blocks are not one run are gathered: the others attend
    through views, which copies nothing (a per-sequence call costs about as much
    as the gather at 300 keys and less beyond). A lone scattered sequence merges
    its runs instead (see _attend_one).
    """

    members: list[int]  # indices into AttentionBatch.seqs
    rows: torch.Tensor  # long [B]: their rows in the flat batch
    slots: torch.Tensor  # long [B * L]: cache slot of each key, padded with slot 0
    mask: torch.Tensor  # bool [B, 1, 1, L]: real keys
    width: int  # L


def decode_gather(batch: AttentionBatch, window: int) -> DecodeGather | None:
    """Built once per step and window, shared by all layers; None for fewer than 2."""
    if window in batch._decode:
        return batch._decode[window]
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
    batch._decode[window] = gather
    return gather


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


def gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[:, slots] as a new [kv_heads, len(slots), head_dim] tensor."""
    out = cache.new_empty(cache.shape[0], len(slots), cache.shape[2])
    for h in range(cache.shape[0]):  # a head at a time: 2x faster than index_select on dim 1
        torch.index_select(cache[h], 0, slots, out=out[h])
    return out


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """q [T, heads, head_dim] -> [T, heads, head_dim] attending over each sequence's cache."""
    if len(batch.seqs) == 1:  # one sequence: its output is the whole output, no copy
        return _attend_one(q, k_cache, v_cache, batch, 0, scale, window).transpose(0, 1)
    out = torch.empty_like(q)
    done: set[int] = set()
    gather = decode_gather(batch, window)
    if gather is not None:  # every decode token in one call: one gather, one kernel
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
        done.update(gather.members)
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
