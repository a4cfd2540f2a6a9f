"""Serving benchmark: concurrent clients, a growing chat, and KV memory, in one run.

    .venv/bin/python bench/bench_engine.py [--model smollm2] [--weights auto]
        [--clients 1,4,8] [--turns 20] [--quick]

Greedy decoding with `ignore_eos`, so every output has its requested length. The
script drives `engine.step()` itself and samples `kv_stats()` after every step.
Between scenarios it calls `kv.shrink()`, as the server loop does after 2 s idle.
Prints markdown tables, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from statistics import mean

from accordion import LLM, SamplingParams
from accordion.engine.request import RequestHandle, RequestOutput
from accordion.engine.sequence import Sequence

# llama.cpp's llama-server on this machine, same model and sizes
REF_AGGREGATE = {1: 57.0, 4: 70.0, 8: 83.0}  # decode tok/s, all clients together
REF_TTFT_MEAN = {8: 6.1}  # seconds
REF_CHAT = {1: {"ttft": 0.52, "decode": 95.0}, 20: {"ttft": 1.09, "decode": 39.0, "prompt": 3676}}
FIXED_SLOTS, FIXED_CTX = 4, 8192  # a fixed preallocation: 4 slots of 8,192 tokens


@dataclass
class Sizes:
    prompt: int = 240  # tokens per concurrent client's prompt
    output: int = 128
    turn_user: int = 124  # new user tokens per chat turn
    turn_output: int = 64


QUICK = Sizes(prompt=48, output=16, turn_user=32, turn_output=8)

# Sentence parts, one kind a line: subjects, verbs, objects, endings. Picked at random,
# they make text in which no two slices share a prefix.
PARTS = """
the miller; a surveyor; the harbour board; two carpenters; the schoolteacher; an old fisherman; \
the council; a botanist; the ferry captain; a clockmaker
repaired; measured; painted; argued about; sold; described; rebuilt; photographed; forgot; counted
the northern bridge; a copper kettle; the orchard wall; eleven barrels of salt; the lighthouse \
lamp; a map of the valley; the church bell; three wool blankets; the railway timetable; a telescope
after the spring flood; before the market opened; during a week of fog; while the river froze; \
for the autumn fair; in spite of the tax collector; on a windless afternoon; with borrowed tools
"""
SUBJECTS, VERBS, OBJECTS, CODAS = (line.split("; ") for line in PARTS.strip().splitlines())


def varied_ids(llm: LLM, n: int, seed: int = 0) -> list[int]:
    """At least n tokens of numbered, randomly assembled sentences: no two slices alike."""
    rng = random.Random(seed)
    sentences: list[str] = []
    ids: list[int] = []
    while len(ids) < n:
        for _ in range(200):
            year = rng.randint(1700, 1999)
            sentences.append(
                f"In {year} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
                f" {rng.choice(CODAS)}, paying {rng.randint(2, 900)} coins."
            )
        ids = llm.tokenizer.encode(f"Record {len(sentences)}. " + " ".join(sentences))
    return ids


class Corpus:
    """Hands out consecutive, never reused slices of one long token list."""

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.pos = ids, 0

    def take(self, n: int) -> list[int]:
        if self.pos + n > len(self.ids):
            raise RuntimeError("corpus exhausted")
        self.pos += n
        return self.ids[self.pos - n : self.pos]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def times(s: Sequence) -> tuple[float, float, float]:
    """Arrival, first token and finish of a finished sequence (perf_counter seconds)."""
    assert s.first_token is not None and s.finished_at is not None
    return s.arrival, s.first_token, s.finished_at


def drive(llm: LLM, handles: list[RequestHandle], samples: list[dict]) -> list[RequestOutput]:
    """Step the engine until every handle finished, sampling KV stats after each step."""
    while any(h.seq.finish_reason is None for h in handles):
        llm.engine.step()
        samples.append(llm.kv_stats())
    outs = [h.result() for h in handles]  # events are queued: this does not step
    for o in outs:
        if o.error is not None:
            raise o.error
    return outs


def concurrency(llm: LLM, corpus: Corpus, clients: int, sz: Sizes, samples: list[dict]) -> dict:
    prompts = [corpus.take(sz.prompt) for _ in range(clients)]
    handles = [llm.submit(p, greedy(sz.output)) for p in prompts]
    outs = drive(llm, handles, samples)
    arrival, first, done = zip(*(times(h.seq) for h in handles), strict=True)
    ttft = [f - a for a, f in zip(arrival, first, strict=True)]
    n_out = sum(len(o.token_ids) for o in outs)
    assert n_out == clients * sz.output, "an output stopped early"
    return {
        "clients": clients,
        "output_tokens": n_out,
        "aggregate_tps": n_out / (max(done) - min(first)),
        "ttft_mean": mean(ttft),
        "ttft_max": max(ttft),
        "wall": max(done) - min(arrival),
        "cached_tokens": sum(o.cached_tokens for o in outs),
        "preemptions": sum(o.preemptions for o in outs),
    }


def chat(llm: LLM, corpus: Corpus, turns: int, sz: Sizes, samples: list[dict]) -> list[dict]:
    messages: list[dict] = []
    rows = []
    for turn in range(1, turns + 1):
        messages.append(
            {"role": "user", "content": llm.tokenizer.decode(corpus.take(sz.turn_user))}
        )
        handle = llm.submit(messages, greedy(sz.turn_output))
        (out,) = drive(llm, [handle], samples)
        arrival, first, done = times(handle.seq)
        messages.append({"role": "assistant", "content": out.text})  # the real answer
        rows.append(
            {
                "turn": turn,
                "prompt_tokens": out.prompt_tokens,
                "cached_tokens": out.cached_tokens,
                "ttft": first - arrival,
                "decode_tps": (len(out.token_ids) - 1) / (done - first),  # after the first token
            }
        )
    return rows


def memory(llm: LLM, samples: list[dict]) -> dict:
    ratios = [
        s["allocated_tokens"] / (s["used_tokens"] + s["cached_tokens"])
        for s in samples
        if s["used_tokens"] + s["cached_tokens"] > 0
    ]
    end = llm.kv_stats()
    llm.engine.kv.shrink()
    shrunk = llm.kv_stats()
    return {
        "samples": len(samples),
        "ratio_max": max(ratios),
        "ratio_mean": mean(ratios),
        "peak_allocated_bytes": max(s["allocated_bytes"] for s in samples),
        "peak_allocated_tokens": max(s["allocated_tokens"] for s in samples),
        "peak_live_tokens": max(s["used_tokens"] + s["cached_tokens"] for s in samples),
        "end_allocated_bytes": end["allocated_bytes"],
        "shrunk_allocated_bytes": shrunk["allocated_bytes"],
        "bytes_per_token": end["bytes_per_token"],
        "fixed_bytes": end["bytes_per_token"] * FIXED_CTX * FIXED_SLOTS,
    }


def ratio(ours: float, ref: float | None) -> str:
    return f"{ours / ref:.2f}x" if ref else "—"


def opt(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "—"


def print_tables(conc: list[dict], turns: list[dict], mem: dict, sz: Sizes) -> None:
    print(f"\n## Concurrency ({sz.prompt}-token prompts, {sz.output} output tokens each)\n")
    print(
        "| clients | agg tok/s | llama-server | ratio | TTFT mean s | llama-server"
        " | TTFT max s | wall s | cached | preempt |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in conc:
        ref, ref_t = REF_AGGREGATE.get(r["clients"]), REF_TTFT_MEAN.get(r["clients"])
        print(
            f"| {r['clients']} | {r['aggregate_tps']:.1f} | {opt(ref, '.0f')}"
            f" | {ratio(r['aggregate_tps'], ref)} | {r['ttft_mean']:.2f} | {opt(ref_t, '.1f')}"
            f" | {r['ttft_max']:.2f} | {r['wall']:.1f} | {r['cached_tokens']}"
            f" | {r['preemptions']} |"
        )

    print(f"\n## Chat ({sz.turn_user} new user tokens, {sz.turn_output} output tokens per turn)\n")
    print("| turn | prompt tokens | cached | TTFT s | llama-server | decode tok/s | llama-server |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    shown = {1, 5, 10, 15, 20, len(turns)}
    for r in (r for r in turns if r["turn"] in shown):
        ref = REF_CHAT.get(r["turn"], {})
        print(
            f"| {r['turn']} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['ttft']:.2f}"
            f" | {opt(ref.get('ttft'), '.2f')} | {r['decode_tps']:.1f}"
            f" | {opt(ref.get('decode'), '.0f')} |"
        )
    last = max(REF_CHAT)
    print(f"\nllama-server's turn-{last} prompt: ~{REF_CHAT[last]['prompt']:,} tokens")

    mib = 2**20
    print(f"\n## KV memory over the mixed workload ({mem['samples']} step samples)\n")
    print(
        "| allocated / (used + cached) max | mean | peak allocated MiB (tokens)"
        " | at end MiB | after shrink MiB"
        f" | fixed {FIXED_SLOTS} x {FIXED_CTX} tokens MiB | peak / fixed |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {mem['ratio_max']:.3f} | {mem['ratio_mean']:.3f}"
        f" | {mem['peak_allocated_bytes'] / mib:.1f} ({mem['peak_allocated_tokens']:,})"
        f" | {mem['end_allocated_bytes'] / mib:.1f} | {mem['shrunk_allocated_bytes'] / mib:.2f}"
        f" | {mem['fixed_bytes'] / mib:.0f}"
        f" | {mem['peak_allocated_bytes'] / mem['fixed_bytes']:.3f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="bundled model name or GGUF path")
    ap.add_argument("--weights", default="auto", help="auto, int4, bf16 or fp32")
    ap.add_argument("--clients", default="1,4,8", help="comma-separated client counts")
    ap.add_argument("--turns", type=int, help="chat turns (default 20, quick 3)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not clients or min(clients) < 1 or (args.turns is not None and args.turns < 1):
        ap.error("--clients and --turns must be positive")
    sz = QUICK if args.quick else Sizes()
    turns = args.turns or (3 if args.quick else 20)

    import torch

    print(
        f"# {args.model} ({args.weights}): {platform.processor() or platform.machine()},"
        f" {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads),"
        f" load average {os.getloadavg()[0]:.1f} (other busy processes skew every number)",
        file=sys.stderr,
    )
    llm = LLM(args.model, weights=args.weights)
    need = sz.prompt + 16 + sum(clients) * sz.prompt + turns * sz.turn_user
    corpus = Corpus(varied_ids(llm, need))
    llm.generate_ids([corpus.take(sz.prompt), corpus.take(16)], greedy(4))  # warm-up
    llm.engine.kv.shrink()

    samples: list[dict] = []
    conc = []
    for n in clients:
        start = time.perf_counter()
        conc.append(concurrency(llm, corpus, n, sz, samples))
        llm.engine.kv.shrink()
        print(f"  {n} clients: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    start = time.perf_counter()
    chat_rows = chat(llm, corpus, turns, sz, samples)
    print(f"  chat, {turns} turns: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    mem = memory(llm, samples)
    print_tables(conc, chat_rows, mem, sz)
    result = {
        "model": args.model,
        "weights": args.weights,
        "sizes": vars(sz),
        "concurrency": conc,
        "chat": chat_rows,
        "memory": mem,
        "reference_llama_server": {
            "aggregate_tps": REF_AGGREGATE,
            "ttft_mean": REF_TTFT_MEAN,
            "chat": REF_CHAT,
        },
    }
    print("\n" + json.dumps(result))


if __name__ == "__main__":
    main()
