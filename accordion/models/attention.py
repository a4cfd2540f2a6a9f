"""Attention over a paged KV cache: the one place a faster backend slots in.

Every step runs a flat batch of tokens from many sequences (decode tokens and
prefill chunks mixed). K/V of the new tokens are written to their cache slots;
then each sequence attends to its own blocks. On CPU we gather a sequence's
blocks (or take a view when they are consecutive in the pool) and call
`scaled_dot_product_attention`; a CUDA backend would replace `attend` with a
paged kernel reading the same block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SeqSlice:
    """One sequence's share of a step."""

    q_start: int  # index of its first new token in the flat batch
    q_len: int  # new tokens this step
    ctx_len: int  # tokens it holds after this step (cached + new)
    blocks: list[int]  # block table (for a window group: only the blocks still held)
    start_pos: int = 0  # position of the first token of blocks[0]
    _index: torch.Tensor | None = field(default=None, repr=False)
    _run: int | None = field(default=-1, repr=False)

    def block_index(self) -> torch.Tensor:
        if self._index is None:
            self._index = torch.tensor(self.blocks, dtype=torch.long)
        return self._index

    def block_run(self) -> int | None:
        """First block id if the table is one run of consecutive ids (a view suffices)."""
        if self._run == -1:  # computed once per step, then shared by every layer
            b = self.blocks
            consecutive = bool(b) and all(y == x + 1 for x, y in zip(b, b[1:], strict=False))
            self._run = b[0] if consecutive else None
        return self._run


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
    """Decode sequences (one new token each) attended in one padded batch."""

    members: list[int]  # indices into AttentionBatch.seqs
    rows: torch.Tensor  # long [B]: their rows in the flat batch
    slots: torch.Tensor  # long [B * L]: cache slot of each key, padded with slot 0
    mask: torch.Tensor  # bool [B, 1, 1, L]: real keys


def decode_gather(batch: AttentionBatch, window: int) -> DecodeGather | None:
    """Built once per step and window, shared by all layers; None for fewer than 2."""
    if window in batch._decode:
        return batch._decode[window]
    members = [i for i, s in enumerate(batch.seqs) if s.q_len == 1]
    gather = None
    if len(members) >= 2:
        bs = batch.block_size
        spans = []
        for i in members:
            s = batch.seqs[i]
            lo, hi = batch.key_range(s, window)
            blocks = torch.tensor(s.blocks, dtype=torch.long)
            pos = torch.arange(lo, hi) - s.start_pos
            spans.append(blocks[pos // bs] * bs + pos % bs)
        width = max(len(x) for x in spans)
        slots = torch.zeros(len(spans), width, dtype=torch.long)
        mask = torch.zeros(len(spans), 1, 1, width, dtype=torch.bool)
        for j, x in enumerate(spans):
            slots[j, : len(x)] = x
            mask[j, ..., : len(x)] = True
        rows = torch.tensor([batch.seqs[i].q_start for i in members], dtype=torch.long)
        gather = DecodeGather(members, rows, slots.view(-1), mask)
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
    n_kv, d = k.shape[-2:]
    k_cache.view(-1, n_kv, d).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, n_kv, d).index_copy_(0, slots, v.to(v_cache.dtype))


def _keys(cache: torch.Tensor, s: SeqSlice, lo: int, hi: int) -> torch.Tensor:
    """[hi - lo, kv_heads, head_dim] keys or values of positions [lo, hi) of `s`."""
    first = s.block_run()
    if first is not None:
        flat = cache[first : first + len(s.blocks)]
    else:
        flat = cache.index_select(0, s.block_index())
    flat = flat.view(-1, *cache.shape[2:])
    return flat[lo - s.start_pos : hi - s.start_pos]


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """q [T, heads, head_dim] -> [T, heads, head_dim] attending over each sequence's cache."""
    out = torch.empty_like(q)
    done: set[int] = set()
    gather = decode_gather(batch, window)
    if gather is not None:  # every decode token in one call: one gather, one kernel
        n_kv, d = k_cache.shape[-2:]
        b = len(gather.members)
        keys = k_cache.view(-1, n_kv, d).index_select(0, gather.slots).view(b, -1, n_kv, d)
        values = v_cache.view(-1, n_kv, d).index_select(0, gather.slots).view(b, -1, n_kv, d)
        qs = q.index_select(0, gather.rows).unsqueeze(2)  # [B, heads, 1, d]
        o = F.scaled_dot_product_attention(
            qs,
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=gather.mask,
            scale=scale,
            enable_gqa=True,
        )
        out.index_copy_(0, gather.rows, o.squeeze(2))
        done.update(gather.members)
    for i, s in enumerate(batch.seqs):
        if i in done:
            continue
        lo, hi = batch.key_range(s, window)
        keys = _keys(k_cache, s, lo, hi).transpose(0, 1).unsqueeze(0)
        values = _keys(v_cache, s, lo, hi).transpose(0, 1).unsqueeze(0)
        qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qs, keys, values, attn_mask=batch.mask(i, window), scale=scale, enable_gqa=True
        )
        out[s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1)
    return out
