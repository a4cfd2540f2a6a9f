"""Logits: a fast pass over the vocabulary, then the leaders recomputed exactly.

The fast pass (native/qmatmul.cpp) rounds the hidden state: to bf16 on AMX
tiles, where near a logit of 20 that moves a logit by up to a few tenths, enough to
swap two near-tied tokens, and to int16 per block of 32 on the vector code. So
every token whose fast logit is within MARGIN of its row's fast maximum is
recomputed in float32, from the float32 hidden state and the weights as the file
stores them (a few rows dequantized per step). The argmax is then the one float32
arithmetic gives; the other logits keep their fast values, whose error is far
below what sampling at any useful temperature can tell apart.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES

from accordion import native
from accordion.models.quant import KERNEL_BLOCKS, Q, dequantize

# Logit units. On the prose of tests/test_models.py the fast logits of the leading
# tokens differ from float32 by at most 0.33 (SmolLM2) and 0.50 (Gemma 3). The true
# leader is then at most twice that below the fast maximum; MARGIN doubles it again.
MARGIN = 2.0


class ExactRows:
    """Rows of a matrix dequantized on demand from the file's own bytes: the
    embedding lookup, and the output head's leaders. The native op (native/rows.cpp)
    gives gguf's decoders' bits without their fixed cost (~20 us a call warm, several
    times that in a decode step); other types, and a process without native ops,
    take those decoders."""

    def __init__(self, raw: np.ndarray, ggml_type: int, rows: int, cols: int) -> None:
        self.raw = raw.reshape(rows, -1)  # one row's blocks per line (a view of the map)
        self.ggml_type, self.cols = ggml_type, cols
        self.block_bytes = 0  # the native op's type, by its block size; 0: gguf's decoders
        if ggml_type in KERNEL_BLOCKS and native.available():
            self.block_bytes = GGML_QUANT_SIZES[Q(ggml_type)][1]
            self.bytes = torch.from_numpy(self.raw)  # a view, as the kernel's weights are

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), cols]."""
        if self.block_bytes:
            picked = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
            rows = torch.ops.accordion.dequantize_rows(
                self.bytes, picked, self.block_bytes, self.cols
            )
            return rows.numpy()
        return dequantize(self.raw[ids], self.ggml_type, (len(ids), self.cols))

    def nbytes(self) -> int:
        return self.raw.nbytes


class DenseRows:
    """Rows of a float32 matrix already in memory (the `fp32` mode's embedding)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.w.numpy()[ids]

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()


def rescore(logits: torch.Tensor, hidden: torch.Tensor, rows: ExactRows) -> None:
    """Recompute in place the logits within MARGIN of their row's maximum.

    Natively (native/rows.cpp) each row alone, each dot in one fixed order. numpy's
    max, compare and flatnonzero took ~9 us a row on a 49k vocabulary where torch's
    topk takes 70 us; but run right after the head's pass over its weights, which
    leaves numpy's machinery out of the caches, the whole took ~0.3 ms a step."""
    if rows.block_bytes:
        torch.ops.accordion.rescore_rows(
            logits, hidden.contiguous(), rows.bytes, rows.block_bytes, MARGIN
        )
        return
    values, h = logits.numpy(), hidden.numpy()
    picks = [np.flatnonzero(row >= row.max() - MARGIN) for row in values]
    ids, where = np.unique(np.concatenate(picks), return_inverse=True)
    exact = rows(ids)  # [len(ids), cols]
    start = 0
    for r, pick in enumerate(picks):
        values[r, pick] = exact[where[start : start + len(pick)]] @ h[r]
        start += len(pick)
