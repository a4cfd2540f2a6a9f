"""One decoder-only transformer for every supported architecture.

llama/mistral, qwen2, qwen3 and gemma3 differ only in switches held by
ModelConfig (biases, q/k norms, sandwich norms, sliding windows, embedding
scale, activation), so they share this code; the forward reads top to bottom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from accordion import native
from accordion.models.attention import AttentionBatch, attend, write_kv
from accordion.models.config import ModelConfig
from accordion.models.head import DenseRows, ExactRows, rescore
from accordion.models.layers import ACTIVATIONS, RMSNorm, Rope, apply_rope, gelu_tanh
from accordion.models.linear import Linear
from accordion.models.stack import NativeStack


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
    def __init__(self, cfg: ModelConfig, index: int, w: BlockWeights) -> None:
        super().__init__()
        self.cfg, self.index, self.w = cfg, index, w
        self.window = cfg.sliding_window if cfg.window_layers[index] else 0
        self.act = ACTIVATIONS[cfg.activation]
        self.q_size = cfg.n_heads * cfg.head_dim
        eps = cfg.norm_eps
        self.attn_norm, self.ffn_norm = RMSNorm(w.attn_norm, eps), RMSNorm(w.ffn_norm, eps)
        self.qk_norm = None  # per-head norms of Q then K, weights stacked once
        if w.q_norm is not None and w.k_norm is not None:
            qk = [w.q_norm.expand(cfg.n_heads, -1), w.k_norm.expand(cfg.n_kv_heads, -1)]
            self.qk_norm = RMSNorm(torch.cat(qk), eps)
        self.post_attn_norm: RMSNorm | None = None  # gemma3's sandwich norms
        self.post_ffn_norm: RMSNorm | None = None
        if w.post_attn_norm is not None and w.post_ffn_norm is not None:
            self.post_attn_norm = RMSNorm(w.post_attn_norm, eps)
            self.post_ffn_norm = RMSNorm(w.post_ffn_norm, eps)
        self.native = False  # the decoder switches its blocks on (Decoder.use_native)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        q = self.queries(x, rope, kv, batch.slots)
        o = attend(q, kv[0], kv[1], batch, self.cfg.attn_scale, self.window, self.native)
        return self.finish(x, o)

    def queries(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """Store the new tokens' K and V at `slots`; return their queries
        [T, heads, head_dim] in the cache's dtype."""
        cfg, w, t = self.cfg, self.w, x.shape[0]
        if self.native:
            return torch.ops.accordion.block_queries(
                x, *self._native_q, *rope, cfg.rope_interleaved, kv[0], kv[1], slots,
                cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
            )  # fmt: skip
        # heads of Q, K and V side by side: [T, heads + 2 * kv_heads, head_dim]
        heads = w.qkv(self.attn_norm(x)).view(t, -1, cfg.head_dim)
        n_qk = cfg.n_heads + cfg.n_kv_heads
        qk, v = heads[:, :n_qk], heads[:, n_qk:]  # V goes to the cache as it is
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        qk = apply_rope(qk, *rope, cfg.rope_interleaved)  # one rotation serves Q and K
        q, k = qk[:, : cfg.n_heads], qk[:, cfg.n_heads :]
        write_kv(kv[0], kv[1], k, v, slots)
        return q.to(kv[0].dtype)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Attention output [T, heads, head_dim] through O and the MLP, each added to
        the residual stream x (float32); returns the new stream."""
        w, t = self.w, x.shape[0]
        if self.native:
            return torch.ops.accordion.block_finish(x, attn, *self._native_f)
        o = w.o(attn.reshape(t, self.q_size).float())
        if self.post_attn_norm is not None:
            o = self.post_attn_norm(o)
        x = x + o
        gate_up = w.gate_up(self.ffn_norm(x))
        n = gate_up.shape[-1] // 2
        o = w.down(self.act(gate_up[:, :n]) * gate_up[:, n:])
        if self.post_ffn_norm is not None:
            o = self.post_ffn_norm(o)
        return x + o

    def use_native(self, on: bool) -> None:
        """Run queries, finish and decode attention on the native ops (native/*.cpp:
        the same computation to float32 rounding, with no interpreter between its
        kernels) when `on` and they are built; else on the Python below."""
        self.native = on and native.available()
        if not self.native:
            return
        w = self.w

        def lin(m: Linear) -> tuple[list[torch.Tensor | None]]:
            return (m.native_terms(),)

        def norm(n: RMSNorm | None) -> tuple[torch.Tensor | None, float]:
            return (None, 0.0) if n is None else (n.weight, n.eps)

        an, fn = self.attn_norm, self.ffn_norm
        self._native_q = (an.weight, an.eps, *lin(w.qkv), *norm(self.qk_norm))
        self._native_f = (
            *lin(w.o), *norm(self.post_attn_norm), fn.weight, fn.eps, *lin(w.gate_up),
            *lin(w.down), *norm(self.post_ffn_norm), self.act is gelu_tanh,
        )  # fmt: skip


class Decoder(torch.nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        embed: ExactRows | DenseRows,
        blocks: list[BlockWeights],
        out_norm: torch.Tensor,
        lm_head: Linear,
        ropes: dict[float, Rope],
        kv_dtype: torch.dtype,
        exact_head: ExactRows | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.kv_dtype = cfg, kv_dtype  # what the KV cache stores
        self.exact_head = exact_head  # None when the head is already float32
        self.embed = embed  # token ids -> float32 rows
        self.blocks = torch.nn.ModuleList(Block(cfg, i, w) for i, w in enumerate(blocks))
        self.out_norm = RMSNorm(out_norm, cfg.norm_eps)
        self.lm_head, self.ropes = lm_head, ropes
        self.stack: NativeStack | None = None  # see use_native
        self.use_native(True)

    def use_native(self, on: bool) -> None:
        """Every block on the native ops (when built) or on the Python path; on
        them, a step runs all blocks in one native call where it can (models/stack.py)."""
        for block in self.blocks:
            block.use_native(on)
        self.stack = NativeStack(self) if on and NativeStack.fits(self) else None

    def rope_base(self, index: int) -> float:
        local = self.cfg.window_layers[index]
        return self.cfg.rope_base_local if local else self.cfg.rope_base

    def hidden_states(self, batch: ForwardBatch, kv: PagedKV) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] (float32) of every token of the batch."""
        return self.out_norm(self.residual(batch, kv))

    def forward(self, batch: ForwardBatch, kv: PagedKV) -> torch.Tensor:
        """Next-token logits (float32) for batch.sample_rows."""
        return self.logits(self.out_norm(self.residual(batch, kv)[batch.sample_rows]))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (float32) of final-normed hidden states [n, hidden]."""
        logits = self.lm_head(hidden)
        if self.exact_head is not None:
            rescore(logits, hidden, self.exact_head)
        return logits

    def residual(self, batch: ForwardBatch, kv: PagedKV) -> torch.Tensor:
        """The residual stream [T, hidden] after the last block (float32), before the
        final norm: what a step that only fills the cache needs."""
        x = torch.from_numpy(self.embed(batch.tokens.numpy()))  # float32 throughout
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        tables = {base: rope.tables(batch.positions) for base, rope in self.ropes.items()}
        if self.stack is not None:
            return self.stack.run(x, tables, batch, kv)
        for i, block in enumerate(self.blocks):
            group = kv.group_of(i)
            x = block(x, tables[self.rope_base(i)], kv.layer(i), batch.attn[group])
        return x

    def nbytes(self) -> int:
        """Bytes the weights occupy: the mapped file's tensors (or the fp32 copies)."""
        linears = [self.lm_head] + [
            lin for b in self.blocks for lin in (b.w.qkv, b.w.o, b.w.gate_up, b.w.down)
        ]
        total = sum(lin.nbytes() for lin in linears)
        if not self.cfg.tied_embeddings:  # else the head's bytes are the embedding's
            total += self.embed.nbytes()
        return total
