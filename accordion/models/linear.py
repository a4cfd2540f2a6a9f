"""A linear layer that keeps GGUF weights small and picks the fastest kernel per call.

On this CPU class torch's int4 kernel beats a bf16 GEMM while few rows go
through (decode) and oneDNN's bf16 GEMM wins by far for many rows (prefill).
The int4 kernel needs bf16 activations and scales: with fp32 it is 20-50x
slower. Types without an exact int4 form stay dense bf16: requantizing them
per row to int8 was faster but cost measurable argmax agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from accordion.models.quant import Int4Groups

WEIGHT_MODES = ("auto", "int4", "bf16", "fp32")
INT4_MAX_ROWS = 12  # measured end to end: int4 wins at 8 decode rows, bf16 GEMM at 16


@dataclass
class Matrix:
    """A weight as read from GGUF: exact int4 groups when the type allows, else floats."""

    rows: int
    cols: int
    int4: Int4Groups | None = None
    dense: np.ndarray | None = None  # float32 [rows, cols]

    def to_dense(self) -> np.ndarray:
        if self.dense is not None:
            return self.dense
        g = self.int4
        assert g is not None
        return (g.q.astype(np.float32) - 8) * np.repeat(g.scale, 32, 1) + np.repeat(g.zero, 32, 1)

    def permute_rows(self, order: np.ndarray) -> Matrix:
        if self.int4 is not None:
            g = self.int4
            return Matrix(
                self.rows, self.cols, Int4Groups(g.q[order], g.scale[order], g.zero[order])
            )
        assert self.dense is not None
        return Matrix(self.rows, self.cols, dense=self.dense[order])


def stack_rows(parts: list[Matrix]) -> Matrix:
    """Fuse matrices sharing an input (Q,K,V or gate,up) into one, output rows concatenated."""
    if len(parts) == 1:
        return parts[0]
    rows, cols = sum(p.rows for p in parts), parts[0].cols
    if all(p.int4 is not None for p in parts):
        gs = [p.int4 for p in parts]
        return Matrix(
            rows,
            cols,
            Int4Groups(
                *(np.concatenate([getattr(g, f) for g in gs]) for f in ("q", "scale", "zero"))
            ),
        )
    return Matrix(rows, cols, dense=np.concatenate([p.to_dense() for p in parts]))


def _pack_int4(g: Int4Groups) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.from_numpy(g.q.astype(np.int32))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    scales_zeros = torch.stack([torch.from_numpy(g.scale.T), torch.from_numpy(g.zero.T)], dim=-1)
    return packed, scales_zeros.to(torch.bfloat16).contiguous()


class Linear(torch.nn.Module):
    """y = x @ W.T (+ b), W held as packed int4 groups and/or a dense copy."""

    def __init__(self, m: Matrix, mode: str, bias: np.ndarray | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = m.rows, m.cols
        self.int4: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dense: torch.Tensor | None = None
        # torch's int4 packing works in tiles of 16 output rows
        if mode in ("auto", "int4") and m.int4 is not None and m.rows % 16 == 0:
            self.int4 = _pack_int4(m.int4)
        if mode != "int4" or self.int4 is None:
            dtype = torch.float32 if mode == "fp32" else torch.bfloat16
            self.dense = torch.from_numpy(m.to_dense()).to(dtype)
        act_dtype = torch.float32 if mode == "fp32" else torch.bfloat16
        self.bias = (
            None if bias is None else torch.from_numpy(bias.astype(np.float32)).to(act_dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.int4 is not None and (rows <= INT4_MAX_ROWS or self.dense is None):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, self.in_features), self.int4[0], 32, self.int4[1]
            )
        else:
            assert self.dense is not None
            return F.linear(x, self.dense, self.bias)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        tensors = list(self.int4 or ())
        tensors += [t for t in (self.dense, self.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
