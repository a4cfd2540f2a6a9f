"""Hyper-parameters of a supported architecture, read from GGUF metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass

from accordion.errors import UnsupportedModelError
from accordion.loader.gguf_file import GGUFFile

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_base_local: float  # sliding-window layers (gemma3); equals rope_base otherwise
    sliding_window: int  # 0 = every layer attends to the whole context
    window_layers: tuple[bool, ...]  # per layer: does it use the sliding window
    attn_scale: float
    qkv_bias: bool  # qwen2
    qk_norm: bool  # qwen3, gemma3
    sandwich_norm: bool  # gemma3: norms after attention and after the MLP too
    embed_scale: float  # gemma3 multiplies embeddings by sqrt(hidden)
    activation: str  # "silu" or "gelu_tanh"
    tied_embeddings: bool
    # llama.cpp's converter interleaves Q/K rows for llama models: RoPE then rotates
    # adjacent pairs (GGML's "normal" mode) instead of the halves of a head (NeoX)
    rope_interleaved: bool

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers, at 2 bytes per value."""
        return self.n_layers * self.n_kv_heads * self.head_dim * 2 * 2


def _require(gf: GGUFFile, key: str) -> int | float:
    value = gf.arch_get(key)
    if value is None:
        raise UnsupportedModelError(f"{gf.path.name}: GGUF lacks '{gf.architecture}.{key}'")
    return value


def config_from_gguf(gf: GGUFFile) -> ModelConfig:
    arch = gf.architecture
    if arch not in SUPPORTED:
        raise UnsupportedModelError(
            f"{gf.path.name}: architecture {arch!r} is not supported"
            f" (supported: {', '.join(SUPPORTED)})"
        )
    hidden = int(_require(gf, "embedding_length"))
    n_layers = int(_require(gf, "block_count"))
    n_heads = int(_require(gf, "attention.head_count"))
    n_kv = int(gf.arch_get("attention.head_count_kv", n_heads))
    head_dim = int(gf.arch_get("attention.key_length", hidden // n_heads))
    vocab = gf.arch_get("vocab_size") or gf.tensors["token_embd.weight"].shape[0]
    rope_base = float(gf.arch_get("rope.freq_base", 10000.0))
    gemma = arch == "gemma3"
    window = int(gf.arch_get("attention.sliding_window", 0) or 0)
    if gemma:
        # Gemma 3: five local layers, then one global; local layers use RoPE base 10k
        window_layers = tuple((i + 1) % 6 != 0 for i in range(n_layers))
        rope_local = 10000.0
    else:
        window_layers = tuple(bool(window) for _ in range(n_layers))
        rope_local = rope_base
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=int(_require(gf, "feed_forward_length")),
        context_length=int(gf.arch_get("context_length", 2048)),
        norm_eps=float(gf.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_base=rope_base,
        rope_base_local=rope_local,
        sliding_window=window,
        window_layers=window_layers if window else tuple(False for _ in range(n_layers)),
        attn_scale=1.0 / math.sqrt(head_dim),
        qkv_bias="blk.0.attn_q.bias" in gf.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in gf.tensors,
        sandwich_norm="blk.0.post_attention_norm.weight" in gf.tensors,
        embed_scale=math.sqrt(hidden) if gemma else 1.0,
        activation="gelu_tanh" if gemma else "silu",
        tied_embeddings="output.weight" not in gf.tensors,
        rope_interleaved=arch in ("llama", "mistral"),
    )
