"""The native block ops agree with the Python path they replace."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPECS, paged_logits

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


@pytest.mark.parametrize("arch", list(TINY_SPECS))
@pytest.mark.parametrize("mode", ["auto", "int4", "bf16", "fp32"])
def test_native_blocks_give_the_python_bits(tiny_dir: Path, arch: str, mode: str) -> None:
    """Decode-sized steps (the int4 kernel) and prefill chunks (the dense GEMM), through
    scattered blocks. The loops sum in another order than torch's kernels: float32
    agrees to rounding; bf16 activations round the same way almost everywhere, and
    where they do not the logit moves by a fraction of one bf16 step."""
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
        if mode == "fp32":
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-4)
        else:
            step = 2.0 ** (torch.log2(slow.abs().max()).floor() - 7)  # bf16 spacing at the top
            assert (fast - slow).abs().max() <= step, f"chunk {chunk}"
            assert torch.equal(fast.argmax(-1), slow.argmax(-1))
