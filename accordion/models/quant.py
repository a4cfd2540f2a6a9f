"""GGUF tensor bytes -> numbers torch can use.

Q4_0, Q4_1 and Q4_K store 4-bit values in groups of 32 with one scale and one
offset per group; that is exactly torch's int4 group-32 layout
(w = (q - 8) * scale + zero), so those weights stay 4-bit without loss beyond
rounding the scale and zero to the activation dtype. Q8_0 splits exactly into
two such terms (q = 16 * high nibble + low nibble), which read less memory than
a bf16 copy. Everything else is dequantized with the `gguf` package's own
decoders.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from accordion.errors import UnsupportedModelError

Q = GGMLQuantizationType
INT4_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q8_0})
GROUP = 32


@dataclass
class Int4Groups:
    q: np.ndarray  # uint8 [N, K], values 0..15
    scale: np.ndarray  # float32 [N, K // 32]
    zero: np.ndarray  # float32 [N, K // 32]


def type_name(ggml_type: int) -> str:
    try:
        return Q(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def _blocks(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    block_elems, block_bytes = GGML_QUANT_SIZES[Q(ggml_type)]
    n_rows, k = shape[0], int(np.prod(shape[1:]))
    return raw.reshape(n_rows, k // block_elems, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _low_high(qs: np.ndarray) -> np.ndarray:
    """16 packed bytes -> 32 nibbles: low nibbles are elements 0..15, high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def int4_terms(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> list[Int4Groups] | None:
    """Int4 group-32 matrices that sum exactly to a Q4_0/Q4_1/Q4_K/Q8_0 matrix, else None."""
    if ggml_type not in INT4_TYPES or len(shape) != 2 or shape[1] % GROUP:
        return None
    n = shape[0]
    b = _blocks(raw, ggml_type, shape)
    if ggml_type == Q.Q8_0:
        d = _f16(b[..., 0:2])
        u = b[..., 2:34]  # int8 q as its two's-complement byte
        # q = 16 * (high - 8) + low: the signed high nibble plus 8 is the unsigned one
        # with its top bit flipped, so both come from the byte without widening
        high, low = (u >> 4) ^ 8, u & 0x0F
        return [_groups(n, high, 16 * d, np.zeros_like(d)), _groups(n, low, d, 8 * d)]
    if ggml_type == Q.Q4_0:
        d = _f16(b[..., 0:2])
        q = _low_high(b[..., 2:18])
        scale, zero = d, np.zeros_like(d)
    elif ggml_type == Q.Q4_1:
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        q = _low_high(b[..., 4:20])
        scale, zero = d, m + 8 * d
    else:  # Q4_K: 256-element super-blocks of 8 sub-blocks with 6-bit scales and mins
        nb = b.shape[1]
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = quants.Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
        sc = sc.reshape(n, nb, 8).astype(np.float32)
        mn = mn.reshape(n, nb, 8).astype(np.float32)
        # each 32 bytes hold two sub-blocks: low nibbles first, then high nibbles
        qs = b[..., 16:144].reshape(n, nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
        q = (qs & 0x0F).reshape(n, nb, 8, 32)
        scale = d[..., None] * sc
        zero = 8 * scale - dmin[..., None] * mn
    return [_groups(n, q, scale, zero)]


def _groups(n: int, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> Int4Groups:
    return Int4Groups(
        np.ascontiguousarray(q.reshape(n, -1)),
        scale.reshape(n, -1).astype(np.float32),
        zero.reshape(n, -1).astype(np.float32),
    )


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Any supported GGUF type -> float32 array of `shape`."""
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
