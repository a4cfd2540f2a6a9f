"""Sentence embeddings from a decoder: mean of final hidden states, L2-normalized."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from accordion.models.attention import AttentionBatch, SeqSlice
from accordion.models.decoder import Decoder, ForwardBatch


class _ScratchKV:
    """A throwaway contiguous cache: one block holds the whole input."""

    def __init__(self, decoder: Decoder, n: int) -> None:
        cfg = decoder.cfg
        shape = (cfg.n_layers, cfg.n_kv_heads, n, cfg.head_dim)
        self.k = torch.empty(shape, dtype=decoder.kv_dtype)
        self.v = torch.empty(shape, dtype=decoder.kv_dtype)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def group_of(self, i: int) -> int:
        return 0


@torch.inference_mode()
def final_hidden(decoder: Decoder, ids: list[int]) -> torch.Tensor:
    """Final-normed hidden states [n, hidden] of the tokens, in a cache of their own."""
    n = len(ids)
    batch = ForwardBatch(
        tokens=torch.tensor(ids),
        positions=torch.arange(n),
        attn=[AttentionBatch(torch.arange(n), [SeqSlice(0, n, n, [0])], n)],
        sample_rows=torch.empty(0, dtype=torch.long),
    )
    return decoder.hidden_states(batch, _ScratchKV(decoder, n))


@torch.inference_mode()
def embed(decoder: Decoder, ids: list[int]) -> list[float]:
    return F.normalize(final_hidden(decoder, ids).mean(dim=0), dim=0).tolist()
