"""Load time, memory and speed of a bundled model in each weights mode.

    .venv/bin/python bench/bench_foundation.py [--model smollm2] [--modes auto,fp32] [--sampled]

Each mode runs in a fresh spawned process so its RSS is its own. Decode speed is
measured by differencing: (time for N tokens - time for 1 token) / (N - 1), which
removes the prefill from the count. Each decode speed is the best of REPEATS runs:
on a shared host the other tenants' load swings single runs by 10-15%. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from accordion.loader.tokenizer import Tokenizer

T = TypeVar("T")

MODES = ("auto", "fp32", "vector", "int8")
# "vector" and "int8": auto with AMX-BF16 tiles switched off, so an AMX CPU runs the
# int16 vector kernel the other CPUs run, for every row count ("vector") or with its
# many-row products on AMX-INT8 tiles ("int8", the same bits): which path an AMX CPU
# should take is a measurement, made with --modes auto,vector,int8 (native.choose_products)
DECODE_PROMPT = 32  # tokens per prompt for the decode runs
REPEATS = 3
BATCH = 8
# Varied prose so the tokenizer produces ordinary tokens; repeated as needed.
TEXT = (
    "The history of the lighthouse on the northern cape begins with a shipwreck in the winter "
    "of 1821, when a cargo vessel carrying timber and salt ran aground in a storm. The villagers "
    "rowed out through the surf and saved eleven of the fourteen sailors. A petition to the "
    "harbour board followed, signed by every fisherman, two priests and the schoolteacher, who "
    "also drew the first plan of the tower: forty feet of local granite, a spiral stair of oak "
    "and a lantern of polished brass fed with whale oil. Construction took three summers. In "
    "1907 the oil lamp gave way to kerosene, in 1934 to electricity, and in 1989 the last keeper "
    "handed the keys to an automatic timer and moved to a cottage in the village, where she "
    "wrote down the weather every morning for twenty more years out of habit. "
)


@dataclass
class Result:
    mode: str
    load_s: float
    rss_mib: float
    rss_delta_mib: float
    rss_hello_mib: float  # after a one-token answer to 'hello': every weight read once
    rss_served_mib: float  # after every request below, the model still loaded
    peak_mib: float  # the process's peak RSS
    prefill_tps: float
    decode1_tps: float
    decode8_tps: float
    tokens: int


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def timed(fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def long_ids(tokenizer: Tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    text = TEXT
    while len(ids) < n:
        ids = tokenizer.encode(text)
        text += TEXT
    return ids[:n]


def warm_up(model: str) -> None:
    """One load in its own process builds the on-disk caches and warms the page cache."""
    from accordion.loader.model import load_model

    load_model(model, "auto")


def measure(
    model: str, mode: str, prompt_tokens: int, tokens: int, sampled: bool = False
) -> Result:
    import torch

    from accordion import LLM, SamplingParams
    from accordion.loader.model import load_model

    torch.manual_seed(0)
    weights = "auto" if mode in ("vector", "int8") else mode
    if mode in ("vector", "int8"):
        from accordion import native

        native.available()  # loads the ops
        print(f"{mode}: quantized products on {native.choose_products(mode)}", flush=True)
    before = rss_mib()
    loaded = load_model(model, weights)
    load_s, rss = loaded.load_seconds, rss_mib()
    del loaded
    gc.collect()

    llm = LLM(model, weights=weights)  # the KV cache grows with the requests
    ids = long_ids(llm.tokenizer, 3 * prompt_tokens + BATCH * DECODE_PROMPT)

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def decoding(n: int) -> SamplingParams:  # --sampled: Ollama's defaults, seeded
        return SamplingParams(max_tokens=n, ignore_eos=True, seed=0) if sampled else greedy(n)

    first, many = greedy(1), decoding(tokens)
    # a mapped file is resident only once read: RSS after load counts none of it
    llm.generate_ids([llm.tokenizer.encode("hello")], first)
    rss_hello = rss_mib()
    llm.generate_ids([ids[-64:]] * 2, greedy(4))  # warm-up: kernels, allocator
    # a different prompt each time: a repeated one would come from the prefix cache
    spans = [ids[k * prompt_tokens : (k + 1) * prompt_tokens] for k in (1, 2)]
    prefill_s = min(timed(llm.generate_ids, [span], first)[0] for span in spans)

    def decode_tps(prompts: list[list[int]]) -> float:
        best = 0.0
        for _ in range(REPEATS):
            t1, _ = timed(llm.generate_ids, prompts, decoding(1))
            tn, outs = timed(llm.generate_ids, prompts, many)
            assert all(len(o.token_ids) == tokens for o in outs), "generation stopped early"
            best = max(best, len(prompts) * (tokens - 1) / (tn - t1))
        return best

    one = [ids[:DECODE_PROMPT]]
    eight = [ids[i * DECODE_PROMPT : (i + 1) * DECODE_PROMPT] for i in range(BATCH)]
    decode1, decode8 = decode_tps(one), decode_tps(eight)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return Result(
        mode,
        load_s,
        rss,
        rss - before,
        rss_hello,
        rss_mib(),
        peak,
        prompt_tokens / prefill_s,
        decode1,
        decode8,
        tokens,
    )


def run_isolated(fn: Callable[..., T], *args: Any) -> T:
    """Run fn(*args) in a fresh spawned interpreter and return its result."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def table(model: str, prompt_tokens: int, results: list[Result]) -> str:
    rows = [
        f"| mode | load s | RSS MiB (Δ load) | RSS hello / served / peak MiB"
        f" | prefill {prompt_tokens} tok/s | decode b1 tok/s"
        f" | decode b{BATCH} tok/s (aggregate) | decode tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.mode} | {r.load_s:.2f} | {r.rss_mib:.0f} ({r.rss_delta_mib:+.0f})"
            f" | {r.rss_hello_mib:.0f} / {r.rss_served_mib:.0f} / {r.peak_mib:.0f}"
            f" | {r.prefill_tps:.0f} | {r.decode1_tps:.1f} | {r.decode8_tps:.1f} | {r.tokens} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="bundled model name or GGUF path")
    ap.add_argument("--modes", default="auto,fp32", help=f"comma-separated: {', '.join(MODES)}")
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per sequence")
    ap.add_argument("--fp32-tokens", type=int, help="decode tokens for fp32 (default: --tokens)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prefill prompt length")
    ap.add_argument(
        "--sampled", action="store_true", help="decode with Ollama's default sampling, not greedy"
    )
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    if args.tokens < 2 or (args.fp32_tokens is not None and args.fp32_tokens < 2):
        ap.error("decode needs at least 2 tokens")

    import torch

    print(
        f"# {args.model}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs,"
        f" torch {torch.__version__} ({torch.get_num_threads()} threads),"
        f" load average {os.getloadavg()[0]:.1f} (other busy processes skew every number)",
        file=sys.stderr,
    )
    run_isolated(warm_up, args.model)
    results = []
    for mode in modes:
        tokens = args.fp32_tokens if mode == "fp32" and args.fp32_tokens else args.tokens
        start = time.perf_counter()
        results.append(
            run_isolated(measure, args.model, mode, args.prompt_tokens, tokens, args.sampled)
        )
        print(f"  {mode}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    print(table(args.model, args.prompt_tokens, results))


if __name__ == "__main__":
    main()
