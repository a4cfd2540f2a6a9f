"""A linear layer that keeps GGUF weights small and picks the fastest kernel per call.

On this CPU class torch's int4 kernel beats a bf16 GEMM while few rows go
through (decode) and oneDNN's bf16 GEMM wins by far for many rows (prefill).
The int4 kernel needs bf16 activations and scales: with fp32 it is 20-50x
slower. A weight may be a sum of int4 terms (Q8_0 is two): each term is one
more kernel call, so such a weight switches to the dense GEMM at fewer rows.
Types without an exact int4 form stay dense bf16: requantizing them per row to
int8 is faster but moves logits, so only an output head whose leading logits
are recomputed exactly (models/head.py) gets an int8 copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from accordion import native
from accordion.models.quant import Int4Groups

WEIGHT_MODES = ("auto", "int4", "bf16", "fp32")
# Rows up to which the int4 kernel beats the bf16 GEMM, by number of int4 terms.
# Measured: one term wins at 8 decode rows and loses at 16; two terms (the
# 49152-row SmolLM2 head) win at 2 rows and lose at 4.
INT4_MAX_ROWS = {1: 12, 2: 3}
# Rows up to which a per-row int8 copy beats the bf16 GEMM on a 49152 x 576 head.
# torch's kernel: 1.0 vs 2.0 ms at 1 row, 1.5 vs 2.0 at 4, 3.0 vs 2.0 at 6. The native
# one (native/head.cpp) reads the weights once for all rows: 0.6 ms at 1 row, 1.7 at 8,
# 2.5 at 12, where bf16 takes 2.0-2.1 alone and twice that inside a decode step
# (its 56 MB come from memory; the int8 copy's 28 MB take compute).
INT8_MAX_ROWS = 4
NATIVE_INT8_MAX_ROWS = 12


@dataclass
class Matrix:
    """A weight as read from GGUF: exact int4 terms when the type allows, else floats."""

    rows: int
    cols: int
    int4: list[Int4Groups] | None = None  # the weight is their sum
    dense: np.ndarray | None = None  # float32 [rows, cols]

    def to_dense(self) -> np.ndarray:
        if self.dense is not None:
            return self.dense
        return self.dense_tensor(torch.float32).numpy()

    def dense_tensor(self, dtype: torch.dtype, chunk: int = 8192) -> torch.Tensor:
        """The weight as a [rows, cols] tensor of `dtype`, computed in float32."""
        if self.dense is not None:
            return torch.from_numpy(self.dense).to(dtype)
        out = torch.empty(self.rows, self.cols, dtype=dtype)
        for i in range(0, self.rows, chunk):  # float32 temporaries stay a few MB
            out[i : i + chunk] = self._dense_rows(i, min(i + chunk, self.rows))
        return out

    def _dense_rows(self, a: int, b: int) -> torch.Tensor:
        # w = sum over terms of q * scale + (zero - 8 * scale), broadcast per group of
        # 32, in torch (multithreaded): a 262k-row head takes 1 s where numpy took 5
        assert self.int4 is not None
        shape = (b - a, self.cols // 32, 32)
        out = torch.zeros(shape)
        for g in self.int4:
            scale = torch.from_numpy(g.scale[a:b])[..., None]
            out += torch.from_numpy(g.zero[a:b])[..., None] - 8 * scale
            out.addcmul_(torch.from_numpy(g.q[a:b]).view(shape).float(), scale)
        return out.view(b - a, self.cols)

    def permute_rows(self, order: np.ndarray) -> Matrix:
        if self.int4 is not None:
            terms = [Int4Groups(g.q[order], g.scale[order], g.zero[order]) for g in self.int4]
            return Matrix(self.rows, self.cols, terms)
        assert self.dense is not None
        return Matrix(self.rows, self.cols, dense=self.dense[order])


def stack_rows(parts: list[Matrix]) -> Matrix:
    """Fuse matrices sharing an input (Q,K,V or gate,up) into one, output rows concatenated."""
    if len(parts) == 1:
        return parts[0]
    rows, cols = sum(p.rows for p in parts), parts[0].cols
    n_terms = {len(p.int4) if p.int4 is not None else 0 for p in parts}
    if len(n_terms) == 1 and 0 not in n_terms:
        per_term = zip(*(p.int4 for p in parts if p.int4 is not None), strict=True)
        fields = ("q", "scale", "zero")
        terms = [
            Int4Groups(*(np.concatenate([getattr(g, f) for g in gs]) for f in fields))
            for gs in per_term
        ]
        return Matrix(rows, cols, terms)
    return Matrix(rows, cols, dense=np.concatenate([p.to_dense() for p in parts]))


def _pack_int4(g: Int4Groups, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    # rows pack independently: chunks keep the int32 copy the packer wants small
    # (a 262k-row vocabulary would need 670 MB at once)
    parts = [
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.from_numpy(g.q[i : i + chunk]).to(torch.int32), 2
        )
        for i in range(0, g.q.shape[0], chunk)
    ]
    packed = torch.cat(parts) if len(parts) > 1 else parts[0]
    scales_zeros = torch.stack([torch.from_numpy(g.scale.T), torch.from_numpy(g.zero.T)], dim=-1)
    return packed, scales_zeros.to(torch.bfloat16).contiguous()


class Linear(torch.nn.Module):
    """y = x @ W.T (+ b), W held as packed int4 groups and/or a dense copy (and, for
    an output head whose leaders are recomputed exactly, an approximate int8 copy)."""

    def __init__(self, m: Matrix, mode: str, bias: np.ndarray | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = m.rows, m.cols
        self.int4: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.int8: tuple[torch.Tensor, torch.Tensor] | None = None  # see approximate_rows
        self.dense: torch.Tensor | None = None
        # torch's int4 packing works in tiles of 16 output rows
        if mode in ("auto", "int4") and m.int4 is not None and m.rows % 16 == 0:
            self.int4 = [_pack_int4(g) for g in m.int4]
        self.int4_max_rows = INT4_MAX_ROWS.get(len(self.int4), 0)
        if mode != "int4" or not self.int4:
            dtype = torch.float32 if mode == "fp32" else torch.bfloat16
            self.dense = m.dense_tensor(dtype)
        act_dtype = torch.float32 if mode == "fp32" else torch.bfloat16
        self.bias = (
            None if bias is None else torch.from_numpy(bias.astype(np.float32)).to(act_dtype)
        )

    def approximate_rows(self, chunk: int = 8192) -> None:
        """Decode few rows through a per-row int8 copy when no single int4 term holds
        the weight (Q8_0 needs two, Q6_K or F16 none). Only for an output head whose
        leading logits are recomputed exactly (models/head.py): requantizing moves a
        logit by at most ~0.5 on real text, inside head.MARGIN; the copy reads 28 MB
        per token on SmolLM2 where the two int4 terms read 35 and bf16 56."""
        if len(self.int4) == 1 or self.dense is None or self.dense.dtype != torch.bfloat16:
            return
        q = torch.empty(self.dense.shape, dtype=torch.int8)
        scale = torch.empty(self.out_features)
        for i in range(0, self.out_features, chunk):  # float32 temporaries stay small
            w = self.dense[i : i + chunk].float()
            scale[i : i + chunk] = w.abs().amax(1).clamp_min(1e-30) / 127
            q[i : i + chunk] = torch.round(w / scale[i : i + chunk, None]).to(torch.int8)
        self.int4 = []
        # the native kernel keeps 16 accumulators of 16 floats in registers: AVX-512's 32
        if native.available() and native.cpu_has("avx512f") and self.out_features % 64 == 0:
            # [N / 64, K, 64]: blocks of 64 outputs, as native/head.cpp streams them
            self.int8 = (q.view(-1, 64, self.in_features).transpose(1, 2).contiguous(), scale)
        else:  # torch's layout: [N, K] and bf16 scales
            self.int8 = (q, scale.to(torch.bfloat16))

    @property
    def int8_native(self) -> bool:
        """Whether the int8 copy is in native/head.cpp's blocks (else torch's layout)."""
        return self.int8 is not None and self.int8[0].dim() == 3

    @property
    def int8_max_rows(self) -> int:
        if self.int8 is None:
            return 0
        return NATIVE_INT8_MAX_ROWS if self.int8_native else INT8_MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        x2 = x.reshape(-1, self.in_features)
        if self.int8 is not None and rows <= self.int8_max_rows:
            if self.int8_native:  # float32 out
                y = torch.ops.accordion.int8_head(x2, *self.int8)
            else:
                y = torch.ops.aten._weight_int8pack_mm(x2, *self.int8)
        elif self.dense is not None and (rows > self.int4_max_rows or not self.int4):
            return F.linear(x, self.dense, self.bias)
        else:
            packed, scales_zeros = self.int4[0]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, 32, scales_zeros)
            for packed, scales_zeros in self.int4[1:]:
                y += torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, 32, scales_zeros)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def native_terms(self) -> list[torch.Tensor | None]:
        """[dense, bias, packed_0, scales_zeros_0, ...]: this layer as native/block.cpp
        takes it (no int8 copy: that is only an output head's)."""
        assert self.int8 is None
        return [self.dense, self.bias, *(t for pair in self.int4 for t in pair)]

    def nbytes(self) -> int:
        tensors = [t for pair in self.int4 for t in pair] + list(self.int8 or ())
        tensors += [t for t in (self.dense, self.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
