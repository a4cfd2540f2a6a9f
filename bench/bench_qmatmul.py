"""The matrix kernel alone, on a bundled model's own matrices, beside torch's bf16 GEMM.

    .venv/bin/python bench/bench_qmatmul.py [--model smollm2] [--rows 1,8,512] [--block 1]

For each of one block's products (fused Q/K/V, O, fused gate/up, down) and the output
head, and each activation row count: the median time of accordion's qmatmul on the
file's blocks, and of F.linear on a bf16 matrix of the same shape (oneDNN's GEMM, what
the bf16-copy design ran), in turn in one process, as GMAC/s and their ratio; and at
one row the bytes of weights read per second, which bounds decode. Which code the
products take (--products: AMX-BF16 tiles, the int16 vectors, with AMX-INT8 tiles at
many rows) depends on the CPU and the choice, and is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from accordion import native
from accordion.loader.model import load_model
from accordion.models.quant import kernel_cols


def median_s(fn: Callable[[], object], budget_s: float = 0.5) -> float:
    fn()  # warm: scratch, caches
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < end and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", default="1,8,512", help="activation row counts")
    ap.add_argument("--block", type=int, default=1, help="which decoder block's matrices")
    ap.add_argument(
        "--products", default="auto", choices=native.PRODUCTS, help="see native.choose_products"
    )
    a = ap.parse_args()
    decoder = load_model(a.model, "auto").decoder
    w = decoder.blocks[a.block].w
    linears = {"qkv": w.qkv, "o": w.o, "gate_up": w.gate_up, "down": w.down}
    linears["head"] = decoder.lm_head
    native.available()
    print(f"{a.model}, block {a.block}: {native.choose_products(a.products)}")
    print("| matrix | types (block bytes) | N x K | rows | accordion ms | GMAC/s | bf16 GEMM ms"
          " | GMAC/s | ratio | weights GB/s |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, lin in linears.items():
        parts = lin.parts
        if not parts:
            continue
        k, n = kernel_cols(parts[0]), sum(p.shape[0] for p in parts)
        nbytes = sum(p.numel() for p in parts)
        dense = torch.randn(n, k).bfloat16()
        types = "+".join(str(p.shape[2]) for p in parts)
        for m in (int(r) for r in a.rows.split(",")):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            ours = median_s(lambda x=x, parts=parts: torch.ops.accordion.qmatmul(x, parts, None))
            peer = median_s(lambda xb=xb, dense=dense: F.linear(xb, dense))
            macs = m * n * k / 1e9
            print(
                f"| {name} | {types} | {n} x {k} | {m} | {ours * 1e3:.3f} | {macs / ours:.1f}"
                f" | {peer * 1e3:.3f} | {macs / peer:.1f} | {peer / ours:.2f}"
                f" | {nbytes / ours / 1e9:.1f} |"
            )


if __name__ == "__main__":
    main()
