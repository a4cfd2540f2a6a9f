"""The matrix kernel over GGUF blocks, every type real files use, against gguf's own
decoders; and its promise: each output row depends on its input row alone."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from tiny_gguf import K_QUANTS, k_quant_blocks

from accordion import native
from accordion.models.head import ExactRows, rescore
from accordion.models.linear import Linear
from accordion.models.quant import kernel_weights, quantize_activations, reference_matmul

Q = GGMLQuantizationType
TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, *K_QUANTS, Q.F16, Q.BF16, Q.F32)
QUANTIZED = tuple(t for t in TYPES if t not in (Q.F16, Q.BF16, Q.F32))
# |y - ref| <= TOL * max|ref|: the kernel and the float64 reference see the same
# operands (int16-rounded activations, or both rounded to bf16 on AMX tiles); only
# float32 sums differ (~3e-7).
TOL = 5e-6
needs_native = pytest.mark.skipif(not native.available(), reason="native ops unavailable")


def kernel_reference(x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """reference_matmul with the operands of the path this CPU runs."""
    return reference_matmul(x, parts, tiles=native.amx_tiles())


def raw_matrix(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A random matrix in `qtype`'s bytes, [rows, row bytes]. gguf quantizes the simple
    types; K-quant blocks are tiny_gguf's random ones (gguf's Python has no K-quant
    quantizer; its decoder is the reference either way)."""
    rng = np.random.default_rng(seed)
    if qtype in K_QUANTS:
        return k_quant_blocks(rng, rows, cols, qtype)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    if qtype == Q.F32:
        return w.view(np.uint8)
    if qtype == Q.F16:
        return w.astype(np.float16).view(np.uint8)
    return quants.quantize(w, qtype)


