"""GGUF int4 groups against gguf's own decoders, and Linear against a float64 reference."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from accordion import native
from accordion.models import linear
from accordion.models.build import unpermute_order
from accordion.models.linear import INT4_MAX_ROWS, Linear, Matrix, stack_rows
from accordion.models.quant import int4_terms

Q = GGMLQuantizationType
ROWS = (1, 3, 8, 64)  # the int4 kernel for few rows, the dense GEMM for many
# |y - ref| <= TOL * max|ref|: bf16 activations, weights, scales and output round at
# ~2^-9 relative (measured ~4e-3); fp32 only reorders float32 sums (~5e-7).
TOL = {"auto": 2e-2, "int4": 2e-2, "bf16": 2e-2, "fp32": 1e-5}


def quantized(rows: int, cols: int, qtype: Q, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random matrix quantized with gguf: (raw bytes, gguf's own float32 decoding)."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    raw = quants.quantize(w, qtype)
    return raw, quants.dequantize(raw, qtype).reshape(rows, cols)


def as_matrix(raw: np.ndarray, qtype: Q, rows: int, cols: int) -> Matrix:
    """What the model builder does: int4 terms when the type allows, else dense floats."""
    terms = int4_terms(raw, qtype, (rows, cols))
    if terms is not None:
        return Matrix(rows, cols, int4=terms)
    return Matrix(rows, cols, dense=quants.dequantize(raw, qtype).reshape(rows, cols))


def qmatrix(rows: int, cols: int, qtype: Q, seed: int = 0) -> Matrix:
    return as_matrix(quantized(rows, cols, qtype, seed)[0], qtype, rows, cols)


def act_dtype(mode: str) -> torch.dtype:
    return torch.float32 if mode == "fp32" else torch.bfloat16


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


# -- int4_terms ----------------------------------------------------------------


@pytest.mark.parametrize(("qtype", "n_terms"), [(Q.Q4_0, 1), (Q.Q4_1, 1), (Q.Q8_0, 2)])
@pytest.mark.parametrize("shape", [(16, 32), (48, 256), (7, 96)])
def test_int4_terms_match_gguf_dequantize(qtype: Q, n_terms: int, shape: tuple[int, int]) -> None:
    raw, ref = quantized(*shape, qtype)
    terms = int4_terms(raw, qtype, shape)
    assert terms is not None and len(terms) == n_terms
    for g in terms:
        assert g.q.shape == shape and g.q.dtype == np.uint8 and g.q.max() <= 15
        assert g.scale.shape == g.zero.shape == (shape[0], shape[1] // 32)
    np.testing.assert_array_equal(Matrix(*shape, int4=terms).to_dense(), ref)


def test_q8_0_terms_cover_the_whole_int8_range() -> None:
    """Every int8 value, including -128 and 127, splits exactly into its two nibbles."""
    q = np.arange(-128, 128, dtype=np.int8).reshape(8, 32)
    blocks = np.zeros((8, 1, 34), np.uint8)
    blocks[..., 0:2] = np.array([0.5], np.float16).view(np.uint8)
    blocks[..., 2:] = q.view(np.uint8)[:, None, :]
    terms = int4_terms(blocks.reshape(8, 34), Q.Q8_0, (8, 32))
    assert terms is not None
    np.testing.assert_array_equal(Matrix(8, 32, int4=terms).to_dense(), q * np.float32(0.5))


@pytest.mark.slow
def test_int4_terms_match_gguf_dequantize_q4_k() -> None:
    from accordion.loader.bundled import resolve_model_path
    from accordion.loader.gguf_file import open_gguf

    gf = open_gguf(resolve_model_path("gemma3"))
    info = gf.tensors["blk.0.attn_output.weight"]
    assert info.ggml_type == Q.Q4_K
    raw = gf.tensor_bytes(info.name)
    ref = quants.dequantize(np.asarray(raw), Q.Q4_K).reshape(info.shape)
    terms = int4_terms(raw, info.ggml_type, info.shape)
    assert terms is not None and len(terms) == 1
    m = Matrix(*info.shape, int4=terms)
    np.testing.assert_array_equal(m.to_dense(), ref)
    # and the int4 kernel on it, with scale and zero rounded to bf16
    x = torch.randn(2, info.shape[1], generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16)
    y = Linear(m, "int4")(x)
    assert rel_err(y, x.double() @ torch.from_numpy(ref).double().T) < TOL["int4"]


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K])
def test_int4_terms_is_none_for_other_types(qtype: Q) -> None:
    rows, cols = 4, 256  # one K-quant super-block per row
    block_elems, block_bytes = GGML_QUANT_SIZES[Q(qtype)]
    raw = np.zeros((rows, cols // block_elems * block_bytes), np.uint8)
    assert int4_terms(raw, qtype, (rows, cols)) is None


def test_int4_terms_is_none_for_non_matrices() -> None:
    raw, _ = quantized(4, 64, Q.Q4_0)
    assert int4_terms(raw, Q.Q4_0, (2, 2, 64)) is None


# -- Linear ---------------------------------------------------------------------


@pytest.fixture
def dense_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls to the dense GEMM (F.linear) inside Linear; the int kernels are the rest."""
    calls: list[int] = []

    def spy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(x.numel() // x.shape[-1])
        return torch.nn.functional.linear(x, w, b)

    monkeypatch.setattr(linear, "F", SimpleNamespace(linear=spy))
    return calls


def expects_dense(mode: str, n_terms: int, rows: int) -> bool:
    if mode in ("bf16", "fp32") or not n_terms:
        return True
    return mode == "auto" and rows > INT4_MAX_ROWS[n_terms]


@pytest.mark.parametrize("mode", ["auto", "int4", "bf16", "fp32"])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_dequantized_product(
    mode: str, qtype: Q, with_bias: bool, dense_calls: list[int]
) -> None:
    n, k = 96, 256
    raw, w = quantized(n, k, qtype, seed=1)
    bias = np.random.default_rng(2).standard_normal(n).astype(np.float32) * 0.1
    lin = Linear(as_matrix(raw, qtype, n, k), mode, bias if with_bias else None)
    gen = torch.Generator().manual_seed(3)
    for rows in ROWS:
        dense_calls.clear()
        x = torch.randn(rows, k, generator=gen).to(act_dtype(mode))
        y = lin(x)
        ref = x.double() @ torch.from_numpy(w).double().T
        if with_bias:
            ref += torch.from_numpy(bias).double()
        assert y.shape == (rows, n) and y.dtype == act_dtype(mode)
        assert rel_err(y, ref) < TOL[mode], (rows, rel_err(y, ref))
        n_terms = {Q.Q8_0: 2, Q.Q5_0: 0}.get(qtype, 1)
        assert bool(dense_calls) == expects_dense(mode, n_terms, rows), rows


@pytest.mark.parametrize("mode", ["auto", "int4"])
def test_linear_int4_with_rows_not_a_multiple_of_16_falls_back_to_dense(mode: str) -> None:
    raw, w = quantized(40, 64, Q.Q4_0)  # torch packs int4 in tiles of 16 output rows
    lin = Linear(as_matrix(raw, Q.Q4_0, 40, 64), mode)  # e.g. an lm_head over 32002 tokens
    assert not lin.int4 and lin.dense is not None
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert rel_err(lin(x), x.double() @ torch.from_numpy(w).double().T) < TOL[mode]


@pytest.mark.parametrize("mode", ["auto", "int4", "bf16", "fp32"])
def test_linear_keeps_leading_dims(mode: str) -> None:
    raw, w = quantized(32, 64, Q.Q4_1)
    lin = Linear(as_matrix(raw, Q.Q4_1, 32, 64), mode)
    for shape in ((2, 3, 64), (2, 16, 64)):  # 6 rows: int kernel in auto; 32 rows: dense
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(act_dtype(mode))
        y = lin(x)
        assert y.shape == (*shape[:-1], 32)
        assert rel_err(y, x.double() @ torch.from_numpy(w).double().T) < TOL[mode]


def test_linear_representation_per_mode() -> None:
    n, k = 64, 128
    q4, q8, q5 = qmatrix(n, k, Q.Q4_0), qmatrix(n, k, Q.Q8_0), qmatrix(n, k, Q.Q5_0)

    auto = Linear(q4, "auto")  # int4 for decode, a bf16 copy for prefill
    assert len(auto.int4) == 1
    assert auto.dense is not None and auto.dense.dtype == torch.bfloat16

    int4 = Linear(q4, "int4")
    assert len(int4.int4) == 1 and int4.dense is None
    assert len(Linear(q8, "int4").int4) == 2  # high and low nibbles

    for mode in ("auto", "int4"):  # Q5_0 has no exact int4 form: it stays dense bf16
        lin = Linear(q5, mode)
        assert not lin.int4
        assert lin.dense is not None and lin.dense.dtype == torch.bfloat16

    for m in (q4, q8, q5):
        bf16 = Linear(m, "bf16")
        assert not bf16.int4
        assert bf16.dense is not None and bf16.dense.dtype == torch.bfloat16
        fp32 = Linear(m, "fp32")
        assert not fp32.int4
        assert fp32.dense is not None and fp32.dense.dtype == torch.float32
        assert fp32.nbytes() == n * k * 4

    assert int4.nbytes() < Linear(q4, "bf16").nbytes() < auto.nbytes()


# -- stack_rows and permute_rows ------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "int4", "bf16", "fp32"])
def test_stack_rows_equals_separate_products(mode: str) -> None:
    k = 128
    parts = [qmatrix(n, k, Q.Q4_0, seed=n) for n in (64, 32, 32)]
    fused = stack_rows(parts)
    assert fused.int4 is not None and (fused.rows, fused.cols) == (128, k)
    np.testing.assert_array_equal(fused.to_dense(), np.concatenate([p.to_dense() for p in parts]))
    fused_lin, lins = Linear(fused, mode), [Linear(p, mode) for p in parts]
    for rows in ROWS:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        x = x.to(act_dtype(mode))
        separate = torch.cat([lin(x) for lin in lins], dim=-1)
        y = fused_lin(x)
        scale = float(separate.abs().max())
        torch.testing.assert_close(y, separate, rtol=0, atol=TOL[mode] / 2 * scale)


def test_stack_rows_mixed_types_goes_dense() -> None:
    k = 64
    a, b = qmatrix(32, k, Q.Q4_1), qmatrix(16, k, Q.Q8_0)  # one int4 term and two
    fused = stack_rows([a, b])
    assert fused.int4 is None and fused.dense is not None
    np.testing.assert_array_equal(fused.dense, np.concatenate([a.to_dense(), b.to_dense()]))
    assert stack_rows([a]) is a


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("n_head", "head_dim"), [(4, 16), (2, 16), (3, 64), (1, 8)])
def test_unpermute_order_inverts_llama_cpp_permutation(n_head: int, head_dim: int) -> None:
    rows = n_head * head_dim
    hf = np.arange(rows)
    order = unpermute_order(rows, n_head)
    assert sorted(order) == list(range(rows))
    np.testing.assert_array_equal(llama_cpp_permute(hf, n_head)[order], hf)


