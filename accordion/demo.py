"""`python -m accordion.demo "question"`: one chat answer from the bundled default model."""

from __future__ import annotations

import sys
import time

from accordion import LLM, SamplingParams


def main() -> None:
    question = " ".join(sys.argv[1:]) or "Why is the sky blue?"
    start = time.perf_counter()
    llm = LLM()
    print(f"loaded {llm.model.name} in {time.perf_counter() - start:.2f}s", file=sys.stderr)
    start, n = time.perf_counter(), 0
    params = SamplingParams(temperature=0, max_tokens=256)
    for piece in llm.stream([{"role": "user", "content": question}], params):
        print(piece, end="", flush=True)
        n += 1
    print()
    print(f"{n} pieces in {time.perf_counter() - start:.2f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
