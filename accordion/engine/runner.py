"""Turns scheduled work into one ForwardBatch and runs the model on it."""

from __future__ import annotations

import torch

from accordion.engine.scheduler import Work
from accordion.engine.sequence import Sequence
from accordion.kv.cache import KVCache
from accordion.models.attention import AttentionBatch, SeqSlice
from accordion.models.decoder import Decoder, ForwardBatch


def make_batch(work: list[Work], kv: KVCache) -> tuple[ForwardBatch, list[Sequence]]:
    """Flatten the step's work; return the batch and the sequences that get a new token."""
    bs = kv.block_size
    n_groups = len(kv.groups)
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[list[int]] = [[] for _ in range(n_groups)]
    seqs: list[list[SeqSlice]] = [[] for _ in range(n_groups)]
    sample_rows: list[int] = []
    sampled: list[Sequence] = []
    for w in work:
        s, start = w.seq, w.seq.num_computed
        end = start + w.n
        for g, (table, first_pos) in enumerate(kv.slices(s.id)):
            seqs[g].append(SeqSlice(len(tokens), w.n, end, table, first_pos))
            first_block = first_pos // bs
            slots[g].extend(
                table[pos // bs - first_block] * bs + pos % bs for pos in range(start, end)
            )
        tokens.extend(s.token_ids[start:end])
        positions.extend(range(start, end))
        if end == len(s.token_ids):  # everything known is in the cache: predict the next
            sample_rows.append(len(tokens) - 1)
            sampled.append(s)
    attn = [
        AttentionBatch(torch.tensor(slots[g], dtype=torch.long), seqs[g], bs)
        for g in range(n_groups)
    ]
    batch = ForwardBatch(
        tokens=torch.tensor(tokens, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        attn=attn,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long),
    )
    return batch, sampled


@torch.inference_mode()
def run(model: Decoder, kv: KVCache, work: list[Work]) -> tuple[torch.Tensor, list[Sequence]]:
    """One forward step: logits [n, vocab] (float32) and the sequences they belong to."""
    batch, sampled = make_batch(work, kv)
    if sampled:
        logits = model(batch, kv)
    else:  # prefill chunks that do not reach the end only fill the cache
        model.residual(batch, kv)
        logits = torch.empty(0)
    for w in work:
        w.seq.num_computed += w.n
        w.seq.evaluated_tokens += w.n
        kv.written(w.seq.id, w.seq.token_ids, w.seq.num_computed)
    return logits, sampled
