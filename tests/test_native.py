"""The native block ops agree with the Python path they replace."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPECS, PlainKV, paged_logits, step_batch

from accordion import native
from accordion.loader.gguf_file import open_gguf
from accordion.models.build import build_decoder
from accordion.models.config import config_from_gguf

pytestmark = pytest.mark.skipif(
    os.environ.get("ACCORDION_NATIVE") == "0", reason="native ops switched off"
)


def test_native_ops_build_and_load() -> None:
    assert native.available(), "block.cpp did not build or load: see the logged compiler error"
    assert native.library_path().exists()


def test_the_amx_code_compiles_on_any_cpu() -> None:
    """The AMX code compiles only where -march=native has AMX: built here with the
    AMX flags (compiled and linked, never loaded), a CPU without AMX still catches
    its compile and assembler errors, such as a tile register the intrinsics cannot
    name (native.build raises with the compiler's report)."""
    here = Path(native.__file__).parent
    sources = [here / f"{name}.cpp" for name in ("qmatmul", "qmatmul_amx", "attention")]
    amx = ("-O1", "-mamx-tile", "-mamx-int8", "-mamx-bf16", "-mavx512bf16")
    assert native.build(sources, amx, "accordion_amx_check").exists()


def test_the_products_choice_is_checked_and_applied() -> None:
    """native.choose_products (and ACCORDION_PRODUCTS, for a process) picks the code of
    the quantized products; a name it does not know is an error, not the default."""
    assert native.available()
    with pytest.raises(ValueError, match="one of auto, vector, int8"):
        native.choose_products("fastest")
    try:
        assert native.choose_products("vector") == "int16 vectors"
        assert not native.amx_tiles()
        int8 = native.choose_products("int8")
        assert int8 == (
            "int16 vectors + int8 tiles" if native.cpu_has("amx_int8") else "int16 vectors"
        )
    finally:
        native.choose_products("auto")
    assert native.amx_tiles() == native.cpu_has("amx_bf16")
    script = "from accordion import native; native.available(); print(native.amx_tiles())"
    env = {**os.environ, "ACCORDION_PRODUCTS": "vector"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
    env["ACCORDION_PRODUCTS"] = "fastest"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "one of auto, vector, int8, not 'fastest'" in done.stderr


@pytest.mark.parametrize("arch", list(TINY_SPECS))
@pytest.mark.parametrize("mode", ["auto", "fp32"])
def test_native_blocks_give_the_python_bits(tiny_dir: Path, arch: str, mode: str) -> None:
    """Decode-sized steps and prefill chunks through scattered blocks. The loops sum in
    another order than the Python reference: float32 agrees to rounding; the bf16
    K/V cache rounds the same way almost everywhere, and where it does not a logit
    moves by a fraction of one bf16 step."""
    gf = open_gguf(tiny_dir / f"{arch}.gguf")
    cfg = config_from_gguf(gf)
    decoder = build_decoder(gf, cfg, mode)
    rng = random.Random(len(arch))
    ids = [rng.randrange(256) for _ in range(30)]
    blocks = rng.sample(range(40), 8)
    for chunk in (1, 5, 30):
        decoder.use_native(True)
        assert all(b.native for b in decoder.blocks)
        fast = paged_logits(decoder, cfg, ids, 4, blocks, chunk)
        decoder.use_native(False)
        slow = paged_logits(decoder, cfg, ids, 4, blocks, chunk)
        assert_agree(fast, slow, mode)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["auto", "fp32"])
def test_native_decode_attention_splits_long_contexts(tiny_dir: Path, arch: str, mode: str) -> None:
    """Past 256 keys the kernel cuts a context in parts run on different threads and
    merges them: 1,000 keys over scattered blocks, the last position a decode step."""
    gf = open_gguf(tiny_dir / f"{arch}.gguf")
    cfg = config_from_gguf(gf)
    decoder = build_decoder(gf, cfg, mode)
    rng = random.Random(3)
    ids = [rng.randrange(256) for _ in range(1000)]
    blocks = rng.sample(range(400), 63)  # 63 blocks of 16, in no order
    logits = {}
    for on in (True, False):
        decoder.use_native(on)
        logits[on] = paged_logits(decoder, cfg, ids, 16, blocks, 999)[-1:]
    assert_agree(logits[True], logits[False], mode)


@pytest.mark.parametrize("arch", list(TINY_SPECS))
@pytest.mark.parametrize("mode", ["auto", "fp32"])
def test_native_decode_attention_reads_scattered_blocks(
    tiny_dir: Path, arch: str, mode: str
) -> None:
    """Several sequences decode in one step, their blocks interleaved in the pool (as
    growth leaves them): the native kernel reads them in place and gives what the
    gather and scaled_dot_product_attention give."""
    gf = open_gguf(tiny_dir / f"{arch}.gguf")
    cfg = config_from_gguf(gf)
    decoder = build_decoder(gf, cfg, mode)
    bs, lengths = 4, [9, 14, 3, 22]
    kv = PlainKV(cfg, 64, bs, decoder.kv_dtype)
    rng = random.Random(7)
    free = rng.sample(range(64), 64)  # scattered, shared out one block at a time
    tables = [[free.pop() for _ in range(-(-(n + 1) // bs))] for n in lengths]
    prompts = [[rng.randrange(256) for _ in range(n)] for n in lengths]
    with torch.inference_mode():
        for ids, table in zip(prompts, tables, strict=True):  # fill each cache alone
            decoder(step_batch([(ids, 0, table)], bs), kv)
        pairs = zip(prompts, tables, strict=True)
        step = [(ids + [rng.randrange(256)], len(ids), table) for ids, table in pairs]
        logits = {}
        for on in (True, False):
            decoder.use_native(on)
            logits[on] = decoder(step_batch(step, bs), kv)
    assert_agree(logits[True], logits[False], mode)
    assert not torch.equal(logits[True][0], logits[True][1])


@pytest.mark.parametrize("arch", list(TINY_SPECS))
def test_native_logits_do_not_depend_on_chunks_or_block_placement(
    tiny_dir: Path, arch: str
) -> None:
    """Bit for bit: a token computed in a decode step, in a prefill chunk of 5 or in
    one of 30, its keys in one order of blocks or another (gemma3's window included)."""
    gf = open_gguf(tiny_dir / f"{arch}.gguf")
    cfg = config_from_gguf(gf)
    decoder = build_decoder(gf, cfg, "auto")
    rng = random.Random(5)
    ids = [rng.randrange(256) for _ in range(30)]
    runs = [
        paged_logits(decoder, cfg, ids, 4, rng.sample(range(40), 8), chunk)
        for chunk in (1, 5, 30, 7)
    ]
    for other in runs[1:]:
        assert torch.equal(runs[0], other)


@pytest.mark.parametrize("arch", list(TINY_SPECS))
@pytest.mark.parametrize("mode", ["auto", "fp32"])
def test_native_stack_gives_the_per_block_bits(tiny_dir: Path, arch: str, mode: str) -> None:
    """All blocks in one native call (native/stack.cpp) and the Python loop over the
    per-block ops: the same bits, decode steps and prefill chunks over scattered
    blocks (gemma3: two RoPE bases, windowed and global layers)."""
    gf = open_gguf(tiny_dir / f"{arch}.gguf")
    cfg = config_from_gguf(gf)
    decoder = build_decoder(gf, cfg, mode)
    assert decoder.stack is not None
    stack = decoder.stack
    rng = random.Random(9)
    ids = [rng.randrange(256) for _ in range(30)]
    blocks = rng.sample(range(40), 8)
    for chunk in (1, 7, 30):
        decoder.stack = stack
        fast = paged_logits(decoder, cfg, ids, 4, blocks, chunk)
        decoder.stack = None  # each block's three ops from Python
        slow = paged_logits(decoder, cfg, ids, 4, blocks, chunk)
        assert torch.equal(fast, slow)
    decoder.use_native(False)
    assert decoder.stack is None


def assert_agree(fast: torch.Tensor, slow: torch.Tensor, mode: str) -> None:
    """float32 to rounding; with the bf16 K/V cache within one bf16 step of the largest
    logit, and the same argmax."""
    if mode == "fp32":
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    else:
        step = 2.0 ** (torch.log2(slow.abs().max()).floor() - 7)
        assert (fast - slow).abs().max() <= step
        assert torch.equal(fast.argmax(-1), slow.argmax(-1))


@pytest.mark.parametrize("arch", list(TINY_SPECS))
def test_native_block_halves_match_python_op_by_op(tiny_dir: Path, arch: str) -> None:
    """Each half alone, in float32, on a residual stream small enough that every norm's
    epsilon moves the result: queries, the K/V written to the cache, and the new stream."""
    gf = open_gguf(tiny_dir / f"{arch}.gguf")
    cfg = config_from_gguf(gf)
    decoder = build_decoder(gf, cfg, "fp32")
    block = decoder.blocks[0]
    gen = torch.Generator().manual_seed(11)
    t = 3
    x = torch.randn(t, cfg.hidden, generator=gen) * 1e-3
    attn = torch.randn(t, cfg.n_heads, cfg.head_dim, generator=gen) * 1e-3
    rope = decoder.ropes[decoder.rope_base(0)].tables(torch.arange(5, 5 + t))
    slots = torch.tensor([6, 1, 9])
    out = {}
    with torch.inference_mode():
        for on in (True, False):
            block.use_native(on)
            kv = PlainKV(cfg, 4, 4, torch.float32)
            q = block.queries(x, rope, kv.layer(0), slots)
            out[on] = (q, kv.k[0], kv.v[0], block.finish(x, attn))
    for fast, slow in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
