"""GGUF tensor bytes -> what the matrix kernel reads, and its float reference.

The kernel (native/qmatmul.cpp) reads Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and
Q6_K blocks where the file maps them, and F32/F16/BF16 rows likewise: a model's
weights take the file's size in memory and nothing is converted at load. Other
types (Q2_K, Q3_K, the IQ family) are dequantized to bf16 once, with the `gguf`
package's own decoders. `reference_matmul` is the same product in numpy: the
activations quantized as the vector code quantizes them (or both operands rounded
to bf16 as the AMX tiles take them), the weights dequantized by `gguf`; the path
without native ops, and what the tests hold the kernel to.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from accordion.errors import UnsupportedModelError

Q = GGMLQuantizationType
# block types the kernel reads as they are, told apart by their block's byte size
KERNEL_BLOCKS = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
FLOAT_VIEWS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
GROUP = 32  # activation values per scale
LEVELS = 127 * 256 + 127  # activations are int16 multiples of max|x| / LEVELS (qmatmul.cpp)


def type_name(ggml_type: int) -> str:
    try:
        return Q(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def kernel_weights(raw: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> torch.Tensor:
    """A matrix as the kernel reads it: uint8 [rows, blocks, block bytes] or float
    [rows, cols], a view of `raw` (no copy) for every type it knows, else bf16."""
    rows, cols = shape
    t = Q(ggml_type)
    if t in FLOAT_VIEWS:
        view = torch.from_numpy(raw).view(FLOAT_VIEWS[t])
        return view.view(rows, cols)
    if t in KERNEL_BLOCKS:
        block_elems, block_bytes = GGML_QUANT_SIZES[t]
        if cols % block_elems == 0:
            return torch.from_numpy(raw).view(rows, cols // block_elems, block_bytes)
    return torch.from_numpy(dequantize(raw, ggml_type, shape)).to(torch.bfloat16)


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Any supported GGUF type -> float32 array of `shape` (a new array)."""
    t = Q(ggml_type)
    if t == Q.F32:  # a copy: the file is mapped read-only
        return raw.view(np.float32).reshape(shape).copy()
    if t == Q.F16:
        return raw.view(np.float16).reshape(shape).astype(np.float32)
    try:
        out = quants.dequantize(np.asarray(raw), t)
    except NotImplementedError:
        raise UnsupportedModelError(f"tensor type {t.name} is not supported") from None
    return out.reshape(shape).astype(np.float32, copy=False)


def block_type(block_bytes: int) -> Q:
    """The quantized type whose blocks are `block_bytes` long, as kernel_weights holds
    it (uint8 [rows, blocks, block bytes]): the block size names the type."""
    return next(t for t in KERNEL_BLOCKS if GGML_QUANT_SIZES[t][1] == block_bytes)


def kernel_cols(w: torch.Tensor) -> int:
    """Columns of a matrix in the kernel's form, quantized or float."""
    if w.dtype != torch.uint8:
        return w.shape[1]
    return w.shape[1] * GGML_QUANT_SIZES[block_type(w.shape[2])][0]


def weights_dense(w: torch.Tensor, chunk: int = 8192) -> np.ndarray:
    """float32 [rows, cols] of a matrix in the kernel's form, a few MB at a time."""
    if w.dtype != torch.uint8:
        return w.float().numpy()
    rows, t, cols = w.shape[0], block_type(w.shape[2]), kernel_cols(w)
    out = np.empty((rows, cols), np.float32)
    raw = w.numpy().reshape(rows, -1)
    for i in range(0, rows, chunk):
        part = raw[i : i + chunk]
        out[i : i + chunk] = dequantize(part, t, (part.shape[0], cols))
    return out


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """x float32 [M, K] as the kernel sees it: per 32 values, q = rint(x * LEVELS / amax)
    and the value q * (amax / LEVELS), all in float32."""
    g = x.reshape(x.shape[0], -1, GROUP)
    amax = np.abs(g).max(-1, keepdims=True)
    levels = np.float32(LEVELS)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, levels / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(g * inv), -LEVELS, LEVELS)
    return (q * (amax / levels)).reshape(x.shape).astype(np.float32)


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bf16 (nearest, ties to even), as float32."""
    return torch.from_numpy(np.ascontiguousarray(a)).bfloat16().float().numpy()


def reference_matmul(
    x: torch.Tensor, parts: list[torch.Tensor], tiles: bool = False
) -> torch.Tensor:
    """float32 [M, sum of rows]: what native qmatmul computes, up to float rounding.
    Quantized matrices meet int16-quantized activations, as the vector code's do; with
    `tiles`, the AMX-BF16 kernel's operands instead: activations and weights rounded
    to bf16 (native.amx_tiles() says which the CPU runs)."""
    xs = x.float().numpy()
    outs = []
    for w in parts:
        dense = weights_dense(w)
        if w.dtype != torch.uint8:
            xa = xs
        elif tiles:
            xa, dense = to_bf16(xs), to_bf16(dense)
        else:
            xa = quantize_activations(xs)
        outs.append(xa.astype(np.float64) @ dense.astype(np.float64).T)
    return torch.from_numpy(np.concatenate(outs, axis=1).astype(np.float32))