@pytest.mark.parametrize("n_head", [4, 2])  # Q heads and fewer K/V heads
def test_permute_rows_restores_hf_layout(n_head: int) -> None:
    head_dim, cols = 16, 64
    rows = n_head * head_dim
    hf = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    order = unpermute_order(rows, n_head)

    dense = Matrix(rows, cols, dense=llama_cpp_permute(hf, n_head)).permute_rows(order)
    np.testing.assert_array_equal(dense.to_dense(), hf)

    # Q4_0 quantizes each row on its own, so quantizing commutes with the row order
    raw = quants.quantize(llama_cpp_permute(hf, n_head), Q.Q4_0)
    m = as_matrix(raw, Q.Q4_0, rows, cols).permute_rows(order)
    assert m.int4 is not None
    expected = quants.dequantize(quants.quantize(hf, Q.Q4_0), Q.Q4_0).reshape(rows, cols)
    np.testing.assert_array_equal(m.to_dense(), expected)


def test_approximate_rows_serves_few_rows_from_int8(dense_calls: list[int]) -> None:
    """A head with no single int4 term decodes few rows from a per-row int8 copy: close to
    the exact product (its leaders are recomputed exactly elsewhere), dense beyond."""
    n, k = 64, 256
    raw, w = quantized(n, k, Q.Q8_0, seed=4)
    head = Linear(as_matrix(raw, Q.Q8_0, n, k), "auto")
    head.approximate_rows()
    assert head.int8 is not None and not head.int4  # replaces the two int4 terms
    assert head.int8[0].dtype == torch.int8 and head.int8[0].numel() == n * k
    top = head.int8_max_rows
    gen = torch.Generator().manual_seed(5)
    for rows in (1, top, top + 1):
        dense_calls.clear()
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        ref = x.double() @ torch.from_numpy(w).double().T
        assert rel_err(head(x), ref) < TOL["auto"]
        assert bool(dense_calls) == (rows > top)
    if native.available() and native.cpu_has("avx512f"):  # native blocks, as torch's kernel
        assert head.int8_native
        q, scale = head.int8
        flat = q.transpose(1, 2).reshape(n, k).contiguous()
        for rows in (1, 3, 5, 12):
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            theirs = torch.ops.aten._weight_int8pack_mm(x, flat, scale.to(torch.bfloat16))
            torch.testing.assert_close(head(x), theirs.float(), rtol=1e-2, atol=1e-2)
    one_term = Linear(qmatrix(n, k, Q.Q4_0), "auto")
    one_term.approximate_rows()  # a single int4 term is already smaller than int8
    assert one_term.int8 is None and len(one_term.int4) == 1
