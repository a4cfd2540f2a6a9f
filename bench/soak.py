"""The long run of tests/test_reliability.py: a disconnect storm at full size, then
schemathesis against /openapi.json, each against a fresh real server.

    .venv/bin/python bench/soak.py                   # 5 rounds x 200 drops, 300 s of fuzzing
    .venv/bin/python bench/soak.py --drops 50 --fuzz-seconds 60

Prints, per round, what the server holds afterwards (active requests, KV tokens in use
and allocated) and its RSS; then schemathesis' summary. Exits non-zero when a round
leaves anything held, RSS grows more than 50 MiB past the first round, or the fuzzer
found a server error.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from live_server import LiveServer  # noqa: E402
from test_reliability import MODEL, chat, storm, wait_idle  # noqa: E402


def disconnect_storm(rounds: int, drops: int) -> bool:
    server = LiveServer(Path(tempfile.mkdtemp()), env={"ACCORDION_MAX_QUEUE": "2"})
    ok = True
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            assert http.post("/api/chat", json=chat("hi")).status_code == 200
            process = psutil.Process(server.proc.pid)
            first = None
            for round_ in range(rounds):
                start = time.perf_counter()
                kinds = storm(server, drops, seed=round_)
                ps = wait_idle(http, timeout=120, floor=True)
                rss = process.memory_info().rss
                first = first or rss
                served = http.post("/api/chat", json=chat("hi")).status_code == 200
                print(
                    f"round {round_ + 1}: {drops} drops ({len(kinds)} kinds) in"
                    f" {time.perf_counter() - start:.1f} s; active {ps['active']},"
                    f" used {ps['context']['used']}, allocated {ps['context']['allocated']}"
                    f" tokens; RSS {rss >> 20} MiB ({(rss - first) >> 20:+d}); next served:"
                    f" {served}",
                    flush=True,
                )
                ok &= served and rss - first < 50 << 20
    finally:
        server.stop()
    log = server.log.read_text()
    if "Traceback" in log:
        print("server log has a traceback:\n" + log[-3000:])
        ok = False
    return ok


def fuzz(seconds: int) -> bool:
    server = LiveServer(Path(tempfile.mkdtemp()))
    try:
        httpx.post(server.url + "/api/generate", json={"model": MODEL, "prompt": ""}, timeout=60)
        st = Path(sys.executable).with_name("st")
        command = [
            str(st), "run", f"{server.url}/openapi.json", "--checks", "all",
            "--max-time", str(seconds), "--workers", "2", "--request-timeout", "60",
            "--continue-on-failure",
        ]  # fmt: skip
        print("$", " ".join(command), flush=True)
        run = subprocess.run(command, capture_output=True, text=True)
        report = Path(tempfile.mkdtemp()) / "schemathesis.txt"
        report.write_text(run.stdout + run.stderr)
        print(run.stdout[-6000:])
        print(f"(the whole report: {report})")
    finally:
        server.stop()
    server_errors = run.stdout.count("Server error")
    print(f"schemathesis: {server_errors} server-error reports; exit {run.returncode}")
    return server_errors == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drops", type=int, default=200)
    parser.add_argument("--fuzz-seconds", type=int, default=300)
    args = parser.parse_args()
    ok = disconnect_storm(args.rounds, args.drops)
    if args.fuzz_seconds:
        ok &= fuzz(args.fuzz_seconds)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
