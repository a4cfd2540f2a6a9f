"""Batch jobs, side by side in one run: what our users did against what `accordion batch` does.

    .venv/bin/python bench/bench_batch.py [--model smollm2] [--requests 500]
        [--system-tokens 1000] [--answer-tokens 16] [--overhead-lines 1000000]

The same requests (a ~1,000-token shared system prompt, a short question each,
greedy 16-token answers) through:
  (a) a naive loop: one request at a time against `accordion serve`;
  (b) independent mode, embedded;
  (c) independent mode with --endpoint against the same server;
  (d) conversation mode, embedded.
Each as requests/s, tokens/s (prompt + answer), prefix-cache hit rate and peak KV,
with ratios to (a). Then the runner's own overhead: lines/s through the first pass,
the checkpoint and the output with a target that answers at once (and again with
httpx's client in the way, answered by a mock transport), and the process's RSS
growth over a job of --overhead-lines lines. Prints markdown, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from live_server import LiveServer  # noqa: E402

from accordion import batch  # noqa: E402
from accordion.batch.job import Job, Settings  # noqa: E402
from accordion.batch.lines import Defaults  # noqa: E402
from accordion.batch.runner import Runner  # noqa: E402
from accordion.batch.target import Reply, Target  # noqa: E402

TOPICS = ["rivers", "bread", "owls", "glass", "tides", "maps", "bees", "clocks", "salt", "moss"]


def system_prompt(tokens: int) -> str:
    rules = [f"Rule {i}: be brief about {TOPICS[i % 10]}." for i in range(tokens // 9 + 1)]
    return " ".join(rules)


def write_input(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"Question {i}: name one thing about {TOPICS[i % 10]}."
            f.write(json.dumps({"custom_id": f"r{i}", "prompt": prompt}) + "\n")


def naive(url: str, model: str, inp: Path, system: str, answer: int) -> dict[str, Any]:
    """What our users did: each request alone, waiting for the last."""
    peak, prompt, cached, completion = 0, 0, 0, 0
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=None) as client:
        lines = [json.loads(line) for line in inp.read_text().splitlines()]
        for i, line in enumerate(lines):
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": line["prompt"]},
                ],
                "temperature": 0,
                "max_tokens": answer,
            }
            usage = client.post("/v1/chat/completions", json=body).json()["usage"]
            prompt += usage["prompt_tokens"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
            completion += usage["completion_tokens"]
            if i % 10 == 0:
                stats = client.get("/api/stats").json()
                for m in stats.get("models", {}).values():
                    peak = max(peak, m["kv"]["used_bytes"])
    seconds = time.perf_counter() - start
    return row(
        "(a) naive loop against the server", len(lines), seconds, prompt, cached, completion, peak
    )


def job(name: str, inp: Path, out: Path, **options: Any) -> dict[str, Any]:
    peak = 0

    def watch(p: batch.Progress) -> None:
        nonlocal peak
        peak = max(peak, p.kv_used_bytes or 0)

    start = time.perf_counter()
    p = batch.run(inp, out, on_progress=watch, **options)
    seconds = time.perf_counter() - start
    assert p.state == "finished" and p.failed == 0, p
    extra = {"peak_inflight": p.peak_inflight, "chunks": p.chunks}
    return (
        row(name, p.done, seconds, p.prompt_tokens, p.cached_tokens, p.completion_tokens, peak)
        | extra
    )


def row(
    name: str, n: int, seconds: float, prompt: int, cached: int, completion: int, peak: int
) -> dict[str, Any]:
    return {
        "name": name,
        "requests": n,
        "seconds": round(seconds, 2),
        "requests_per_s": round(n / seconds, 2),
        "tokens_per_s": round((prompt + completion) / seconds, 1),
        "hit_rate": round(cached / prompt, 4) if prompt else 0.0,
        "peak_kv_mib": round(peak / 2**20, 1),
    }


# -- the runner's own cost ----------------------------------------------------------------
ANSWER = {
    "id": "chatcmpl-0",
    "object": "chat.completion",
    "created": 0,
    "model": "noop",
    "choices": [
        {
            "index": 0,
            "logprobs": None,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": "ok"},
        }
    ],
    "usage": {
        "prompt_tokens": 10,
        "completion_tokens": 1,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 0},
    },
}


class NoopTarget(Target):
    """Answers every request at once, without an HTTP client."""

    async def post(self, url: str, body: dict[str, Any]) -> Reply:
        return Reply(200, ANSWER, "batch_req_noop")

    async def get(self, path: str) -> Any | None:
        return None


def overhead(folder: Path, lines: int, http: bool) -> dict[str, Any]:
    """A job through a target that answers at once: the runner is all that is left, or
    (`http`) the runner and httpx's client, through a transport that answers at once."""
    name = "http" if http else "noop"
    inp = folder / f"{name}.jsonl"
    write_input(inp, lines)

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            return httpx.Response(200, json=ANSWER)
        return httpx.Response(404, json={"error": "no such route"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://noop")
    settings = Settings(
        str(inp),
        str(folder / f"{name}.out.jsonl"),
        str(folder / f"{name}.errors.jsonl"),
        Defaults(model="noop"),
        max_inflight=64,
    )
    rss = psutil.Process().memory_info().rss
    j = Job(folder / f"{name}-job")
    j.lock()
    start = time.perf_counter()
    scan = j.prepare(settings)
    checked = time.perf_counter()
    target = Target(client) if http else NoopTarget(client)
    progress = asyncio.run(Runner(j, settings, scan, target).run())
    end = time.perf_counter()
    j.close()
    assert progress.state == "finished" and progress.done == lines, progress
    return {
        "lines": lines,
        "first_pass_lines_per_s": round(lines / (checked - start)),
        "run_lines_per_s": round(lines / (end - checked)),
        "lines_per_s": round(lines / (end - start)),
        "rss_growth_mib": round((psutil.Process().memory_info().rss - rss) / 2**20, 1),
    }


def job_arguments(ap: argparse.ArgumentParser) -> None:
    """The job's shape, shared with bench_batch_ray.py."""
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--answer-tokens", type=int, default=16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    job_arguments(ap)
    ap.add_argument("--overhead-lines", type=int, default=1_000_000)
    args = ap.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average"
        f" {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
    )
    folder = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    os.environ["ACCORDION_BATCHES"] = str(folder / "jobs")
    try:
        inp = folder / "in.jsonl"
        write_input(inp, args.requests)
        system = system_prompt(args.system_tokens)
        (folder / "system.txt").write_text(system)
        common = {
            "model": args.model,
            "system": system,
            "sampling": {"temperature": 0, "max_tokens": args.answer_tokens},
        }
        models = folder / "models"
        models.mkdir()
        server = LiveServer(models)
        try:
            rows = [naive(server.url, args.model, inp, system, args.answer_tokens)]
            print(f"  {rows[-1]['name']}: {rows[-1]['seconds']} s", file=sys.stderr)
            rows.append(job("(b) independent, embedded", inp, folder / "b.jsonl", **common))
            print(f"  {rows[-1]['name']}: {rows[-1]['seconds']} s", file=sys.stderr)
            rows.append(
                job(
                    "(c) independent, --endpoint",
                    inp,
                    folder / "c.jsonl",
                    endpoint=server.url,
                    **common,
                )
            )
            print(f"  {rows[-1]['name']}: {rows[-1]['seconds']} s", file=sys.stderr)
        finally:
            server.stop()
        rows.append(
            job(
                "(d) conversation, embedded", inp, folder / "d.jsonl", mode="conversation", **common
            )
        )
        print(f"  {rows[-1]['name']}: {rows[-1]['seconds']} s", file=sys.stderr)
        cost = overhead(folder, args.overhead_lines, http=False)
        cost_http = overhead(folder, args.overhead_lines, http=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    base = rows[0]
    print(
        f"{args.requests} requests, a {args.system_tokens}-token shared system prompt,"
        f" {args.answer_tokens}-token answers, {args.model}\n"
    )
    print("| run | s | req/s | ratio | tok/s | ratio | cache hits | peak KV MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['seconds']} | {r['requests_per_s']}"
            f" | {r['requests_per_s'] / base['requests_per_s']:.2f}x | {r['tokens_per_s']}"
            f" | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {100 * r['hit_rate']:.1f}%"
            f" | {r['peak_kv_mib']} |"
        )
    for what, c in (
        ("a target that answers at once", cost),
        ("httpx, answered at once", cost_http),
    ):
        print(
            f"\nrunner alone, {c['lines']:,} lines through {what}:"
            f" {c['lines_per_s']:,} lines/s (first pass {c['first_pass_lines_per_s']:,},"
            f" run {c['run_lines_per_s']:,}); RSS growth {c['rss_growth_mib']} MiB"
        )
    print(json.dumps({"rows": rows, "overhead": cost, "overhead_http": cost_http}))


if __name__ == "__main__":
    main()
