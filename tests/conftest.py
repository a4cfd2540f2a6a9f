"""Shared fixtures: tiny random GGUF models and references."""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
import torch
from live_server import LiveServer
from tiny_gguf import TOOLS_TEMPLATE, Q, TinySpec, write_tiny

from accordion.models.attention import AttentionBatch, SeqSlice
from accordion.models.config import ModelConfig
from accordion.models.decoder import Decoder, ForwardBatch

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


class PlainKV:
    """The model's PagedKV protocol over plain tensors, with blocks the test chooses."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype):
        shape = (cfg.n_layers, cfg.n_kv_heads, num_blocks * block_size, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def group_of(self, i: int) -> int:
        return 0


Step = list[tuple[list[int], int, list[int]]]  # per sequence: tokens, first new, blocks


def step_batch(seqs: Step, block_size: int, every_row: bool = False) -> ForwardBatch:
    """One forward step over sequences given as (tokens so far, position of the first
    new one, block table); samples each one's last row, or every row."""
    tokens, positions, slots, slices = [], [], [], []
    for ids, start, table in seqs:
        slices.append(SeqSlice(len(tokens), len(ids) - start, len(ids), table))
        for p in range(start, len(ids)):
            tokens.append(ids[p])
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
    rows = range(len(tokens)) if every_row else [s.q_start + s.q_len - 1 for s in slices]
    return ForwardBatch(
        tokens=torch.tensor(tokens),
        positions=torch.tensor(positions),
        attn=[AttentionBatch(torch.tensor(slots), slices, block_size)],
        sample_rows=torch.tensor(list(rows)),
    )


def paged_logits(
    decoder: Decoder,
    cfg: ModelConfig,
    ids: list[int],
    block_size: int,
    blocks: list[int],
    chunk: int,
) -> torch.Tensor:
    """Logits of every position, prefilling `ids` in chunks into the given blocks."""
    kv = PlainKV(cfg, max(blocks) + 1, block_size, decoder.kv_dtype)
    out = []
    with torch.inference_mode():
        for done in range(0, len(ids), chunk):
            end = min(done + chunk, len(ids))
            batch = step_batch([(ids[:end], done, blocks)], block_size, every_row=True)
            out.append(decoder(batch, kv))
    return torch.cat(out)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real accordion server (subprocess, free 127.0.0.1 port) shared by a test module."""
    live = LiveServer(tmp_path_factory.mktemp("models"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def ollama_client(server: LiveServer) -> ollama.Client:
    """The official ollama client on the module's server."""
    return ollama.Client(host=server.url, timeout=120)


@pytest.fixture(scope="module")
def openai_client(server: LiveServer) -> openai.OpenAI:
    """The official openai client on the module's server (no retries: errors show)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """|actual - expected| <= atol everywhere (rtol 0; a NaN or inf fails), as
    torch.testing.assert_close(atol=atol, rtol=0) would check, in one pass: on Gemma's
    700 x 262,144 logits assert_close took ~7 s, this takes well under one."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    diff = torch.sub(actual, expected).abs_().nan_to_num_(nan=math.inf, posinf=math.inf)
    worst = diff.max()
    if not worst <= atol:  # a NaN difference became inf, so it fails here too
        at = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"max |diff| {worst.item():.3g} > atol {atol:.3g}, first at {at}: "
            f"{actual[at].item()} vs {expected[at].item()}; "
            f"{int((diff > atol).sum())} of {diff.numel()} elements over"
        )


def file_key(path: str | Path) -> tuple[str, int, int]:
    """A file's identity for the caches below: its real path, size and mtime (a test
    that writes a GGUF, or rewrites one, gets its own entry)."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def share_transformers_gguf_metadata() -> None:
    """transformers' metadata-only GGUF loads, made once per file for the session.

    AutoTokenizer and AutoConfig each call load_gguf_checkpoint(return_tensors=False),
    and each builds a gguf.GGUFReader that parses every metadata array (Gemma's
    262k-token vocabulary: ~10 s, SmolLM2's ~2 s); the weights load builds its own.
    The callers import the function from its module at call time, so patching the
    module attribute reaches them. Results are keyed by the file's identity (a test
    that writes a GGUF gets its own) and handed out as deep copies.
    """
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    real = hf_gguf.load_gguf_checkpoint
    if getattr(real, "shared_by_tests", False):
        return
    results: dict[tuple[str, int, int], dict[str, Any]] = {}

    @functools.wraps(real)
    def load(path: str, return_tensors: bool = False, **kwargs: Any) -> dict[str, Any]:
        if return_tensors or kwargs:
            return real(path, return_tensors, **kwargs)
        key = file_key(path)
        if key not in results:
            results[key] = real(path, return_tensors=False)
        return copy.deepcopy(results[key])

    load.shared_by_tests = True  # type: ignore[attr-defined]
    hf_gguf.load_gguf_checkpoint = load


@contextmanager
def shared_gguf_readers() -> Iterator[None]:
    """Within the block, gguf.GGUFReader of the same unchanged file gives one reader.

    transformers' GGUF from_pretrained builds a GGUFReader for the config and another
    for the weights; each parses every metadata array (Gemma's 262k-token vocabulary,
    ~10 s). transformers imports GGUFReader from gguf inside the call, so the module
    attribute is what it gets. Only for the block: accordion's own loader also uses
    gguf.GGUFReader, and the tests measure its behaviour, not a cache of ours.
    """
    import gguf

    real = gguf.GGUFReader
    readers: dict[tuple[tuple[str, int, int], str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (file_key(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf.GGUFReader = real  # type: ignore[misc]


def contiguous_logits(decoder: Decoder, cfg: ModelConfig, ids: list[int]) -> torch.Tensor:
    """The unpaged reference: one block holding the whole sequence, one forward."""
    return paged_logits(decoder, cfg, ids, len(ids), [0], len(ids))


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tools") / "tools.gguf"
    return write_tiny(path, TinySpec(chat_template=TOOLS_TEMPLATE))


@pytest.fixture(scope="session")
def live(tool_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server that may load the tiny model by its path."""
    server = LiveServer(
        tmp_path_factory.mktemp("models"), env={"ACCORDION_ALLOW_PATHS": str(tool_model.parent)}
    )
    yield server
    server.stop()
