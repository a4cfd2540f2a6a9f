"""Turns scheduled sequences into one ForwardBatch and runs the model on it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from accordion.engine.sequence import Sequence
from accordion.models.attention import AttentionBatch, SeqSlice
from accordion.models.decoder import Decoder, ForwardBatch, PagedKV


@dataclass
class Work:
    seq: Sequence
    n: int  # tokens to compute this step, starting at seq.num_computed


def make_batch(work: list[Work], block_size: int) -> tuple[ForwardBatch, list[Sequence]]:
    """Flatten the step's work; return the batch and the sequences that get a new token."""
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    seqs: list[SeqSlice] = []
    sample_rows: list[int] = []
    sampled: list[Sequence] = []
    for w in work:
        s, start = w.seq, w.seq.num_computed
        end = start + w.n
        seqs.append(SeqSlice(len(tokens), w.n, end, s.blocks))
        for pos in range(start, end):
            slots.append(s.blocks[pos // block_size] * block_size + pos % block_size)
        tokens.extend(s.token_ids[start:end])
        positions.extend(range(start, end))
        if end == len(s.token_ids):  # prompt fully in cache: this row predicts the next token
            sample_rows.append(len(tokens) - 1)
            sampled.append(s)
    batch = ForwardBatch(
        tokens=torch.tensor(tokens, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        attn=[AttentionBatch(torch.tensor(slots, dtype=torch.long), seqs, block_size)],
        sample_rows=torch.tensor(sample_rows, dtype=torch.long),
    )
    return batch, sampled


@torch.inference_mode()
def run(model: Decoder, kv: PagedKV, work: list[Work], block_size: int):
    """One forward step: returns (logits [n, vocab] float32, sequences they belong to)."""
    batch, sampled = make_batch(work, block_size)
    if sampled:
        logits = model(batch, kv)
    else:  # a prefill chunk that does not reach the end only fills the cache
        model.hidden_states(batch, kv)
        logits = torch.empty(0)
    for w in work:
        w.seq.num_computed += w.n
    return logits, sampled
