"""Decode through the server against decode in process, and the engine process's restart.

    .venv/bin/python bench/bench_engine_process.py [--model smollm2] [--tokens 256]
        [--rounds 3] [--clients 8]

Side by side in one run, greedy with `ignore_eos` so every answer has its length:
  in process: accordion.LLM, one sequence (its decode rate from the sequence's timings);
  server: `accordion serve`, one streamed /api/generate (tokens after the first over the
    time from the first chunk to the last, as the client sees them), with the engines
    on the server's main thread, and with --engine-process; each read by two clients:
    httpx parsing every line (what the ollama and openai Python clients do), and a bare
    socket that only stamps each chunk. On two cores the client's own CPU competes with
    the engine's threads: the bare client shows the server's cost alone;
  8 clients at once on each server: aggregate tokens/s and mean time to first token;
  llama.cpp's llama-server on the same file (../shared/peers): one streamed completion on
    one slot (by both clients), and the same 8 clients on 8 slots;
  RSS after a short request: the server's process, and the engine process;
  restart: SIGKILL of the engine process during 4 streams, the time from the kill to the
    first chunk after it, and whether the streams end as undisturbed ones do.
Single streams: best of --rounds, all of them taken in turn each round. Prints markdown,
then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from live_server import LiveServer, free_port  # noqa: E402

from accordion import LLM, SamplingParams  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def in_process(llm: LLM, tokens: int) -> float:
    """One sequence's decode rate, from its own timings."""
    ids = llm.encode_chat([{"role": "user", "content": PROMPT}])
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    out = llm.submit(ids, params).result()
    return (len(out.token_ids) - 1) / out.timings["decode"]


def ours(model: str, tokens: int, prompt: str = PROMPT) -> dict[str, Any]:
    """A greedy /api/generate of exactly `tokens` tokens."""
    return {
        "model": model,
        "prompt": prompt,
        "options": {"temperature": 0, "num_predict": tokens, "ignore_eos": True},
    }


def peers(tokens: int, prompt: str = PROMPT) -> dict[str, Any]:
    """The same for llama-server's /completion."""
    body = {"prompt": prompt, "n_predict": tokens, "stream": True, "temperature": 0}
    body["ignore_eos"] = True
    return body


def stream(url: str, model: str, tokens: int, prompt: str = PROMPT) -> dict[str, Any]:
    body = ours(model, tokens, prompt)
    start, stamps, text = time.perf_counter(), [], []
    with httpx.stream("POST", url + "/api/generate", json=body, timeout=600) as r:
        for line in r.iter_lines():
            doc = json.loads(line)
            if doc.get("response"):
                stamps.append(time.perf_counter())
                text.append(doc["response"])
    return {"start": start, "stamps": stamps, "text": "".join(text)}


