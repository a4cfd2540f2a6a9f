"""Small building blocks shared by the decoder: RMS norm, RoPE and activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, in float32.

    Written as sqrt(n) * rsqrt(sum(x^2) + n * eps) with sqrt(n) folded into the
    weight: six small kernels where F.rms_norm runs about a dozen on CPU, which
    at decode, where each costs ~2 us, is what the norm's time is.
    """

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        n = weight.shape[-1]
        self.eps = eps
        self.weight = weight.float() * n**0.5
        self.n_eps = torch.tensor(n * eps, dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.rsqrt((x * x).sum(-1, keepdim=True) + self.n_eps)
        return x * r * self.weight


class Rope:
    """Rotary embeddings, tables grown on demand, in the rotate-half (NeoX) layout
    or the interleaved one (pairs 2i, 2i + 1: llama files as llama.cpp writes them).

    The sin table carries the rotation's signs (-sin on the first of each pair), so
    a rotation is x * cos + partner(x) * sin: three kernels instead of six.
    """

    def __init__(
        self,
        head_dim: int,
        base: float,
        dtype: torch.dtype,
        freq_factors: torch.Tensor | None = None,
        position_scale: float = 1.0,
        interleaved: bool = False,
    ) -> None:
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        if freq_factors is not None:  # llama 3.1-style long-context scaling, per frequency
            inv = inv / freq_factors.to(torch.float64)
        self.inv_freq = inv * position_scale
        self.dtype, self.interleaved = dtype, interleaved
        self.cos = torch.empty(0, head_dim, dtype=dtype)
        self.sin = torch.empty(0, head_dim, dtype=dtype)

    def _grow(self, n: int) -> None:
        size = max(n, 2 * self.cos.shape[0], 256)
        angles = torch.outer(torch.arange(size, dtype=torch.float64), self.inv_freq)
        cos, sin = angles.cos(), angles.sin()
        if self.interleaved:
            self.cos = cos.repeat_interleave(2, -1).to(self.dtype)
            self.sin = torch.stack([-sin, sin], -1).flatten(-2).to(self.dtype)
        else:
            self.cos = torch.cat([cos, cos], dim=-1).to(self.dtype)
            self.sin = torch.cat([-sin, sin], dim=-1).to(self.dtype)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin as [T, 1, head_dim] for the given positions."""
        top = int(positions.max()) + 1 if positions.numel() else 0
        if top > self.cos.shape[0]:
            self._grow(top)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by position (sin as Rope.tables signs it)."""
    if interleaved:
        partner = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        partner = x.roll(x.shape[-1] // 2, -1)
    return torch.addcmul(x * cos, partner, sin)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": gelu_tanh}