def weights(qtype: Q, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(the kernel's view of the bytes, gguf's float32 decoding)."""
    raw = raw_matrix(qtype, rows, cols, seed)
    flat = np.ascontiguousarray(raw).reshape(-1)
    if qtype == Q.F32:
        ref = flat.view(np.float32).reshape(rows, cols)
    elif qtype == Q.F16:
        ref = flat.view(np.float16).astype(np.float32).reshape(rows, cols)
    else:
        ref = quants.dequantize(raw, qtype).reshape(rows, cols)
    return kernel_weights(flat, qtype, (rows, cols)), ref


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).abs().max() / ref.abs().max())


def cols_for(qtype: Q) -> list[int]:
    # 96: an odd number of blocks; the last, rows staged in more than one range of
    # blocks (qmatmul.cpp's range_blocks), an odd number of them
    return [256, 512, 768] if qtype in K_QUANTS else [96, 256, 1056]


@pytest.mark.parametrize("qtype", TYPES)
def test_kernel_weights_are_views_of_the_file_bytes(qtype: Q) -> None:
    raw = np.ascontiguousarray(raw_matrix(qtype, 16, cols_for(qtype)[0])).reshape(-1)
    w = kernel_weights(raw, qtype, (16, cols_for(qtype)[0]))
    assert w.data_ptr() == raw.ctypes.data  # nothing copied or converted
    assert w.numel() * w.element_size() == raw.nbytes


@pytest.mark.parametrize("qtype", TYPES)
def test_reference_matches_gguf_dequantize(qtype: Q) -> None:
    cols = cols_for(qtype)[0]
    w, ref = weights(qtype, 24, cols)
    x = torch.randn(5, cols)
    xa = quantize_activations(x.numpy()) if w.dtype == torch.uint8 else x.numpy()
    want = torch.from_numpy(xa.astype(np.float64) @ ref.astype(np.float64).T)
    assert rel_err(reference_matmul(x, [w]), want) < 1e-6


def test_activations_round_to_int16_per_block() -> None:
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32) * 4
    xa = quantize_activations(x)
    step = np.abs(x.reshape(3, 2, 32)).max(-1, keepdims=True) / 32767
    assert np.all(np.abs(xa - x).reshape(3, 2, 32) <= step / 2 * 1.0001)
    assert np.array_equal(quantize_activations(np.zeros((1, 32), np.float32)), np.zeros((1, 32)))


@needs_native
@pytest.mark.parametrize("qtype", TYPES)
def test_kernel_matches_dequantized_reference(qtype: Q) -> None:
    for cols in cols_for(qtype):
        w, _ = weights(qtype, 40, cols)
        for m in (1, 5, 9, 33):  # lone rows, partial and full row tiles
            x = torch.randn(m, cols)
            y = torch.ops.accordion.qmatmul(x, [w], None)
            assert rel_err(y, kernel_reference(x, [w])) < TOL, (qtype.name, cols, m)


@needs_native
@pytest.mark.parametrize("qtype", QUANTIZED)
def test_exact_rows_are_the_bits_of_gguf_decoders(qtype: Q) -> None:
    """The embedding's and the head's exact rows (native/rows.cpp) are the float32
    values gguf's decoders give, bit for bit, for rows in any order and repeated; for
    blocks of random bytes too (infinite and NaN scales: NaN where gguf has NaN)."""
    cols = cols_for(qtype)[-1]
    quantized = np.ascontiguousarray(raw_matrix(qtype, 40, cols, seed=5)).reshape(40, -1)
    noise = np.random.default_rng(6).integers(0, 256, quantized.shape, dtype=np.uint8)
    ids = np.array([39, 0, 7, 7, 21])
    for raw in (quantized, noise):
        rows = ExactRows(raw.reshape(-1), qtype, 40, cols)
        assert rows.block_bytes  # the native op, not gguf's decoders
        got = rows(ids)
        with np.errstate(all="ignore"):
            want = quants.dequantize(raw[ids], qtype).reshape(len(ids), cols)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    with pytest.raises(RuntimeError, match="row id out of range"):
        rows(np.array([40]))


@needs_native
@pytest.mark.parametrize("qtype", QUANTIZED)
def test_native_rescore_is_numpys_each_row_alone(qtype: Q) -> None:
    """The head's second pass natively (native/rows.cpp) recomputes the logits numpy's
    does (those within MARGIN of their row's maximum: no more, no fewer), to float32
    rounding, and leaves every other logit's bits; each row's result is the same
    rescored alone or with others; a row with a NaN is left as it is; a row of -inf
    (every logit a leader) is rescored whole, as numpy's is, vocabulary of 40 and all."""
    cols = cols_for(qtype)[-1]
    raw = np.ascontiguousarray(raw_matrix(qtype, 40, cols, seed=8)).reshape(-1)
    native_rows, numpy_rows = ExactRows(raw, qtype, 40, cols), ExactRows(raw, qtype, 40, cols)
    numpy_rows.block_bytes = 0  # gguf's decoders and numpy, as without native ops
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(5, cols, generator=gen)
    logits = torch.randn(5, 40, generator=gen) * 2  # several leaders a row
    logits[3, 11] = float("nan")
    logits[4] = -float("inf")
    ours, theirs = logits.clone(), logits.clone()
    rescore(ours, hidden, native_rows)
    rescore(theirs, hidden, numpy_rows)
    changed = ~((theirs == logits) | (theirs.isnan() & logits.isnan()))
    assert changed[:3].any(dim=1).all() and changed[4].all() and not changed[3].any()
    same = ~changed
    assert torch.equal(ours[same].view(torch.int32), logits[same].view(torch.int32))
    torch.testing.assert_close(ours[changed], theirs[changed], rtol=1e-5, atol=1e-5)
    for r in range(5):
        alone = logits[r : r + 1].clone()
        rescore(alone, hidden[r : r + 1], native_rows)
        assert torch.equal(alone.view(torch.int32), ours[r : r + 1].view(torch.int32))


@needs_native
@pytest.mark.parametrize("qtype", TYPES)
def test_each_row_depends_on_its_input_row_alone(qtype: Q) -> None:
    """Bit for bit: alone, in any batch, at any place in it."""
    cols = cols_for(qtype)[-1]
    w, _ = weights(qtype, 48, cols, seed=3)
    x = torch.randn(37, cols)
    batch = torch.ops.accordion.qmatmul(x, [w], None)
    for i in (0, 7, 8, 20, 36):
        alone = torch.ops.accordion.qmatmul(x[i : i + 1].contiguous(), [w], None)
        assert torch.equal(alone[0], batch[i])
    order = torch.randperm(37)
    assert torch.equal(torch.ops.accordion.qmatmul(x[order].contiguous(), [w], None), batch[order])


@needs_native
def test_fused_parts_of_different_types_equal_separate_products() -> None:
    """Q, K and V of a Q4_K_M file: Q4_K, Q4_K and Q6_K in one call, with a bias."""
    parts = [
        weights(t, n, 256, seed=i)[0]
        for i, (t, n) in enumerate([(Q.Q4_K, 32), (Q.Q4_K, 16), (Q.Q6_K, 16)])
    ]
    bias = torch.randn(64)
    x = torch.randn(6, 256)
    fused = torch.ops.accordion.qmatmul(x, parts, bias)
    separate = torch.cat([torch.ops.accordion.qmatmul(x, [p], None) for p in parts], 1) + bias
    assert torch.equal(fused, separate)


@needs_native
def test_kernel_rejects_what_it_cannot_read() -> None:
    w, _ = weights(Q.Q4_0, 16, 64)
    with pytest.raises(RuntimeError, match="K / block"):
        torch.ops.accordion.qmatmul(torch.randn(2, 96), [w], None)
    with pytest.raises(RuntimeError, match="no quantized type"):
        torch.ops.accordion.qmatmul(
            torch.randn(2, 64), [torch.zeros(4, 2, 19, dtype=torch.uint8)], None
        )
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.accordion.qmatmul(torch.randn(2, 64).double(), [w], None)


@pytest.mark.parametrize("mode", ["auto", "fp32"])
def test_linear_keeps_leading_dims_and_adds_its_bias(mode: str) -> None:
    w, ref = weights(Q.Q4_1, 32, 64)
    bias = np.random.default_rng(2).standard_normal(32).astype(np.float32)
    lin = Linear([w], mode, bias)
    x = torch.randn(2, 3, 64)
    y = lin(x)
    assert y.shape == (2, 3, 32)
    want = x.reshape(6, 64).double() @ torch.from_numpy(ref).double().T + torch.from_numpy(bias)
    # auto: int16 activations, or bf16 operands on AMX tiles
    tol = 1e-6 if mode == "fp32" else 1e-2 if native.amx_tiles() else 1e-4
    assert rel_err(y.reshape(6, 32), want) < tol


def test_linear_holds_the_file_bytes_in_auto_and_a_float32_copy_in_fp32() -> None:
    w, _ = weights(Q.Q4_0, 32, 64)
    auto, fp32 = Linear([w], "auto"), Linear([w], "fp32")
    assert auto.dense is None and auto.parts[0].data_ptr() == w.data_ptr()
    assert auto.nbytes() == 32 * 64 // 32 * 18  # Q4_0: 18 bytes per 32 weights
    assert fp32.dense is not None and fp32.nbytes() == 32 * 64 * 4


def test_types_without_a_kernel_are_held_as_bf16() -> None:
    raw = np.ascontiguousarray(quants.quantize(np.ones((4, 256), np.float32), Q.Q8_0)).reshape(-1)
    # Q8_0 bytes declared as a type the kernel does not read (Q2_K would be typical)
    w = kernel_weights(raw, Q.Q8_0, (4, 256))
    assert w.dtype == torch.uint8
    q2 = np.zeros(4 * 256 // 256 * GGML_QUANT_SIZES[Q.Q2_K][1], np.uint8)
    held = kernel_weights(q2, Q.Q2_K, (4, 256))
    assert held.dtype == torch.bfloat16 and held.shape == (4, 256)


@needs_native
@pytest.mark.parametrize("qtype", QUANTIZED)
def test_amx_tiles_and_the_vector_code_each_compute_their_reference(qtype: Q) -> None:
    """Where the CPU has AMX-BF16, every product takes the tiles (bf16 operands); the
    vector code (int16 activations) serves the other CPUs. Each matches its own
    reference, and the two agree to bf16's precision."""
    w, _ = weights(qtype, 40, cols_for(qtype)[-1], seed=6)
    x = torch.randn(70, w.shape[1] * (256 if qtype in K_QUANTS else 32))
    try:
        if not torch.ops.accordion.qmatmul_amx(True):
            pytest.skip("no AMX-BF16 on this CPU")
        tiles = torch.ops.accordion.qmatmul(x, [w], None)
        torch.ops.accordion.qmatmul_amx(False)
        vectors = torch.ops.accordion.qmatmul(x, [w], None)
    finally:
        torch.ops.accordion.qmatmul_amx(True)
    assert rel_err(tiles, reference_matmul(x, [w], tiles=True)) < TOL
    assert rel_err(vectors, reference_matmul(x, [w])) < TOL
    assert rel_err(tiles, vectors) < 1e-2


# The tile code with its instructions computed in C++ (native/tiles.h), under its own
# op namespace; -O1 compiles it in a third of the time, and changes no bits (IEEE
# arithmetic at any level, -ffp-contract=off)
SOFT_TILES = (
    "-O1",
    "-DACCORDION_SOFT_TILES",
    "-DACCORDION_OPS=accordion_soft",
    "-fvisibility=hidden",  # its copies of the kernels' functions stay its own
    "-fvisibility-inlines-hidden",
)


@pytest.fixture(scope="module", params=["c++ tiles", "cpu"])
def int8_tile_ops(request: pytest.FixtureRequest) -> Iterator[object]:
    """The ops whose many-row products take AMX-INT8 tiles: the C++ tiles' build,
    on every CPU, and this CPU's own where it has AMX-INT8."""
    if not native.available():
        pytest.skip("native ops unavailable")
    if request.param == "cpu":  # bf16 tiles off: the vector code, whose products these are
        if native.choose_products("int8") != "int16 vectors + int8 tiles":
            native.choose_products("auto")
            pytest.skip("no AMX-INT8 on this CPU")
        yield torch.ops.accordion
        native.choose_products("auto")  # the suite's default
        return
    here = Path(native.__file__).parent
    sources = [here / "qmatmul.cpp", here / "qmatmul_amx.cpp"]
    torch.ops.load_library(str(native.build(sources, SOFT_TILES, "accordion_soft_tiles")))
    torch.ops.accordion_soft.qmatmul_amx(False)  # its own switches, as above
    yield torch.ops.accordion_soft


@pytest.mark.parametrize("qtype", QUANTIZED)
def test_int8_tiles_give_the_vector_codes_bits(int8_tile_ops: object, qtype: Q) -> None:
    """Products of many rows on AMX-INT8 tiles sum the same exact integers as the
    vector code and fold them by the same steps: the same bits, tile by tile of 16
    rows (whole, partial, several), for every quantized type. A decode step's few
    rows stay on the vectors, so prefill and decode still share one arithmetic."""
    ops = int8_tile_ops
    w, _ = weights(qtype, 40, cols_for(qtype)[-1], seed=7)
    k = w.shape[1] * (256 if qtype in K_QUANTS else 32)
    for m in (9, 16, 37):
        x = torch.randn(m, k) * torch.rand(m, 1) * 4  # rows of unlike scales
        ops.qmatmul_int8_tiles(False)
        vectors = ops.qmatmul(x, [w], None)
        assert ops.qmatmul_int8_tiles(True)
        tiles = ops.qmatmul(x, [w], None)
        assert torch.equal(tiles, vectors), (m, float((tiles - vectors).abs().max()))
    assert rel_err(vectors, reference_matmul(x, [w])) < TOL


@needs_native
@pytest.mark.parametrize("qtype", TYPES)
def test_kernel_reads_nothing_past_the_last_row(qtype: Q) -> None:
    """A file's last tensor ends its mapping: the weights here end where a page
    nobody may read begins (an over-read would kill the process, not fail)."""
    page = mmap.PAGESIZE
    raw = np.ascontiguousarray(raw_matrix(qtype, 16, cols_for(qtype)[0])).reshape(-1)
    pages = -(-raw.nbytes // page)
    region = mmap.mmap(-1, (pages + 1) * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(base + pages * page), page, 0) == 0  # PROT_NONE
    try:
        at = pages * page - raw.nbytes
        view = np.frombuffer(region, np.uint8, raw.nbytes, at)
        view[:] = raw
        w = kernel_weights(view, qtype, (16, cols_for(qtype)[0]))
        for m in (1, 20, 40):  # vectors streamed, from a panel; tiles streamed, decoded once
            x = torch.randn(m, cols_for(qtype)[0])
            assert (
                rel_err(torch.ops.accordion.qmatmul(x, [w], None), kernel_reference(x, [w])) < TOL
            )
        if qtype in QUANTIZED:  # the last row, as the embedding and the head read it
            last = ExactRows(view, qtype, 16, cols_for(qtype)[0])(np.array([15]))
            assert np.array_equal(last, quants.dequantize(raw.reshape(16, -1)[15:], qtype))
        del w, view
    finally:
        libc.mprotect(ctypes.c_void_p(base + pages * page), page, 3)  # read and write again
