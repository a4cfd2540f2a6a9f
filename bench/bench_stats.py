"""What the server's self-sampling (server/stats.py) costs decode, measured side by side.

    .venv/bin/python bench/bench_stats.py

Decodes 8 sequences x 200 greedy tokens on SmolLM2 three ways, alternating, best of 3
each: no sampling; sampling as the server does it (once a second); and sampling at
every engine step (the worst case). Prints tokens/s and the ratios, and one sample's
cost in microseconds.
"""

from __future__ import annotations

import statistics
import time

from accordion import LLM, SamplingParams
from accordion.server.manager import Loaded
from accordion.server.stats import Stats
from accordion.server.store import ModelStore

TOKENS, SEQS = 200, 8


def decode(llm: LLM, loaded: list[Loaded], stats: Stats | None) -> float:
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    prompts = [llm.tokenizer.encode(f"Story number {i}: once upon a time") for i in range(SEQS)]
    handles = [llm.engine.submit(p, params) for p in prompts]
    start = time.perf_counter()
    while llm.engine.has_work():
        llm.engine.step()
        if stats is not None:
            stats.tick(loaded)
    elapsed = time.perf_counter() - start
    assert all(h.result().finish_reason == "length" for h in handles)
    return SEQS * TOKENS / elapsed


def main() -> None:
    llm = LLM("smollm2")
    entry = ModelStore().get("smollm2")
    loaded = [Loaded(entry.name, entry, llm.model, llm.engine, 1, -1.0)]
    ways = {"off": None, "1 Hz (server)": Stats(), "every step": Stats(interval_s=0.0)}
    decode(llm, loaded, None)  # warm up
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(3):
        for name, stats in ways.items():
            rates[name].append(decode(llm, loaded, stats))
    best = {name: max(r) for name, r in rates.items()}
    for name, rate in best.items():
        print(f"{name:>14}: {rate:7.1f} tok/s  ({rate / best['off']:.3f} x off)")
    probe = Stats(interval_s=0.0)
    costs = []
    for _ in range(200):
        start = time.perf_counter()
        probe.tick(loaded)
        costs.append(time.perf_counter() - start)
    cost = statistics.median(costs)
    print(f"one sample: {cost * 1e6:.0f} us, i.e. {cost * 100:.3f}% of each second at 1 Hz")


if __name__ == "__main__":
    main()
