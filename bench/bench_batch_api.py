"""The Batch API on `accordion serve` against `accordion batch --endpoint`, and what a
running batch does to an interactive chat's time to first token. One server, one run.

    .venv/bin/python bench/bench_batch_api.py [--model smollm2] [--requests 500]
        [--answer-tokens 16] [--probes 5]

(a) idle: a streamed chat's time to first token, median of --probes;
(b) the requests as one Batch API batch (upload, create, poll to completed), and the
    same chat's TTFT measured while it runs;
(c) the same requests through `accordion batch run --endpoint` against the server.
Prints requests/s for (b) and (c) with their ratio, and TTFT during (b) over idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from live_server import LiveServer  # noqa: E402

from accordion import batch  # noqa: E402

CHAT = [{"role": "user", "content": "Name a colour."}]


def requests(model: str, n: int, answer: int) -> bytes:
    rows = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"Question {i}: name a bird."}],
                "max_tokens": answer,
                "temperature": 0,
            },
        }
        for i in range(n)
    ]
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


def ttft(client: openai.OpenAI, model: str) -> float:
    start = time.perf_counter()
    for chunk in client.chat.completions.create(
        model=model,
        messages=CHAT,
        max_tokens=4,
        stream=True,  # type: ignore[arg-type]
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            break
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--probes", type=int, default=5)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-batch-api-"))
    (work / "models").mkdir()
    server = LiveServer(work / "models")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=600)
        ttft(client, a.model)  # load the model
        idle = statistics.median(ttft(client, a.model) for _ in range(a.probes))
        data = requests(a.model, a.requests, a.answer_tokens)
        start = time.perf_counter()
        upload = client.files.create(file=("in.jsonl", data), purpose="batch")
        made = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        busy: list[float] = []
        while (found := client.batches.retrieve(made.id)).status not in ("completed", "failed"):
            if found.status == "in_progress" and len(busy) < a.probes:
                busy.append(ttft(client, a.model))
            time.sleep(0.2)
        api_s = time.perf_counter() - start
        assert found.status == "completed", found
        (work / "in.jsonl").write_bytes(data)
        start = time.perf_counter()
        batch.run(work / "in.jsonl", work / "out.jsonl", job_dir=work / "job", endpoint=server.url)
        cli_s = time.perf_counter() - start
    finally:
        server.stop()
    n = a.requests
    during = statistics.median(busy) if busy else float("nan")
    print(f"{a.model}, {n} requests x {a.answer_tokens} tokens")
    print(f"(b) Batch API: {api_s:.1f} s, {n / api_s:.1f} req/s")
    print(f"(c) accordion batch --endpoint: {cli_s:.1f} s, {n / cli_s:.1f} req/s")
    print(f"(b)/(c) throughput: {cli_s / api_s:.2f}")
    print(f"TTFT idle {idle * 1e3:.0f} ms, during the batch {during * 1e3:.0f} ms"
          f" ({during / idle:.1f}x, median of {len(busy)})")  # fmt: skip


if __name__ == "__main__":
    main()
