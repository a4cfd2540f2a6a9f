"""What constrained decoding costs: decode tokens/s constrained vs free, and compile time.

    .venv/bin/python bench/bench_structured.py [--model smollm2] [--tokens 96] [--runs 3]

Decode: B sequences (B = 1 and 8) decode the same number of tokens, every row under
a JSON schema or none, in one run and interleaved (free, constrained, free, ...), so
the ratio compares like with like. End tokens are ignored and each schema is an array
of strings long enough that no row finishes early; each run's rate is its generated
tokens over its decode time (first token to last). Target: constrained >= 0.9x free.

Compile: a fresh 20-property schema against the model's vocabulary, median of several
schemas (target <= 50 ms), and, once, the vocabulary's own read into llguidance.
"""

from __future__ import annotations

import argparse
import statistics
import time

from accordion import LLM, SamplingParams
from accordion.structured import Grammar

# A list of strings: inside a string nearly every token is allowed, the dense mask that
# costs most to apply. With maxLength the string's lexeme no longer matches llguidance's
# precomputed slices and each mask walks the whole token trie: the worst case, shown too.
SCHEMAS = {
    "strings": {"type": "array", "items": {"type": "string"}, "minItems": 200},
    "strings maxLength 24": {
        "type": "array",
        "items": {"type": "string", "maxLength": 24},
        "minItems": 200,
    },
}
PROMPT = [{"role": "user", "content": "Write a long list of words as a JSON array."}]


def twenty_properties(salt: int) -> dict:
    kinds = [
        {"type": "string", "maxLength": 40},
        {"type": "integer", "minimum": 0, "maximum": 10_000},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["low", "medium", "high"]},
        {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
    ]
    props = {f"field_{salt}_{i}": kinds[i % len(kinds)] for i in range(20)}
    return {"type": "object", "properties": props, "required": list(props)[:10]}


def decode_rate(llm: LLM, batch: int, tokens: int, grammar: Grammar | None) -> float:
    params = [
        SamplingParams(temperature=0.7, seed=s, max_tokens=tokens, ignore_eos=True, grammar=grammar)
        for s in range(batch)
    ]
    handles = [llm.submit(PROMPT, p) for p in params]
    outs = [h.result() for h in handles]
    first = min(h.seq.first_token for h in handles)  # type: ignore[type-var]
    last = max(h.seq.finished_at for h in handles)  # type: ignore[type-var]
    generated = sum(len(o.token_ids) for o in outs)
    assert all(len(o.token_ids) == tokens for o in outs), "a row ended early"
    return (generated - batch) / (last - first)  # the first token of each came with prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    llm = LLM(a.model)
    compiler = llm.engine.grammars
    start = time.perf_counter()
    compiler.vocabulary()
    vocab_s = time.perf_counter() - start
    compiles = []
    for salt in range(7):
        start = time.perf_counter()
        compiler.compile(Grammar.json_schema(twenty_properties(salt), "bench"))
        compiles.append(time.perf_counter() - start)
    print(
        f"{a.model}: vocabulary into llguidance {vocab_s * 1e3:.0f} ms (once per model);"
        f" 20-property schema compile, median {statistics.median(compiles) * 1e3:.1f} ms"
        f" (max {max(compiles) * 1e3:.1f})"
    )
    decode_rate(llm, 1, 8, None)  # warm: the prompt's prefix is cached for every run
    for label, schema in SCHEMAS.items():
        grammar = Grammar.json_schema(schema, "bench")
        for batch in (1, 8):
            free, constrained = [], []
            for _ in range(a.runs):
                free.append(decode_rate(llm, batch, a.tokens, None))
                constrained.append(decode_rate(llm, batch, a.tokens, grammar))
            f, c = statistics.median(free), statistics.median(constrained)
            print(
                f"{label}, batch {batch}: free {f:.1f} tok/s, constrained {c:.1f} tok/s,"
                f" ratio {c / f:.3f} (target >= 0.9)"
            )
    llm.close()


if __name__ == "__main__":
    main()
