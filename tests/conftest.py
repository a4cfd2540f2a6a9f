"""Shared fixtures: tiny random GGUF models and references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_gguf import Q, TinySpec, write_tiny

from accordion.engine.runner import Work, make_batch
from accordion.engine.sequence import Sequence
from accordion.kv.cache import KVCache
from accordion.models.config import ModelConfig
from accordion.models.decoder import Decoder
from accordion.sampling_params import SamplingParams

# HF's GGUF config mapping ignores key_length for qwen3 and gemma3 and assumes their
# default head dims (128, 256), so the tiny models use those to stay comparable.
TINY_SPECS = {
    "llama": TinySpec(arch="llama", quant=Q.Q4_0),
    "qwen2": TinySpec(arch="qwen2", quant=Q.Q4_1),
    "qwen3": TinySpec(arch="qwen3", heads=2, kv_heads=1, head_dim=128, quant=Q.Q8_0),
    "gemma3": TinySpec(
        arch="gemma3", layers=6, heads=2, kv_heads=1, head_dim=256, window=8, quant=Q.F16
    ),
}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    for name, spec in TINY_SPECS.items():
        write_tiny(d / f"{name}.gguf", spec)
    return d


def paged_logits(
    decoder: Decoder,
    cfg: ModelConfig,
    ids: list[int],
    block_size: int,
    blocks: list[int],
    chunk: int,
) -> torch.Tensor:
    """Logits of every position, prefilling `ids` in chunks into the given blocks."""
    kv = KVCache(cfg, max(blocks) + 1, block_size, decoder.dtype)
    seq = Sequence(ids, SamplingParams(), 1 << 30, torch.Generator())
    seq.blocks = list(blocks)
    out = []
    with torch.inference_mode():
        while seq.num_computed < len(ids):
            n = min(chunk, len(ids) - seq.num_computed)
            batch, _ = make_batch([Work(seq, n)], block_size)
            out.append(decoder.lm_head(decoder.hidden_states(batch, kv)).float())
            seq.num_computed += n
    return torch.cat(out)


def contiguous_logits(decoder: Decoder, cfg: ModelConfig, ids: list[int]) -> torch.Tensor:
    """The unpaged reference: one block holding the whole sequence, one forward."""
    return paged_logits(decoder, cfg, ids, len(ids), [0], len(ids))
