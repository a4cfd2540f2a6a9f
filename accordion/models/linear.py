"""A linear layer over the file's own weights: one copy, one kernel for every step.

In the default mode (`auto`) a layer holds views of the mapped GGUF tensors it
fuses (Q, K and V; gate and up), whatever their types, and every call, one
decode row or a 512-token prefill chunk, runs native/qmatmul.cpp over them: each
output element is computed by the same instructions in the same order whatever
else is in the batch, so a token's numbers depend on that token alone. `fp32`
dequantizes the weights once to a float32 copy and runs torch's GEMM: the exact
reference, at four to eight times the memory.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from accordion import native
from accordion.models.quant import reference_matmul, weights_dense

WEIGHT_MODES = ("auto", "fp32")


class Linear(torch.nn.Module):
    """y = x @ W.T (+ b) for W the row-wise concatenation of `parts` (each as
    models/quant.kernel_weights gives it); float32 in, float32 out."""

    def __init__(
        self, parts: list[torch.Tensor], mode: str, bias: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.parts: list[torch.Tensor] = []
        self.dense: torch.Tensor | None = None
        if mode == "fp32":
            self.dense = torch.from_numpy(np.concatenate([weights_dense(p) for p in parts]))
        else:
            self.parts = parts
        self.out_features = sum(p.shape[0] for p in parts)
        self.bias = None if bias is None else torch.from_numpy(bias.astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return F.linear(x, self.dense, self.bias)
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        if native.available():
            y = torch.ops.accordion.qmatmul(x2, self.parts, self.bias)
        else:
            y = reference_matmul(x2, self.parts)
            y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def native_terms(self) -> list[torch.Tensor | None]:
        """[dense, bias, part_0, part_1, ...]: this layer as native/block.cpp takes it."""
        return [self.dense, self.bias, *self.parts]

    def nbytes(self) -> int:
        tensors = [*self.parts, *(t for t in (self.dense, self.bias) if t is not None)]
        return sum(t.numel() * t.element_size() for t in tensors)
