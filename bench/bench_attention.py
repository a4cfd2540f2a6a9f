"""The paged attention kernel alone: a causal prefill of T tokens and one decode token.

    .venv/bin/python bench/bench_attention.py [--tokens 512] [--heads 9] [--kv-heads 3]
        [--head-dim 64] [--repeats 20]

One sequence in one run of cache slots, bf16 K/V as the engine keeps them: the
prefill call (T queries, each seeing keys up to itself) and a decode call (the
last query alone over all T keys). Defaults are SmolLM2's shape; Gemma 3's is
--heads 4 --kv-heads 1 --head-dim 256.
"""

from __future__ import annotations

import argparse
import time

import torch

from accordion.native import build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    torch.ops.load_library(str(build()))
    t, d = a.tokens, a.head_dim
    k = torch.randn(a.kv_heads, t + 64, d).bfloat16()
    v = torch.randn(a.kv_heads, t + 64, d).bfloat16()
    q = torch.randn(t, a.heads, d).bfloat16()
    spans = torch.tensor([[0, t + 64]])
    ranges = torch.tensor([[0, 1, 0, i + 1] for i in range(t)])

    def timed(qs: torch.Tensor, rs: torch.Tensor, n: int) -> float:
        def call() -> torch.Tensor:
            return torch.ops.accordion.paged_attention(qs, k, v, spans, rs, d**-0.5)

        for _ in range(3):
            call()
        start = time.perf_counter()
        for _ in range(n):
            call()
        return (time.perf_counter() - start) / n

    prefill = timed(q, ranges, a.repeats)
    flops = t * (t + 1) / 2 * a.heads * d * 4
    decode = timed(q[-1:].contiguous(), ranges[-1:].contiguous(), 10 * a.repeats)
    print(
        f"prefill {t} tokens: {prefill * 1e3:.2f} ms ({flops / prefill / 1e9:.0f} GFLOP/s);"
        f" decode 1 x {t} keys: {decode * 1e6:.0f} us"
    )


if __name__ == "__main__":
    main()
