"""Build a Decoder from a GGUF file's tensors for a chosen weights mode."""

from __future__ import annotations

import numpy as np
import torch

from accordion.errors import UnsupportedModelError
from accordion.loader.gguf_file import GGUFFile
from accordion.models.config import ModelConfig
from accordion.models.decoder import BlockWeights, Decoder
from accordion.models.head import ExactRows
from accordion.models.layers import Rope
from accordion.models.linear import WEIGHT_MODES, Linear, Matrix, stack_rows
from accordion.models.quant import dequantize, int4_terms, type_name


def activation_dtype(mode: str) -> torch.dtype:
    return torch.float32 if mode == "fp32" else torch.bfloat16


class _Tensors:
    """Reads named tensors from the file; names the missing one in the error."""

    def __init__(self, gf: GGUFFile) -> None:
        self.gf = gf

    def has(self, name: str) -> bool:
        return name in self.gf.tensors

    def _info(self, name: str):  # noqa: ANN202
        info = self.gf.tensors.get(name)
        if info is None:
            raise UnsupportedModelError(f"{self.gf.path.name}: tensor {name!r} is missing")
        return info

    def vector(self, name: str) -> np.ndarray:
        info = self._info(name)
        return dequantize(self.gf.tensor_bytes(name), info.ggml_type, info.shape)

    def matrix(self, name: str) -> Matrix:
        info = self._info(name)
        if len(info.shape) != 2:
            raise UnsupportedModelError(f"{name}: expected a matrix, got shape {info.shape}")
        raw = self.gf.tensor_bytes(name)
        rows, cols = info.shape
        terms = int4_terms(raw, info.ggml_type, info.shape)
        if terms is not None:
            return Matrix(rows, cols, int4=terms)
        try:
            return Matrix(rows, cols, dense=dequantize(raw, info.ggml_type, info.shape))
        except (ValueError, KeyError) as e:
            kind = type_name(info.ggml_type)
            raise UnsupportedModelError(f"{name}: tensor type {kind} unsupported ({e})") from None


def unpermute_order(rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K interleaving (back to rotate-half layout)."""
    head_dim = rows // n_heads
    return np.arange(rows).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def _norm(t: _Tensors, name: str) -> torch.Tensor | None:
    """Norm weights stay float32: they scale the float32 residual stream."""
    return torch.from_numpy(t.vector(name).copy()) if t.has(name) else None


def _block(cfg: ModelConfig, t: _Tensors, i: int, mode: str) -> BlockWeights:
    p = f"blk.{i}."
    q, k, v = (t.matrix(f"{p}attn_{x}.weight") for x in "qkv")
    bias = None
    if cfg.qkv_bias:
        bias = np.concatenate([t.vector(f"{p}attn_{x}.bias") for x in "qkv"])
    if cfg.unpermute_qk:
        q = q.permute_rows(unpermute_order(q.rows, cfg.n_heads))
        k = k.permute_rows(unpermute_order(k.rows, cfg.n_kv_heads))
        if bias is not None:
            qb, kb, vb = np.split(bias, [q.rows, q.rows + k.rows])
            qb = qb[unpermute_order(q.rows, cfg.n_heads)]
            bias = np.concatenate([qb, kb[unpermute_order(k.rows, cfg.n_kv_heads)], vb])
    gate_up = stack_rows([t.matrix(f"{p}ffn_gate.weight"), t.matrix(f"{p}ffn_up.weight")])

    def norm(name: str) -> torch.Tensor | None:
        return _norm(t, p + name)

    attn_norm, ffn_norm = norm("attn_norm.weight"), norm("ffn_norm.weight")
    assert attn_norm is not None and ffn_norm is not None
    return BlockWeights(
        attn_norm=attn_norm,
        qkv=Linear(stack_rows([q, k, v]), mode, bias),
        o=Linear(t.matrix(f"{p}attn_output.weight"), mode),
        ffn_norm=ffn_norm,
        gate_up=Linear(gate_up, mode),
        down=Linear(t.matrix(f"{p}ffn_down.weight"), mode),
        q_norm=norm("attn_q_norm.weight"),
        k_norm=norm("attn_k_norm.weight"),
        post_attn_norm=norm("post_attention_norm.weight"),
        post_ffn_norm=norm("post_ffw_norm.weight"),
    )


def _ropes(cfg: ModelConfig, gf: GGUFFile, t: _Tensors, dtype: torch.dtype) -> dict[float, Rope]:
    factors = None
    if t.has("rope_freqs.weight"):
        factors = torch.from_numpy(t.vector("rope_freqs.weight").copy())
    scale = 1.0
    if gf.arch_get("rope.scaling.type") == "linear":
        scale = 1.0 / float(gf.arch_get("rope.scaling.factor", 1.0) or 1.0)
    bases = {cfg.rope_base, cfg.rope_base_local}
    return {b: Rope(cfg.head_dim, b, torch.float32, factors, scale) for b in bases}


def build_decoder(gf: GGUFFile, cfg: ModelConfig, mode: str = "auto") -> Decoder:
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, not {mode!r}")
    t, dtype = _Tensors(gf), activation_dtype(mode)
    embed_m = t.matrix("token_embd.weight")
    head_name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
    head_m = embed_m if cfg.tied_embeddings else t.matrix(head_name)
    lm_head = Linear(head_m, mode)
    exact_head = None
    if dtype != torch.float32:  # the fast head's leaders get recomputed from the file
        info = gf.tensors[head_name]
        exact_head = ExactRows(gf.tensor_bytes(head_name), info.ggml_type, *info.shape)
        lm_head.approximate_rows()
    if cfg.tied_embeddings and lm_head.dense is not None:
        embed = lm_head.dense  # one dense copy serves both the lookup and the head
    else:
        embed = embed_m.dense_tensor(dtype)
    blocks = [_block(cfg, t, i, mode) for i in range(cfg.n_layers)]
    out_norm = _norm(t, "output_norm.weight")
    if out_norm is None:
        raise UnsupportedModelError(f"{gf.path.name}: tensor 'output_norm.weight' is missing")
    ropes = _ropes(cfg, gf, t, dtype)
    return Decoder(cfg, embed, blocks, out_norm, lm_head, ropes, dtype, exact_head)
