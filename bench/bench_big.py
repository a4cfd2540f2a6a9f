"""Beyond the toy: a TinyLlama-shaped 1.1B random-weight GGUF, accordion against
llama.cpp's llama-server on the same file, in one run.

    .venv/bin/python bench/bench_big.py [--file q4_0|q4_k_m|q5_k_m] [--modes auto]
        [--skip-peer | --peer PATH]

The file (22 layers, hidden 2048, 32 heads, 4 KV heads, FFN 5632, vocabulary 32000;
Q4_0, ~560 MiB, Q4_K_M's mix of Q4_K and Q6_K, ~640 MiB, or Q5_K_M's, ~720) is written once with
gguf's writer into $ACCORDION_CACHE/bench (never committed). For accordion,
bench_foundation.measure runs in a fresh process per mode: load seconds, RSS after
load, after a 'hello' and after the requests, peak RSS, prefill and decode tokens/s.
The process floor is the RSS of a fresh interpreter with torch and the server
imported and no model.
For the peer, llama-server (-t 2 -c 4096) answers a 'hello' and a 128-token
completion: its RSS after that and its own prefill/decode timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT / "tests")]

from bench_foundation import measure  # noqa: E402
from tiny_gguf import Q, TinySpec, write_tiny  # noqa: E402

from accordion.loader.gguf_file import cache_root  # noqa: E402

PEER = ROOT.parent / "shared" / "peers" / "llama.cpp" / "llama-server"
TINYLLAMA = TinySpec(
    arch="llama", layers=22, hidden=2048, heads=32, kv_heads=4, head_dim=64, ffn=5632,
    context=4096, quant=Q.Q4_0, vocab=32000, embed_quant=Q.Q4_0, seed=1,
)  # fmt: skip


# the usual Q4_K_M mix: Q4_K, with V, the FFN's down matrix and the embedding in Q6_K
TINYLLAMA_Q4_K_M = dataclasses.replace(
    TINYLLAMA,
    quant=Q.Q4_K,
    embed_quant=Q.Q6_K,
    overrides=(("attn_v.weight", Q.Q6_K), ("ffn_down.weight", Q.Q6_K)),
)
# Q5_K_M: the same mix with Q5_K in Q4_K's place
TINYLLAMA_Q5_K_M = dataclasses.replace(TINYLLAMA_Q4_K_M, quant=Q.Q5_K)
FILES = {"q4_0": TINYLLAMA, "q4_k_m": TINYLLAMA_Q4_K_M, "q5_k_m": TINYLLAMA_Q5_K_M}


def big_file(kind: str = "q4_0") -> Path:
    path = cache_root() / "bench" / f"tinyllama-1.1b-random-{kind}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        tmp = path.with_suffix(".tmp")
        write_tiny(tmp, FILES[kind])
        tmp.replace(path)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def floor_mib() -> float:
    import accordion.server.serve  # noqa: F401  torch, FastAPI, the engine: all but a model

    return psutil.Process().memory_info().rss / 2**20


def isolated(fn, *args):  # noqa: ANN001, ANN002, ANN201
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def peer(path: Path, server: Path = PEER) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(server), "-m", str(path), "-a", "big", "--host", "127.0.0.1",
               "--port", str(port), "-t", "2", "-c", "4096", "-np", "1"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            code = proc.poll()  # a build for another CPU dies at once (SIGILL)
            assert code is None, f"llama-server exited with {code} before it answered"
            assert time.monotonic() < deadline, "llama-server did not start"
            time.sleep(0.5)
        body = {"prompt": "hello", "n_predict": 1}
        httpx.post(url + "/completion", json=body, timeout=300)
        rss = psutil.Process(proc.pid).memory_info().rss / 2**20
        prompt = " ".join(["the lighthouse on the northern cape"] * 80)
        body = {"prompt": prompt, "n_predict": 128, "ignore_eos": True, "cache_prompt": False}
        timings = httpx.post(url + "/completion", json=body, timeout=600).json()["timings"]
        return {
            "rss_mib": rss,
            "prefill_tps": timings["prompt_per_second"],
            "decode_tps": timings["predicted_per_second"],
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="auto")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--skip-peer", action="store_true")
    # the shared build needs AVX-VNNI (VEX), which an AMD Zen 4 lacks (SIGILL): a build
    # for that CPU is named here
    ap.add_argument("--peer", type=Path, default=PEER, help="llama-server to compare with")
    ap.add_argument("--file", choices=sorted(FILES), default="q4_0", help="which mix of types")
    args = ap.parse_args()
    path = big_file(args.file)
    size = path.stat().st_size / 2**20
    floor = isolated(floor_mib)
    print(f"file {size:.0f} MiB; process floor (torch + server, no model) {floor:.0f} MiB")
    for mode in args.modes.split(","):
        r = isolated(measure, str(path), mode, 512, args.tokens)
        weights = r.rss_hello_mib - floor
        print(
            f"accordion {mode}: load {r.load_s:.1f} s, RSS after load {r.rss_mib:.0f} MiB,"
            f" after a 'hello' {r.rss_hello_mib:.0f} MiB ({weights:.0f} above the floor ="
            f" {weights / size:.2f} x file), after the requests {r.rss_served_mib:.0f} MiB,"
            f" peak {r.peak_mib:.0f} MiB, prefill 512 {r.prefill_tps:.0f} tok/s,"
            f" decode b1 {r.decode1_tps:.1f} tok/s, b8 {r.decode8_tps:.1f} tok/s"
        )
    if not args.skip_peer and args.peer.exists():
        p = peer(path, args.peer)
        print(f"llama-server -c 4096: {json.dumps({k: round(v, 1) for k, v in p.items()})}")


if __name__ == "__main__":
    main()
