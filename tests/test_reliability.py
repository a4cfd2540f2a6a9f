"""The server survives its clients: poisoned options, dropped connections, huge chats,
hostile pages, unbounded bodies, broken model files. Each case against a real server."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from live_server import LiveServer

from accordion.api import prompts

MODEL = "smollm2"
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "paper", "lamp", "orbit"]


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        client.post("/api/generate", json={"model": MODEL, "prompt": ""})  # loaded once
        yield client


def chat(content: str, **options: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "stream": False,
        "options": {"temperature": 0, "num_predict": 8, **options},
    }


WARM_FLOOR = 32  # tokens of KV an idle engine keeps (EngineConfig.warm_tokens)


def wait_idle(http: httpx.Client, timeout: float = 60, floor: bool = False) -> dict[str, Any]:
    """/api/ps of the model once nothing is active and no KV block is in use (and, with
    `floor`, once the KV cache shrank back to its warm floor)."""
    deadline = time.monotonic() + timeout
    while True:
        ps = next(m for m in http.get("/api/ps").json()["models"] if m["name"].startswith(MODEL))
        idle = ps["active"] == 0 and ps["context"]["used"] == 0
        if idle and (not floor or ps["context"]["allocated"] <= WARM_FLOOR):
            return ps
        assert time.monotonic() < deadline, f"still busy: {ps}"
        time.sleep(0.1)


# -- one bad request fails alone -------------------------------------------------------

POISON = [
    {"temperature": 1, "presence_penalty": -1e308},
    {"temperature": 1, "frequency_penalty": 1e308},
    {"temperature": float("nan")},
    {"temperature": float("inf")},
    {"temperature": 1, "repeat_penalty": float("-inf")},
    {"top_p": float("nan")},
    {"temperature": 1, "presence_penalty": 2.5},
]


@pytest.mark.parametrize("options", POISON, ids=[json.dumps(p) for p in POISON])
def test_poisoned_options_are_a_400(http: httpx.Client, options: dict[str, Any]) -> None:
    # json.dumps writes NaN / Infinity, which Python's parser (and so the server's) accepts
    body = json.dumps(chat("hi", **options))
    r = http.post("/api/chat", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "must be" in r.json()["error"]


def test_openai_penalties_out_of_range_are_a_400(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], frequency_penalty=-3
        )


def test_tiny_positive_temperatures_sample_fine(http: httpx.Client) -> None:
    for temperature in (1e-320, 1e-40, 1e-6):
        r = http.post("/api/chat", json=chat("Say hello.", temperature=temperature))
        assert r.status_code == 200, r.text
        assert r.json()["done_reason"] in ("stop", "length")


def test_a_poisoned_request_beside_two_streams_leaves_them_whole(
    server: LiveServer, http: httpx.Client
) -> None:
    reference = http.post("/api/chat", json=chat("Count from one to ten.", num_predict=48))
    expected = reference.json()["message"]["content"]
    texts: list[str] = []

    def stream() -> None:
        body = {**chat("Count from one to ten.", num_predict=48), "stream": True}
        with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=120) as r:
            lines = [json.loads(line) for line in r.iter_lines() if line]
        assert lines[-1]["done"] is True and "error" not in lines[-1]
        texts.append("".join(line["message"]["content"] for line in lines))

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    for options in POISON:
        body = json.dumps({**chat("hi", **options), "stream": True})
        r = http.post("/api/chat", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400
    for t in threads:
        t.join(timeout=120)
    assert texts == [expected, expected]


# -- every request counted in is counted out ---------------------------------------------


def _raw(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def _long_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def drop_one(port: int, rng: random.Random) -> str:
    """Send a request and drop the connection at a random point; returns where."""
    openai_api, stream = rng.random() < 0.5, rng.random() < 0.7
    when = rng.choice(["before", "prefill", "stream"] if stream else ["before", "prefill"])
    messages = [{"role": "user", "content": _long_prompt(rng, rng.choice([50, 1500]))}]
    if openai_api:
        path = "/v1/chat/completions"
        body: dict[str, Any] = {"model": MODEL, "messages": messages, "stream": stream}
        body["max_tokens"] = 400
    else:
        path = "/api/chat"
        body = {"model": MODEL, "messages": messages, "stream": stream}
        body["options"] = {"num_predict": 400}
    sock = _raw(port, path, body)
    try:
        if when == "prefill":
            time.sleep(rng.uniform(0.02, 0.3))
        elif when == "stream":
            got = b""
            while got.count(b"\n") < 12:  # the headers and a few chunks
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
    finally:
        sock.close()
    return f"{'openai' if openai_api else 'ollama'}-{'stream' if stream else 'whole'}-{when}"


def storm(server: LiveServer, count: int, seed: int) -> set[str]:
    rng = random.Random(seed)
    seeds = [rng.random() for _ in range(count)]
    with ThreadPoolExecutor(3) as pool:
        return set(pool.map(lambda s: drop_one(server.port, random.Random(s)), seeds))


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {"ACCORDION_MAX_QUEUE": "2", "ACCORDION_HEADER_TIMEOUT": "1"}
    live = LiveServer(tmp_path_factory.mktemp("queue"), env=env)
    yield live
    live.stop()


def test_dropped_requests_give_everything_back(small_queue: LiveServer) -> None:
    with httpx.Client(base_url=small_queue.url, timeout=120) as http:
        assert http.post("/api/chat", json=chat("hi")).status_code == 200
        process = psutil.Process(small_queue.proc.pid)
        rss = []
        for round_ in range(5):
            kinds = storm(small_queue, 24, seed=round_)
            wait_idle(http, floor=True)  # counted out, blocks back, KV at its warm floor
            rss.append(process.memory_info().rss)
            if round_ == 0:
                assert len(kinds) >= 6, kinds  # the mix covered both APIs and drop points
        assert http.post("/api/chat", json=chat("hi")).status_code == 200  # served again
        assert rss[-1] - rss[0] < 50 << 20, [r >> 20 for r in rss]
    assert "Traceback" not in small_queue.log.read_text()


def test_a_stream_over_the_queue_limit_is_a_503_not_an_empty_200(
    small_queue: LiveServer,
) -> None:
    body = {**chat(_long_prompt(random.Random(7), 1500), num_predict=200), "stream": True}
    held = [_raw(small_queue.port, "/api/chat", body) for _ in range(2)]
    try:
        with httpx.Client(base_url=small_queue.url, timeout=120) as http:
            deadline = time.monotonic() + 30
            while http.get("/api/ps").json()["models"][0]["active"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            r = http.post("/api/chat", json={**chat("hi"), "stream": True})
            assert r.status_code == 503 and "busy" in r.json()["error"]
    finally:
        for sock in held:
            sock.close()
    with httpx.Client(base_url=small_queue.url, timeout=120) as http:
        wait_idle(http)  # the dropped streams stop computing before the next test


def test_a_request_head_that_never_ends_is_closed(small_queue: LiveServer) -> None:
    trickle = socket.create_connection(("127.0.0.1", small_queue.port), timeout=10)
    silent = socket.create_connection(("127.0.0.1", small_queue.port), timeout=10)
    start = time.monotonic()
    trickle.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for sock in (trickle, silent):
        assert sock.recv(1024) == b""  # closed by the server (ACCORDION_HEADER_TIMEOUT=1)
        sock.close()
    assert time.monotonic() - start < 5
    # a keep-alive connection that finished its first request is not cut off mid-way
    with httpx.Client(base_url=small_queue.url) as http:
        for _ in range(3):
            assert http.get("/api/version").status_code == 200
            time.sleep(0.6)


def test_error_statuses_are_documented(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    for route in ("/api/chat", "/v1/chat/completions", "/api/tags"):
        for operation in paths[route].values():
            assert {"400", "401", "403", "404", "413", "415", "503"} <= set(operation["responses"])
    streamed = paths["/api/chat"]["post"]["responses"]["200"]["content"]
    assert "application/x-ndjson" in streamed


# -- nothing heavy on the HTTP thread ---------------------------------------------------


def test_twenty_thousand_messages_are_answered_and_block_nothing(
    server: LiveServer, http: httpx.Client
) -> None:
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": random.choice(WORDS)}
        for i in range(20_000)
    ]
    body = {**chat("x", num_ctx=128, num_predict=1), "messages": messages}
    pings: list[float] = []
    done = threading.Event()

    def ping() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            while not done.is_set():
                start = time.perf_counter()
                c.get("/api/version")
                pings.append(time.perf_counter() - start)
                time.sleep(0.02)

    pinger = threading.Thread(target=ping)
    pinger.start()
    r = http.post("/api/chat", json=body)
    done.set()
    pinger.join()
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        report = r.json()["truncated"]
        assert report["kept"] < 128 and report["original"] > 20_000
    assert pings and max(pings) <= 0.1, sorted(pings)[-3:]


@given(st.lists(st.integers(1, 40), min_size=2, max_size=20_000), st.floats(0, 1, exclude_max=True))
@settings(max_examples=60, deadline=None)
def test_truncation_search_renders_what_the_limit_allows_not_the_history(
    sizes: list[int], cut: float
) -> None:
    """The tail search (after one render of the whole) renders conversations that
    nearly fit, not the whole history again per step: its cost follows the limit.
    Its cost is counted in messages rendered, not timed."""
    newest_first = list(itertools.accumulate(reversed(sizes)))
    # a limit the newest message fits below and the whole does not
    limit = sizes[-1] + 4 + int(cut * (newest_first[-1] - sizes[-1]))
    rendered: list[int] = []

    def encode(n: int) -> list[int]:  # a template's 3 framing tokens and the newest n messages
        rendered.append(n)
        return [0] * (3 + newest_first[n - 1])

    kept = prompts._longest_tail(encode, len(sizes), limit)
    fits = max(n for n in range(1, len(sizes) + 1) if 3 + newest_first[n - 1] < limit)
    assert len(kept) == 3 + newest_first[fits - 1]  # the longest tail that fits, exactly
    assert sum(rendered) <= 4 * fits * (2 + math.log2(fits)), (fits, rendered)


def test_truncation_keeps_the_newest_messages_that_fit(http: httpx.Client) -> None:
    messages = [{"role": "system", "content": "You are terse."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i}"}
        for i in range(301)
    ]
    body = {**chat("x", num_ctx=256, num_predict=1), "messages": messages}
    report = http.post("/api/chat", json=body).json()["truncated"]
    assert report["kept"] < 256 and report["removed"] > 0
    # one more message than was kept would not fit; the kept ones would (a bisection check)
    shorter = {**body, "messages": messages[:1] + messages[-10:], "truncate": False}
    assert http.post("/api/chat", json=shorter).status_code == 200


def test_a_template_that_builds_megabytes_is_refused(http: httpx.Client) -> None:
    body = {"model": "big-template", "from": MODEL, "template": '{{ "word " * 4000000 }}'}
    assert http.post("/api/create", json={**body, "stream": False}).status_code == 200
    start = time.perf_counter()
    r = http.post("/api/generate", json={"model": "big-template", "prompt": "hi", "stream": False})
    assert r.status_code == 400 and "too large" in r.json()["error"]
    assert time.perf_counter() - start < 5


# -- no web page gets in ---------------------------------------------------------------


def test_foreign_host_names_are_refused(http: httpx.Client) -> None:
    for host in ("evil.example.com", "evil.example.com:11434", "127.0.0.1.nip.io"):
        r = http.get("/api/tags", headers={"host": host})
        assert r.status_code == 403, host
    for host in ("localhost:1", "127.0.0.1", "[::1]:5", "box.local", "my.localhost"):
        assert http.get("/api/version", headers={"host": host}).status_code == 200, host


def test_foreign_origins_are_refused_without_cors_headers(http: httpx.Client) -> None:
    evil = {"origin": "http://evil.example.com"}
    for r in (
        http.post("/api/chat", json=chat("hi"), headers=evil),
        http.options("/api/chat", headers={**evil, "access-control-request-method": "POST"}),
    ):
        assert r.status_code == 403
        assert "access-control-allow-origin" not in r.headers
    local = {"origin": "http://localhost:3000"}
    r = http.post("/api/chat", json=chat("hi"), headers=local)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == local["origin"]


def test_simple_content_types_are_refused(http: httpx.Client) -> None:
    body = json.dumps(chat("hi"))
    for kind in ("text/plain", "multipart/form-data; boundary=x"):
        r = http.post("/api/chat", content=body, headers={"content-type": kind})
        assert r.status_code == 415, kind
    # curl -d sends form-urlencoded, and Ollama's documentation uses curl -d
    curl = {"content-type": "application/x-www-form-urlencoded"}
    assert http.post("/api/chat", content=body, headers=curl).status_code == 200
    page = {**curl, "origin": "http://localhost:3000"}
    assert http.post("/api/chat", content=body, headers=page).status_code == 415


def test_configured_origin_and_api_key(tmp_path: Path) -> None:
    env = {"ACCORDION_ORIGINS": "https://app.example.com", "ACCORDION_API_KEY": "s3cret"}
    live = LiveServer(tmp_path, env=env)
    try:
        origin = {"origin": "https://app.example.com"}
        preflight = httpx.options(
            live.url + "/v1/chat/completions",
            headers={
                **origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == origin["origin"]
        assert "authorization" in preflight.headers["access-control-allow-headers"]
        assert httpx.get(live.url + "/api/version").status_code == 200  # open without the key
        with pytest.raises(ollama.ResponseError) as refused:
            ollama.Client(host=live.url).list()
        assert refused.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="wrong").models.list()
        keyed = ollama.Client(host=live.url, headers={"Authorization": "Bearer s3cret"})
        assert any(m.model.startswith(MODEL) for m in keyed.list().models)
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret")
        assert client.models.list().data
        r = httpx.get(live.url + "/api/tags", headers={**origin, "authorization": "Bearer s3cret"})
        assert r.headers["access-control-allow-origin"] == origin["origin"]
        # the CLI sends the key from the same variable the server reads
        env = {**os.environ, "ACCORDION_HOST": live.url, "ACCORDION_MODELS": str(tmp_path)}
        env.pop("ACCORDION_API_KEY", None)
        command = [sys.executable, "-m", "accordion", "list"]
        refused_cli = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert refused_cli.returncode != 0 and "API key" in refused_cli.stderr + refused_cli.stdout
        keyed_env = {**env, "ACCORDION_API_KEY": "s3cret"}
        listed = subprocess.run(command, env=keyed_env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and MODEL in listed.stdout, listed.stderr
    finally:
        live.stop()


# -- bodies and files ------------------------------------------------------------------


def test_a_huge_chunked_body_is_cut_off(server: LiveServer) -> None:
    process = psutil.Process(server.proc.pid)
    before = process.memory_info().rss
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    sent = 0
    try:
        for _ in range(100):  # 100 MiB, or until the server stops reading
            sock.sendall(chunk)
            sent += 1
    except OSError:
        pass
    reply = sock.recv(65536)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 100 or b"413" in reply
    assert process.memory_info().rss - before < 40 << 20


def test_broken_files_never_break_the_listing(
    server: LiveServer, http: httpx.Client, tmp_path: Path
) -> None:
    models = server.log.parent  # the server's store: paths there may be loaded
    (models / "random.gguf").write_bytes(random.Random(1).randbytes(4096))
    (models / "empty.gguf").write_bytes(b"")
    (models / "passwd.gguf").symlink_to("/etc/passwd")
    good = http.post("/api/show", json={"model": MODEL}).json()["modelfile"].split()[1]
    (models / "truncated.gguf").write_bytes(Path(good).read_bytes()[:100_000])
    for name in ("random", "empty", "passwd", "truncated"):
        sent = str(models / f"{name}.gguf")
        r = http.post("/api/create", json={"model": name, "from": sent})
        assert r.status_code in (400, 403), (name, r.text)
        error = r.json()["error"].replace(sent, "")  # it may name what we sent, nothing else
        assert "/" not in error and "root" not in error, error
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(Path(good).read_bytes())
    r = http.post("/api/create", json={"model": "outside", "from": str(outside)})
    assert r.status_code == 403
    # a valid copy in the store becomes a model; deleting its file marks it broken
    (models / "copy.gguf").write_bytes(Path(good).read_bytes())
    r = http.post("/api/create", json={"model": "copy", "from": str(models / "copy.gguf")})
    assert r.status_code == 200, r.text
    (models / "copy.gguf").unlink()
    tags = http.get("/api/tags")
    assert tags.status_code == 200
    rows = {m["name"]: m for m in tags.json()["models"]}
    assert rows["copy:latest"]["error"] and MODEL + ":latest" in rows
    assert http.post("/api/chat", json={**chat("hi"), "model": "copy"}).status_code == 404


# -- hand-fuzzed bodies: never a 5xx, never a hang --------------------------------------

FUZZ: list[tuple[str, Any]] = [
    ("/api/chat", {"model": "~root", "messages": [{"role": "user", "content": "x"}]}),
    ("/api/generate", {"model": "~", "prompt": "x"}),
    ("/api/show", {"model": "~nobody/x.gguf"}),
    ("/api/generate", {"model": "a\u0000.gguf", "prompt": "x"}),
    (
        "/api/generate",
        {"model": MODEL, "prompt": "\ud800 lone", "stream": False, "options": {"num_predict": 2}},
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "\udfff", "max_tokens": 2}),
    (
        "/api/chat",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "\ud83d"}],
            "stream": False,
            "options": {"num_predict": 2},
        },
    ),
    (
        "/api/generate",
        {
            "model": MODEL,
            "prompt": "x",
            "options": {"seed": 2**63 - 1, "num_predict": 1},
            "stream": False,
        },
    ),
    (
        "/api/generate",
        {
            "model": MODEL,
            "prompt": "x",
            "options": {"num_keep": 10**9, "num_ctx": 4, "num_predict": 1},
            "stream": False,
        },
    ),
    ("/api/embed", {"model": MODEL, "input": ["\ud800"] * 3}),
    ("/api/copy", {"source": "~x", "destination": "~y"}),
    ("/api/delete", {"model": "~x"}),
    ("/api/pull", {"model": "~x"}),
]


@pytest.mark.parametrize(("path", "body"), FUZZ, ids=[f"{p} {i}" for i, (p, _) in enumerate(FUZZ)])
def test_hand_fuzz_is_never_a_server_error(http: httpx.Client, path: str, body: Any) -> None:
    method = "DELETE" if path == "/api/delete" else "POST"
    r = http.request(
        method,
        path,
        content=json.dumps(body),
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code < 500, r.text


@pytest.mark.parametrize("path", ["/api/create", "/api/chat", "/v1/chat/completions"])
def test_deep_json_is_a_400(http: httpx.Client, path: str) -> None:
    body = '{"model": "x", "messages": ' + "[" * 5000 + "]" * 5000 + "}"
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


def test_no_tracebacks_after_all_of_it(server: LiveServer, http: httpx.Client) -> None:
    assert http.get("/api/version").status_code == 200
    log = server.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
