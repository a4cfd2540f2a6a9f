"""Build a Decoder from a GGUF file's tensors for a chosen weights mode."""

from __future__ import annotations

import numpy as np
import torch

from accordion.errors import UnsupportedModelError
from accordion.loader.gguf_file import GGUFFile
from accordion.models.config import ModelConfig
from accordion.models.decoder import BlockWeights, Decoder
from accordion.models.head import DenseRows, ExactRows
from accordion.models.layers import Rope
from accordion.models.linear import WEIGHT_MODES, Linear
from accordion.models.quant import dequantize, kernel_weights, type_name


class _Tensors:
    """Reads named tensors from the file; names the missing one in the error."""

    def __init__(self, gf: GGUFFile, mode: str) -> None:
        self.gf, self.mode = gf, mode

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

    def matrix(self, name: str) -> torch.Tensor:
        """A view of the file's matrix for the kernel (`fp32`: a float32 copy)."""
        info = self._info(name)
        if len(info.shape) != 2:
            raise UnsupportedModelError(f"{name}: expected a matrix, got shape {info.shape}")
        raw = self.gf.tensor_bytes(name)
        try:
            if self.mode == "fp32":
                return torch.from_numpy(dequantize(raw, info.ggml_type, info.shape))
            return kernel_weights(raw, info.ggml_type, info.shape)
        except (ValueError, KeyError) as e:
            kind = type_name(info.ggml_type)
            raise UnsupportedModelError(f"{name}: tensor type {kind} unsupported ({e})") from None

    def rows(self, name: str) -> ExactRows:
        info = self._info(name)
        return ExactRows(self.gf.tensor_bytes(name), info.ggml_type, *info.shape)


def _norm(t: _Tensors, name: str) -> torch.Tensor | None:
    """Norm weights stay float32: they scale the float32 residual stream."""
    return torch.from_numpy(t.vector(name).copy()) if t.has(name) else None


def _block(cfg: ModelConfig, t: _Tensors, i: int, mode: str) -> BlockWeights:
    p = f"blk.{i}."
    bias = None
    if cfg.qkv_bias:
        bias = np.concatenate([t.vector(f"{p}attn_{x}.bias") for x in "qkv"])

    def matrices(*names: str) -> list[torch.Tensor]:
        return [t.matrix(f"{p}{name}.weight") for name in names]

    def norm(name: str) -> torch.Tensor | None:
        return _norm(t, p + name)

    attn_norm, ffn_norm = norm("attn_norm.weight"), norm("ffn_norm.weight")
    assert attn_norm is not None and ffn_norm is not None
    return BlockWeights(
        attn_norm=attn_norm,
        qkv=Linear(matrices("attn_q", "attn_k", "attn_v"), mode, bias),
        o=Linear(matrices("attn_output"), mode),
        ffn_norm=ffn_norm,
        gate_up=Linear(matrices("ffn_gate", "ffn_up"), mode),
        down=Linear(matrices("ffn_down"), mode),
        q_norm=norm("attn_q_norm.weight"),
        k_norm=norm("attn_k_norm.weight"),
        post_attn_norm=norm("post_attention_norm.weight"),
        post_ffn_norm=norm("post_ffw_norm.weight"),
    )


def _ropes(cfg: ModelConfig, gf: GGUFFile, t: _Tensors) -> dict[float, Rope]:
    factors = None
    if t.has("rope_freqs.weight"):
        factors = torch.from_numpy(t.vector("rope_freqs.weight").copy())
    scale = 1.0
    if gf.arch_get("rope.scaling.type") == "linear":
        scale = 1.0 / float(gf.arch_get("rope.scaling.factor", 1.0) or 1.0)
    bases = {cfg.rope_base, cfg.rope_base_local}
    return {
        b: Rope(cfg.head_dim, b, torch.float32, factors, scale, cfg.rope_interleaved) for b in bases
    }


def build_decoder(gf: GGUFFile, cfg: ModelConfig, mode: str = "auto") -> Decoder:
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, not {mode!r}")
    t = _Tensors(gf, mode)
    head_name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
    lm_head = Linear([t.matrix(head_name)], mode)
    embed: ExactRows | DenseRows
    exact_head = None
    if mode == "fp32":  # float32 rows: the head's copy when it is the same matrix
        dense = lm_head.dense if cfg.tied_embeddings else t.matrix("token_embd.weight")
        assert dense is not None
        embed = DenseRows(dense)
    else:  # rows from the file; the head's leaders get recomputed in float32 from it
        embed = t.rows("token_embd.weight")
        exact_head = embed if cfg.tied_embeddings else t.rows(head_name)
    blocks = [_block(cfg, t, i, mode) for i in range(cfg.n_layers)]
    out_norm = _norm(t, "output_norm.weight")
    if out_norm is None:
        raise UnsupportedModelError(f"{gf.path.name}: tensor 'output_norm.weight' is missing")
    # K and V in bf16 halve the cache; fp32, the reference, keeps them exact
    kv_dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    ropes = _ropes(cfg, gf, t)
    return Decoder(cfg, embed, blocks, out_norm, lm_head, ropes, kv_dtype, exact_head)
