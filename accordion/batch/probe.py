"""`accordion probe`: what one model can hold and how fast it goes, measured, and a plan.

Nothing here is a guess from a formula alone. KV bytes per token come from the
config and from the pool after a real sequence was prefilled; the largest context
that fits a budget is found by growing one sequence, chunk by chunk as prefill
would, in a pool with that budget (sliding-window layers give back what leaves
their window); prefill and decode rates are timed on the engine. The plan for a
job's shape follows from those (plan.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from accordion.batch.plan import Plan, Shape, plan
from accordion.engine.engine import Engine, EngineConfig
from accordion.kv.cache import KVCache
from accordion.loader.model import LoadedModel, load_model
from accordion.sampling_params import SamplingParams

MEASURE_TOKENS = 200  # the sequence whose blocks measure bytes per token
RATE_TOKENS = 16  # decode steps timed per rate


@dataclass
class Probe:
    model: str
    budget_bytes: int
    weights_bytes: int
    trained_context: int
    block_size: int
    bytes_per_token_config: int
    bytes_per_token_measured: float  # a prefilled sequence's blocks / its tokens
    measured_tokens: int  # that sequence's length
    max_context: int  # the largest one sequence holds under the budget (<= trained)
    prefill_tps: float
    decode_tps_1: float
    decode_tps_batch: float
    batch: int  # the concurrency decode_tps_batch was timed at
    shape: Shape
    plan: Plan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_budget(weights_bytes: int) -> int:
    """What `accordion serve` would give the model's KV cache on this machine now."""
    return max(int(psutil.virtual_memory().available * 0.8) - weights_bytes, 1 << 24)


def config_bytes_per_token(model: LoadedModel) -> int:
    cfg = model.config
    itemsize = model.decoder.kv_dtype.itemsize
    return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * itemsize


def measure_bytes_per_token(engine: Engine, tokens: int = MEASURE_TOKENS) -> float:
    """Prefill a real sequence and read what its blocks hold in the pool."""
    ids = [100 + i % 1000 for i in range(tokens)]
    handle = engine.submit(ids, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while handle.seq.num_computed < len(ids) and handle.seq.finish_reason is None:
        engine.step()
    used = engine.kv.stats()["used_bytes"]
    handle.result()
    return used / tokens


def max_context(model: LoadedModel, budget: int, config: EngineConfig | None = None) -> int:
    """The longest prompt a pool of `budget` bytes holds, reserved as prefill does: in
    chunks of num_batch, sliding-window layers giving back what left their window. That
    makes the need a saw (each chunk's window share) on a slope: a bisection finds the
    slope's edge, a scan by blocks below it finds the first length that does not fit."""
    cfg = config or EngineConfig()
    trained, bs = model.config.context_length, cfg.block_size

    def fits(n: int) -> bool:
        kv = KVCache(
            model.config, budget, bs, model.decoder.kv_dtype, cfg.segment_tokens, cfg.warm_tokens
        )
        tokens = [i % 1000 for i in range(n)]
        kv.open(0, tokens)
        for start in range(0, n, cfg.num_batch):
            end = min(n, start + cfg.num_batch)
            if not kv.try_reserve(0, start, end):
                return False
            kv.written(0, tokens, end)  # as after the chunk's step: windows give back
        return True

    if fits(trained):
        return trained
    lo, hi = 0, trained  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    start = max(0, lo - 2 * cfg.num_batch) // bs * bs
    for n in range(start + 1, hi + 1, bs):  # need grows only where a block starts
        if not fits(n):
            return n - 1
    return lo


def rates(engine: Engine, prompt: int, batch: int) -> tuple[float, float, float]:
    """Prefill tok/s on one prompt, decode tok/s alone and at `batch` sequences."""
    vocab = engine.model.config.vocab_size
    base = [(7919 * i) % (vocab - 200) + 100 for i in range(prompt + batch)]
    greedy1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=RATE_TOKENS + 1, ignore_eos=True)
    engine.submit(base[:32], greedy1).result()  # warm: kernels, allocator
    start = time.perf_counter()
    engine.submit(base[1 : prompt + 1], greedy1).result()
    prefill = prompt / (time.perf_counter() - start)

    def decode(n: int) -> float:
        prompts = [base[i + 2 : i + 34] for i in range(n)]  # short and new: decode dominates
        first = time.perf_counter()
        for h in [engine.submit(p, greedy1) for p in prompts]:
            h.result()
        one = time.perf_counter() - first
        start = time.perf_counter()
        for h in [engine.submit([x + 1 for x in p], greedy) for p in prompts]:
            h.result()
        return n * RATE_TOKENS / max(time.perf_counter() - start - one, 1e-6)

    return prefill, decode(1), decode(batch)


def group_costs(kv: KVCache) -> list[tuple[int, int]]:
    """(bytes per token, window or 0) of each layer group of the pool."""
    return [(g.arena.bytes_per_block // kv.block_size, g.window) for g in kv.groups]


def probe(model_name: str, budget: int | None = None, shape: Shape | None = None) -> Probe:
    shape = shape or Shape()
    model = load_model(model_name)
    weights = model.decoder.nbytes()
    budget = budget or default_budget(weights)
    per_token = config_bytes_per_token(model)
    engine = Engine(model, EngineConfig(kv_budget_bytes=budget))
    try:
        context = max_context(model, budget)
        tokens = min(MEASURE_TOKENS, context - 2)
        measured = measure_bytes_per_token(engine, tokens)
        groups, block = group_costs(engine.kv), engine.config.block_size
        first = plan(shape, groups, block, budget, context, (1.0, 1.0, 1.0))
        batch = max(1, min(first.concurrency, 16))
        prompt = min(shape.system + shape.message, 512, context - 2)
        speeds = rates(engine, prompt, batch)
    finally:
        engine.stop()
    return Probe(
        model_name,
        budget,
        weights,
        model.config.context_length,
        engine.config.block_size,
        per_token,
        measured,
        tokens,
        context,
        *speeds,
        batch,
        shape,
        plan(shape, groups, block, budget, context, speeds),
    )
