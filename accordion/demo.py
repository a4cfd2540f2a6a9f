"""`make run`: start `accordion serve`, chat with the default model through it, stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from accordion.loader.bundled import DEFAULT_MODEL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    question = " ".join(sys.argv[1:]) or "Why is the sky blue?"
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "ACCORDION_HOST": address}
    cli = [sys.executable, "-m", "accordion"]
    server = subprocess.Popen([*cli, "serve"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://{address}/", timeout=1)
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print("accordion serve did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        print(f"accordion serve is up at {address}; asking {DEFAULT_MODEL}: {question}\n")
        answer = subprocess.run([*cli, "run", DEFAULT_MODEL, question, "--verbose"], env=env)
        subprocess.run([*cli, "ps", "-v"], env=env)
        return answer.returncode
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
