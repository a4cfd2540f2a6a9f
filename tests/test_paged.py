"""The paged KV path gives the logits of one contiguous cache, whatever the paging."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import contiguous_logits, paged_logits

from accordion.loader.gguf_file import open_gguf
from accordion.models import attention
from accordion.models.attention import MAX_RUNS
from accordion.models.build import build_decoder
from accordion.models.config import config_from_gguf


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_paging_does_not_change_logits(
    tiny_dir: Path, arch: str, block_size: int, chunk: int
) -> None:
    gf = open_gguf(tiny_dir / f"{arch}.gguf")
    cfg = config_from_gguf(gf)
    decoder = build_decoder(gf, cfg, "fp32")
    rng = random.Random(block_size * 1000 + chunk)
    ids = [rng.randrange(256) for _ in range(45)]  # gemma3 tiny window is 8: crosses it
    n_blocks = -(-len(ids) // block_size)
    pool = list(range(3 * n_blocks))
    rng.shuffle(pool)  # scattered, in no order, with holes
    reference = contiguous_logits(decoder, cfg, ids)
    paged = paged_logits(decoder, cfg, ids, block_size, pool[:n_blocks], chunk)
    torch.testing.assert_close(paged, reference, atol=1e-4, rtol=1e-4)


def test_consecutive_blocks_take_the_view_path(tiny_dir: Path) -> None:
    gf = open_gguf(tiny_dir / "llama.gguf")
    cfg = config_from_gguf(gf)
    decoder = build_decoder(gf, cfg, "fp32")
    ids = list(range(10, 50))
    reference = contiguous_logits(decoder, cfg, ids)
    # [5, 6, 7] is one run (a view); [5, 2, 7] has the same endpoints but is not
    for blocks in ([5, 6, 7], [5, 2, 7]):
        torch.testing.assert_close(paged_logits(decoder, cfg, ids, 16, blocks, 1000), reference)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("runs", [2, 3, MAX_RUNS, MAX_RUNS + 1])
def test_decode_over_a_few_runs_merges_views(
    tiny_dir: Path, arch: str, runs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the native kernel, a decode token over a table of a few runs attends to
    each through a view and merges by log-sum-exp; more runs than MAX_RUNS are gathered.
    Both give the logits of one contiguous cache."""
    gf = open_gguf(tiny_dir / f"{arch}.gguf")
    cfg = config_from_gguf(gf)
    decoder = build_decoder(gf, cfg, "fp32")
    decoder.use_native(False)
    ids = [(7 * i) % 256 for i in range(40)]  # 10 blocks of 4: gemma3's window of 8 is 2
    bs, n_blocks = 4, 10
    cuts = sorted(random.Random(runs).sample(range(1, n_blocks), runs - 1))
    pieces = [list(range(a, b)) for a, b in zip([0, *cuts], [*cuts, n_blocks], strict=True)]
    blocks = [100 * k + b for k, piece in enumerate(pieces) for b in piece]  # runs apart
    merged: list[int] = []
    real = attention._attend_runs
    monkeypatch.setattr(attention, "_attend_runs", lambda *a: merged.append(len(a[3])) or real(*a))
    paged = paged_logits(decoder, cfg, ids, bs, blocks, 1)
    torch.testing.assert_close(paged, contiguous_logits(decoder, cfg, ids), atol=1e-4, rtol=1e-4)
    if runs <= MAX_RUNS:
        assert max(merged) == runs  # the full-attention layers saw every run
    else:
        assert not merged or max(merged) < runs