@contextlib.contextmanager
def llama_server(model: str, slots: int) -> Iterator[str | None]:
    """llama.cpp's server on the same file with `slots` slots (each with the context one
    slot has), its URL; None where ../shared/peers has no build."""
    binary = Path(__file__).resolve().parents[2] / "shared/peers/llama.cpp/llama-server"
    if not binary.exists():
        yield None
        return
    from accordion.loader.bundled import resolve_model_path

    port = free_port()
    args = [str(binary), "-m", str(resolve_model_path(model)), "-a", model, "--host"]
    args += ["127.0.0.1", "--port", str(port), "-t", "2", "-c", str(8192 * slots)]
    args += ["-np", str(slots)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def peer_stream(url: str, tokens: int, prompt: str = PROMPT) -> dict[str, Any]:
    start, stamps = time.perf_counter(), []
    with httpx.stream("POST", url + "/completion", json=peers(tokens, prompt), timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("content"):
                stamps.append(time.perf_counter())
    return {"start": start, "stamps": stamps}


def raw_stream(url: str, path: str, body: dict[str, Any], marker: bytes) -> dict[str, Any]:
    """The stream read by a client that does next to nothing: a socket, each line that
    holds `marker` (one per token chunk) stamped when its bytes arrive, nothing parsed."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    start, stamps, rest = time.perf_counter(), [], b""
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head.encode() + payload)
        while data := s.recv(1 << 16):
            now = time.perf_counter()
            *lines, rest = (rest + data).split(b"\n")
            stamps += [now] * sum(marker in line for line in lines)
    return {"start": start, "stamps": stamps}


def raw_ours(url: str, model: str, tokens: int) -> dict[str, Any]:
    return raw_stream(url, "/api/generate", ours(model, tokens), b'"done": false')


def raw_peer(url: str, tokens: int) -> dict[str, Any]:
    return raw_stream(url, "/completion", peers(tokens), b'"stop":false')


def rate(stamps: list[float]) -> float:
    """Tokens after the first over the time from the first chunk to the last."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def clients(fn: Callable[[str], dict[str, Any]], n: int) -> tuple[float, float]:
    """n clients at once, each streaming its own prompt through fn(prompt): aggregate
    tokens/s and mean TTFT."""
    prompts = [f"{PROMPT} ({i})" for i in range(n)]
    results: list[dict[str, Any]] = [{} for _ in prompts]

    def one(i: int) -> None:
        results[i] = fn(prompts[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = max(r["stamps"][-1] for r in results)
    total = sum(len(r["stamps"]) for r in results)
    ttft = statistics.mean(r["stamps"][0] - r["start"] for r in results)
    return total / (end - start), ttft


def restart(url: str, model: str, tokens: int) -> dict[str, Any]:
    undisturbed = [stream(url, model, tokens, f"{PROMPT} [{i}]")["text"] for i in range(4)]
    pid = httpx.get(url + "/api/ps").json()["engine_process"]["pid"]
    results: list[dict[str, Any]] = [{} for _ in range(4)]

    def one(i: int) -> None:
        results[i] = stream(url, model, tokens, f"{PROMPT} [{i}]")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    killed = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join()
    after = [min((s for s in r["stamps"] if s > killed), default=killed) for r in results]
    return {
        "resume_s": round(statistics.mean(a - killed for a in after), 2),
        "identical": [r["text"] for r in results] == undisturbed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    one, two = {"ACCORDION_ENGINE_PROCESS": "0"}, {"ACCORDION_ENGINE_PROCESS": "1"}
    envs = {"main_thread": one, "engine_process": two}
    servers = {name: LiveServer(Path(tempfile.mkdtemp()), env=env) for name, env in envs.items()}
    out: dict[str, Any] = {name: {} for name in servers}
    try:
        for server in servers.values():
            stream(server.url, args.model, 8)  # load it
        time.sleep(3)  # the KV cache shrinks back after 2 s idle
        for name, server in servers.items():
            rss = {"front": psutil.Process(server.proc.pid).memory_info().rss}
            engine = httpx.get(server.url + "/api/ps").json().get("engine_process")
            if engine:
                rss["engine"] = psutil.Process(engine["pid"]).memory_info().rss
            out[name]["rss"] = rss
        # single streams, all in turn each round: the host's drift (10-15% over
        # minutes here) falls on all of them alike
        best: dict[str, Any] = {"in_process": 0.0}
        best |= {name: {"httpx": 0.0, "raw": 0.0} for name in ("llama_server", *servers)}

        def take(name: str, client: str, stamps: list[float]) -> None:
            best[name][client] = max(best[name][client], rate(stamps))

        with LLM(args.model) as llm, llama_server(args.model, 1) as peer:
            for _ in range(args.rounds):
                best["in_process"] = max(best["in_process"], in_process(llm, args.tokens))
                if peer:
                    take("llama_server", "httpx", peer_stream(peer, args.tokens)["stamps"])
                    take("llama_server", "raw", raw_peer(peer, args.tokens)["stamps"])
                for name, server in servers.items():
                    take(name, "httpx", stream(server.url, args.model, args.tokens)["stamps"])
                    take(name, "raw", raw_ours(server.url, args.model, args.tokens)["stamps"])
        out["in_process"] = best["in_process"]
        out["llama_server"] = {"single": best["llama_server"]} if peer else None
        for name, server in servers.items():
            answer = functools.partial(stream, server.url, args.model, args.tokens // 2)
            aggregate, ttft = clients(answer, args.clients)
            out[name].update(single=best[name], aggregate=aggregate, ttft=ttft)
            print(f"  {name}: {out[name]}", file=sys.stderr)
        out["restart"] = restart(servers["engine_process"].url, args.model, args.tokens // 2)
    finally:
        for server in servers.values():
            server.stop()
    with llama_server(args.model, args.clients) as peer:
        if peer:
            answer = functools.partial(peer_stream, peer, args.tokens // 2)
            aggregate, ttft = clients(answer, args.clients)
            out["llama_server"].update(aggregate=aggregate, ttft=ttft)
    base = out["in_process"]
    print(f"{args.model}, {args.tokens} tokens, best of {args.rounds}\n")
    print(
        "| | single stream, httpx client tok/s | vs in process | bare client tok/s"
        f" | vs in process | {args.clients} clients tok/s | mean TTFT s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| in process (LLM) | {base:.1f} | 1.00x | | | | |")

    def line(label: str, r: dict[str, Any]) -> None:
        one, raw = r["single"]["httpx"], r["single"]["raw"]
        print(
            f"| {label} | {one:.1f} | {one / base:.2f}x | {raw:.1f} | {raw / base:.2f}x"
            f" | {r['aggregate']:.1f} | {r['ttft']:.3f} |"
        )

    peer = out["llama_server"]
    if peer:
        line(
            f"llama-server, same file, 2 threads (-np 1; -np {args.clients} for the clients)", peer
        )
    for name in ("main_thread", "engine_process"):
        line(f"server, {name.replace('_', ' ')}", out[name])
    if peer:
        r = out["engine_process"]
        print(
            "\nserve (engine process) / llama-server:"
            f" single stream {r['single']['httpx'] / peer['single']['httpx']:.2f}x (httpx),"
            f" {r['single']['raw'] / peer['single']['raw']:.2f}x (bare),"
            f" {args.clients} clients {r['aggregate'] / peer['aggregate']:.2f}x,"
            f" mean TTFT {r['ttft'] / peer['ttft']:.2f}x"
        )
    for name in ("main_thread", "engine_process"):
        parts = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in out[name]["rss"].items())
        print(f"RSS after a short request, server {name.replace('_', ' ')}: {parts}")
    r = out["restart"]
    print(
        f"\nSIGKILL of the engine during 4 streams: the first chunk after it {r['resume_s']} s"
        f" later on average; identical to undisturbed streams: {r['identical']}"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
