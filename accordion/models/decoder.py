"""One decoder-only transformer for every supported architecture.

llama/mistral, qwen2, qwen3 and gemma3 differ only in switches held by
ModelConfig (biases, q/k norms, sandwich norms, sliding windows, embedding
scale, activation), so they share this code; the forward reads top to bottom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from accordion.models.attention import AttentionBatch, attend, write_kv
from accordion.models.config import ModelConfig
from accordion.models.layers import ACTIVATIONS, Rope, apply_rope
from accordion.models.linear import Linear


class PagedKV(Protocol):
    """What the model needs from the KV cache: per-layer storage and its layer group."""

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def group_of(self, i: int) -> int: ...


@dataclass
class ForwardBatch:
    tokens: torch.Tensor  # long [T]
    positions: torch.Tensor  # long [T]
    attn: list[AttentionBatch]  # one per layer group
    sample_rows: torch.Tensor  # long [n]: rows of the batch whose next-token logits we need


@dataclass
class BlockWeights:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    ffn_norm: torch.Tensor
    gate_up: Linear
    down: Linear
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None


class Block(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, w: BlockWeights, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg, self.index, self.w, self.dtype = cfg, index, w, dtype
        self.window = cfg.sliding_window if cfg.window_layers[index] else 0
        self.act = ACTIVATIONS[cfg.activation]
        self.q_size = cfg.n_heads * cfg.head_dim
        self.qk_norm = None  # per-head norm weights of Q then K, stacked once
        if w.q_norm is not None and w.k_norm is not None:
            self.qk_norm = torch.cat(
                [w.q_norm.expand(cfg.n_heads, -1), w.k_norm.expand(cfg.n_kv_heads, -1)]
            )

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, weight.shape, weight, self.cfg.norm_eps)

    def norm_in(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Norm of the float32 residual stream, cast to the matmul dtype."""
        return F.rms_norm(x, weight.shape, weight, self.cfg.norm_eps).to(self.dtype)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        cfg, w, t = self.cfg, self.w, x.shape[0]
        # heads of Q, K and V side by side: [T, heads + 2 * kv_heads, head_dim]
        heads = w.qkv(self.norm_in(x, w.attn_norm)).view(t, -1, cfg.head_dim)
        n_qk = cfg.n_heads + cfg.n_kv_heads
        qk, v = heads[:, :n_qk].float(), heads[:, n_qk:]  # V goes to the cache as it is
        if self.qk_norm is not None:
            qk = F.rms_norm(qk, (cfg.head_dim,), None, cfg.norm_eps) * self.qk_norm
        qk = apply_rope(qk, *rope)  # one rotation serves Q and K
        q, k = qk[:, : cfg.n_heads], qk[:, cfg.n_heads :]
        write_kv(kv[0], kv[1], k, v, batch.slots)
        o = attend(q.to(kv[0].dtype), kv[0], kv[1], batch, cfg.attn_scale, self.window)
        o = w.o(o.reshape(t, self.q_size).to(self.dtype))
        if w.post_attn_norm is not None:
            o = self.norm(o.float(), w.post_attn_norm)
        x = x + o  # float32 + bf16 is float32: the residual stream keeps its precision
        gate, up = w.gate_up(self.norm_in(x, w.ffn_norm)).float().chunk(2, dim=-1)
        o = w.down((self.act(gate) * up).to(self.dtype))
        if w.post_ffn_norm is not None:
            o = self.norm(o.float(), w.post_ffn_norm)
        return x + o


class Decoder(torch.nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        embed: torch.Tensor,
        blocks: list[BlockWeights],
        out_norm: torch.Tensor,
        lm_head: Linear,
        ropes: dict[float, Rope],
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.embed = embed  # [vocab, hidden] in the activation dtype
        self.blocks = torch.nn.ModuleList(Block(cfg, i, w, dtype) for i, w in enumerate(blocks))
        self.out_norm, self.lm_head, self.ropes = out_norm, lm_head, ropes
        self.embed_scale = torch.tensor(cfg.embed_scale, dtype=dtype).float()

    def rope_base(self, index: int) -> float:
        local = self.cfg.window_layers[index]
        return self.cfg.rope_base_local if local else self.cfg.rope_base

    def hidden_states(self, batch: ForwardBatch, kv: PagedKV) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] of every token of the batch."""
        x = self.embed[batch.tokens].float()  # the residual stream stays float32
        if self.cfg.embed_scale != 1.0:
            x = x * self.embed_scale
        tables = {base: rope.tables(batch.positions) for base, rope in self.ropes.items()}
        for i, block in enumerate(self.blocks):
            group = kv.group_of(i)
            x = block(x, tables[self.rope_base(i)], kv.layer(i), batch.attn[group])
        return F.rms_norm(x, self.out_norm.shape, self.out_norm, self.cfg.norm_eps).to(self.dtype)

    def forward(self, batch: ForwardBatch, kv: PagedKV) -> torch.Tensor:
        """Next-token logits (float32) for batch.sample_rows."""
        h = self.hidden_states(batch, kv)
        return self.lm_head(h[batch.sample_rows]).float()

    def nbytes(self) -> int:
        linears = [self.lm_head] + [
            lin for b in self.blocks for lin in (b.w.qkv, b.w.o, b.w.gate_up, b.w.down)
        ]
        total = sum(lin.nbytes() for lin in linears)
        if self.lm_head.dense is None or self.embed.data_ptr() != self.lm_head.dense.data_ptr():
            total += self.embed.numel() * self.embed.element_size()
        return total
