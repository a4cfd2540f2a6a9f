"""The live picture of memory: /api/stats, `accordion ps --watch`, and the dashboard page
driven by a real headless Chromium (Debian's, with its chromedriver)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer

MODEL = "smollm2:latest"
ARTIFACTS = Path(
    os.environ.get("ACCORDION_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")
)
LONG = " ".join(["the river runs past the stone house and the old mill"] * 140)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("stats")
    server = LiveServer(folder, env={"ACCORDION_BATCHES": str(folder / "jobs")})
    yield server
    server.stop()


def long_request(url: str, done: threading.Event | None = None) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": LONG + f" {time.time()}"}],
        "stream": False,
        "options": {"num_predict": 150, "temperature": 0},
    }
    try:
        assert httpx.post(url + "/api/chat", json=body, timeout=300).status_code == 200
    finally:
        if done is not None:
            done.set()


def allocated(sample: dict[str, Any]) -> int | None:
    model = sample["models"].get(MODEL)
    return None if model is None else model["kv"]["allocated_tokens"]


def wait_floor(url: str, floor: int = 32, timeout: float = 30) -> dict[str, Any]:
    """The first sample taken from now on that shows the KV cache at its floor (an
    older one may predate the request just made)."""
    deadline, now = time.monotonic() + timeout, time.time()
    while True:
        latest = httpx.get(url + "/api/stats").json()
        fresh = latest["t"] is not None and latest["t"] >= now
        if fresh and allocated(latest) is not None and allocated(latest) <= floor:
            return latest
        assert time.monotonic() < deadline, latest
        time.sleep(0.3)


def test_history_follows_a_long_request_up_and_back(live: LiveServer) -> None:
    long_request(live.url)  # loads the model; its memory then goes back to the floor
    wait_floor(live.url)
    start = time.time()
    long_request(live.url)
    wait_floor(live.url)
    history = httpx.get(live.url + "/api/stats/history", params={"seconds": 120}).json()
    series = [allocated(s) for s in history["samples"] if s["t"] >= start - 1]
    series = [a for a in series if a is not None]
    assert max(series) >= 900, series  # the prompt alone is ~1,500 tokens
    assert series[-1] <= 32, series
    assert any(e["kind"] == "load" and e["model"] == MODEL for e in history["events"])
    sample = history["samples"][-1]
    assert sample["process"]["rss"] > 0 and sample["process"]["available"] > 0
    model = sample["models"][MODEL]
    assert model["weights_bytes"] > 0 and model["ttft_p50"] is not None
    assert httpx.get(live.url + "/api/stats/history", params={"seconds": -1}).status_code == 400


def test_the_stream_sends_samples(live: LiveServer) -> None:
    with httpx.stream("GET", live.url + "/api/stats/stream", timeout=10) as r:
        lines = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(json.loads(line[6:]))
            if len(lines) == 2:
                break
    assert lines[1]["t"] > lines[0]["t"] and MODEL in lines[1]["models"]


def test_ps_watch_redraws_as_a_request_runs(live: LiveServer, tmp_path: Path) -> None:
    worker = threading.Thread(target=long_request, args=(live.url,))
    env = {**os.environ, "ACCORDION_HOST": live.url, "ACCORDION_MODELS": str(tmp_path)}
    command = [sys.executable, "-m", "accordion", "ps", "--watch", "--interval", "0.3"]
    worker.start()
    out = subprocess.run(
        [*command, "--count", "12"], env=env, capture_output=True, text=True, timeout=120
    )
    worker.join()
    assert out.returncode == 0, out.stderr
    frames = [f for f in out.stdout.split("\n\n") if f.strip()]
    assert len(frames) == 12
    assert all("ALLOCATED" in f and "KV LAST MINUTE" in f and MODEL in f for f in frames)
    assert len(set(frames)) > 1  # the numbers moved while the request ran


def _browser() -> Any:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (make setup does it as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1400"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_draws_memory_following_requests(live: LiveServer) -> None:
    browser = _browser()
    try:
        browser.get(live.url + "/dashboard/")
        httpx.post(live.url + "/api/generate", json={"model": MODEL, "prompt": ""}, timeout=60)
        wait_floor(live.url)

        def chart_data() -> list[list[float | None]] | None:
            return browser.execute_script(
                "const c = window.dashboard.charts[arguments[0]];"
                "return c ? c.chart.data.map(s => Array.from(s)) : null;",
                MODEL,
            )

        deadline = time.monotonic() + 30
        while not (data := chart_data()) or len(data[0]) < 2:
            assert time.monotonic() < deadline, "the memory chart got no points"
            time.sleep(0.5)
        points_before = len(data[0])
        weights = data[4][-1]
        done = threading.Event()
        threading.Thread(target=long_request, args=(live.url, done)).start()
        assert done.wait(300)
        wait_floor(live.url)
        time.sleep(2.5)  # the page polls every second
        data = chart_data()
        assert data is not None and len(data[0]) > points_before + 2
        kv = [a - weights for a in data[1][points_before:] if a is not None]  # allocated bytes
        per_token = httpx.get(live.url + "/api/stats").json()["models"][MODEL]["kv"]
        peak_tokens = max(kv) / per_token["bytes_per_token"]
        assert peak_tokens >= 900, peak_tokens  # rose with the long prompt ...
        assert kv[-1] / per_token["bytes_per_token"] <= 32  # ... and fell back to the floor
        rows = browser.execute_script(
            "return [...document.querySelectorAll('#ps tbody tr')].map(r => r.innerText)"
        )
        assert any(MODEL in row for row in rows)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        browser.quit()


def test_the_page_lists_batch_jobs_and_api_batches(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import openai

    from accordion import batch

    jobs = live.log.parent / "jobs"  # the server's ACCORDION_BATCHES
    monkeypatch.setenv("ACCORDION_BATCHES", str(jobs))
    rows = [{"custom_id": f"d{i}", "prompt": f"Name a fruit ({i})."} for i in range(3)]
    inp = tmp_path / "fruit.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sampling = {"max_tokens": 3, "temperature": 0}
    progress = batch.run(inp, tmp_path / "out.jsonl", model=MODEL, sampling=sampling,
                         job_dir=jobs / "fruit-job", endpoint=live.url)  # fmt: skip
    assert progress.state == "finished"
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="x")
    lines = [{"custom_id": r["custom_id"], "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "messages": [{"role": "user", "content": r["prompt"]}],
                       **sampling}} for r in rows]  # fmt: skip
    upload = client.files.create(
        file=("in.jsonl", "".join(json.dumps(r) + "\n" for r in lines).encode()), purpose="batch"
    )
    created = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while client.batches.retrieve(created.id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    listed = {b["name"]: b for b in httpx.get(live.url + "/api/batches").json()["batches"]}
    assert listed["fruit-job"] == {"name": "fruit-job", "kind": "job", "state": "finished",
                                   "model": MODEL, "done": 3, "total": 3, "failed": 0}  # fmt: skip
    assert listed[created.id]["kind"] == "batch" and listed[created.id]["done"] == 3
    browser = _browser()
    try:
        browser.get(live.url + "/dashboard/")
        deadline = time.monotonic() + 20
        while True:
            shown = browser.execute_script(
                "return [...document.querySelectorAll('#batches .batch')].map(r => r.innerText)"
            )
            if len(shown) >= 2:
                break
            assert time.monotonic() < deadline, shown
            time.sleep(0.3)
        assert any("fruit-job (job" in row and "finished · 3 / 3" in row for row in shown), shown
        assert any(created.id in row and "3 / 3" in row for row in shown), shown
    finally:
        browser.quit()
