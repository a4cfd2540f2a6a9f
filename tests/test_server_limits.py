"""The manager under concurrency: one load for many callers, a bounded queue."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer


def generate(url: str, n: int = 4) -> httpx.Response:
    body = {
        "model": "smollm2",
        "prompt": "Hello",
        "stream": False,
        "options": {"temperature": 0, "num_predict": n},
    }
    return httpx.post(url + "/api/generate", json=body, timeout=120)


def test_concurrent_first_requests_load_the_model_once(tmp_path: Path) -> None:
    server = LiveServer(tmp_path)
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: generate(server.url), range(4)))
        assert [r.status_code for r in replies] == [200] * 4
        models = httpx.get(server.url + "/api/ps", timeout=10).json()["models"]
        assert len(models) == 1
        assert Path(server.log).read_text().count("loaded model=smollm2:latest") == 1
    finally:
        server.stop()


def test_a_full_queue_answers_503(tmp_path: Path) -> None:
    server = LiveServer(tmp_path, env={"ACCORDION_MAX_QUEUE": "1"})
    try:
        assert generate(server.url).status_code == 200  # loaded, idle
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(generate, server.url, 300)
            for _ in range(200):  # wait until the long request holds the only queue slot
                models = httpx.get(server.url + "/api/ps", timeout=10).json()["models"]
                if models and models[0]["active"] == 1:
                    break
                time.sleep(0.02)
            refused = generate(server.url)
            assert refused.status_code == 503
            assert "busy" in refused.json()["error"]
            assert long.result().status_code == 200
        assert generate(server.url).status_code == 200  # and it serves again afterwards
    finally:
        server.stop()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_keep_alive_env_is_read(tmp_path: Path, value: str) -> None:
    server = LiveServer(tmp_path, env={"ACCORDION_KEEP_ALIVE": value})
    try:
        assert generate(server.url).status_code == 200
        models = httpx.get(server.url + "/api/ps", timeout=10).json()["models"]
        assert (len(models) == 0) == (value == "0")
    finally:
        server.stop()
