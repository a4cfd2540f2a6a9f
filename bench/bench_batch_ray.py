"""Batch jobs over Ray against the same job on one engine, side by side in one run.

    .venv/bin/python bench/bench_batch_ray.py [--model smollm2] [--requests 500]
        [--system-tokens 1000] [--answer-tokens 16]

bench_batch.py's job (a shared system prompt, a short question each, greedy answers)
through: (b) independent mode, embedded: one engine with every CPU; (e) Ray, one
worker with every CPU; (f) Ray, a worker per CPU; (g) as (f) with one worker killed
(SIGKILL) a quarter of the way in. On a one-machine cluster this measures what
spreading costs (the actors, the driver's round trips, a second copy of the weights),
not what more machines give: each row as requests/s with its ratio to (b), the cache
hit rate, and for (g) the requests that ran again. Prints markdown, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_batch import job_arguments, system_prompt, write_input  # noqa: E402

from accordion import batch  # noqa: E402


def timed(name: str, inp: Path, out: Path, kill_at: int | None = None, **options: Any) -> dict:
    quarter = threading.Event()

    def watch(p: batch.Progress) -> None:
        if kill_at is not None and p.done >= kill_at:
            quarter.set()

    def kill() -> None:
        if quarter.wait(timeout=600):
            actors = ray.util.list_named_actors(all_namespaces=True)
            names = sorted(a["name"] for a in actors if a["name"].startswith("accordion-worker-"))
            os.kill(ray.get(ray.get_actor(names[0]).identity.remote())["pid"], signal.SIGKILL)

    if kill_at is not None:
        threading.Thread(target=kill, daemon=True).start()
    start = time.perf_counter()
    p = batch.run(inp, out, on_progress=watch, **options)
    seconds = time.perf_counter() - start
    assert p.state == "finished" and p.failed == 0, p
    ids = [json.loads(line)["custom_id"] for line in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == p.total, "an id missing or twice"
    return {
        "name": name,
        "seconds": round(seconds, 2),
        "requests_per_s": round(p.done / seconds, 2),
        "hit_rate": round(p.cached_tokens / max(p.prompt_tokens, 1), 4),
        "workers": p.workers,
        "requeued": p.requeued,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    job_arguments(ap)
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    print(f"# {platform.processor() or platform.machine()}, {cpus} CPUs", file=sys.stderr)
    folder = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    os.environ["ACCORDION_BATCHES"] = str(folder / "jobs")
    os.environ["ACCORDION_MODELS"] = str(folder / "models")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        inp = folder / "in.jsonl"
        write_input(inp, args.requests)
        common = {
            "model": args.model,
            "system": system_prompt(args.system_tokens),
            "sampling": {"temperature": 0, "max_tokens": args.answer_tokens},
        }
        runs = [
            ("(b) one engine, embedded", {}),
            ("(e) Ray, 1 worker", {"ray": "auto", "workers": 1, "cpus_per_worker": cpus}),
            (f"(f) Ray, {cpus} workers", {"ray": "auto", "workers": cpus}),
            (
                f"(g) Ray, {cpus} workers, one killed",
                {"ray": "auto", "workers": cpus, "kill_at": args.requests // 4},
            ),
        ]
        rows = []
        for i, (name, options) in enumerate(runs):
            rows.append(timed(name, inp, folder / f"{i}.jsonl", **common, **options))
            print(f"  {name}: {rows[-1]['seconds']} s", file=sys.stderr)
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    base = rows[0]["requests_per_s"]
    print(
        f"{args.requests} requests, a {args.system_tokens}-token shared system prompt,"
        f" {args.answer_tokens}-token answers, {args.model}, {cpus} CPUs\n"
    )
    print("| run | s | req/s | ratio | cache hits | requeued |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['seconds']} | {r['requests_per_s']}"
            f" | {r['requests_per_s'] / base:.2f}x | {100 * r['hit_rate']:.1f}% | {r['requeued']} |"
        )
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
