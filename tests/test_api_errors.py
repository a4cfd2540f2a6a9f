"""Every error path of the Ollama API: its status, its message, never a 500 or a traceback."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer

MODEL = "smollm2"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> str:
    """The {"error": "..."} message of a response that must have `status`."""
    assert r.status_code == status, (r.status_code, r.text)
    doc = r.json()
    assert set(doc) == {"error"}, doc
    assert isinstance(doc["error"], str) and doc["error"]
    assert "Traceback" not in doc["error"]
    return doc["error"]


# -- malformed and mistyped bodies -------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/api/generate", "/api/chat", "/api/embed", "/api/show", "/api/create", "/api/pull"]
)
def test_malformed_json(http: httpx.Client, path: str) -> None:
    r = http.post(path, content=b'{"model": "smollm2", "prompt": ', headers={"X-Request-ID": "j"})
    assert "invalid JSON" in error_of(r, 400)


def test_malformed_json_without_content_type(http: httpx.Client) -> None:
    # Ollama's clients may send JSON with no content type at all; still parsed, still a 400
    r = http.post("/api/generate", content=b"not json")
    assert "invalid JSON" in error_of(r, 400)


def test_body_that_is_not_an_object(http: httpx.Client) -> None:
    error_of(http.post("/api/generate", json=[1, 2]), 400)
    error_of(http.post("/api/create", json=[1, 2]), 400)


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/api/generate", {"prompt": "hi"}, ["model"]),
        ("/api/generate", {"model": 5, "prompt": "hi"}, ["model"]),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": "yes"}, ["stream"]),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "truncate": "no"}, ["truncate"]),
        ("/api/generate", {"model": MODEL, "prompt": 5}, ["prompt"]),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "options": [1]}, ["options"]),
        (
            "/api/generate",
            {"model": MODEL, "prompt": "hi", "options": {"temperature": "hot"}},
            ["temperature", "hot"],
        ),
        (
            "/api/generate",
            {"model": MODEL, "prompt": "hi", "options": {"num_ctx": "big"}},
            ["num_ctx"],
        ),
        (
            "/api/generate",
            {"model": MODEL, "prompt": "hi", "options": {"stop": [1]}},
            ["stop"],
        ),
        (
            "/api/generate",
            {"model": MODEL, "prompt": "hi", "options": {"seed": 10**30}},
            ["seed", "range"],
        ),
        (
            "/api/generate",
            {"model": MODEL, "prompt": "hi", "options": {"top_k": 10**30}},
            ["top_k", "range"],
        ),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "keep_alive": "nan"}, ["keep_alive"]),
        ("/api/chat", {"model": MODEL, "messages": "x"}, ["messages"]),
        ("/api/chat", {"model": MODEL, "messages": ["x"]}, ["messages"]),
        ("/api/chat", {"model": MODEL, "messages": [{"content": "hi"}]}, ["role"]),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, ["content"]),
        ("/api/chat", {"model": MODEL, "messages": USER, "stream": "yes"}, ["stream"]),
        (
            "/api/chat",
            {"model": MODEL, "messages": USER, "options": {"temperature": "hot"}},
            ["temperature"],
        ),
        ("/api/embed", {"model": MODEL, "input": 5}, ["input"]),
        ("/api/embed", {"model": MODEL, "input": []}, ["input"]),
        ("/api/embeddings", {"model": MODEL}, ["prompt"]),
        ("/api/show", {}, ["model"]),
        ("/api/create", {"model": 5, "from": MODEL}, ["model"]),
        ("/api/create", {"model": "ok", "from": MODEL, "stream": "yes"}, ["stream"]),
        ("/api/create", {"model": "ok"}, ["from"]),
        ("/api/create", {"from": MODEL}, ["model"]),
        (
            "/api/create",
            {"model": "ok", "from": MODEL, "parameters": {"temperature": "hot"}},
            ["temperature"],
        ),
        ("/api/create", {"model": "ok", "modelfile": "FROM smollm2\nBOGUS x"}, ["BOGUS"]),
        (
            "/api/create",
            {"model": "ok", "from": MODEL, "parameters": {"num_predict": -5}},
            ["num_predict"],
        ),
        ("/api/create", {"model": "ok", "from": MODEL, "template": "{% bad"}, ["template"]),
        ("/api/copy", {"source": MODEL}, ["destination"]),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "keep_alive": "soon"}, ["keep_alive"]),
    ],
)
def test_wrong_types_and_missing_fields(
    http: httpx.Client, path: str, body: dict[str, Any], words: list[str]
) -> None:
    message = error_of(http.post(path, json=body), 400)
    for word in words:
        assert word in message, message


# -- models that do not exist ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/generate", {"model": "x", "prompt": "hi"}),
        ("/api/generate", {"model": "x", "prompt": ""}),
        ("/api/chat", {"model": "x", "messages": USER}),
        ("/api/embed", {"model": "x", "input": "hi"}),
        ("/api/embeddings", {"model": "x", "prompt": "hi"}),
        ("/api/show", {"model": "x"}),
    ],
)
def test_unknown_model(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    assert error_of(http.post(path, json=body), 404) == "model 'x' not found"


def test_unknown_source_of_create_and_copy(http: httpx.Client) -> None:
    r = http.post("/api/create", json={"model": "ok", "from": "nope"})
    assert error_of(r, 404) == "model 'nope' not found"
    r = http.post("/api/copy", json={"source": "nope", "destination": "ok"})
    assert error_of(r, 404) == "model 'nope' not found"


def test_delete_unknown(http: httpx.Client) -> None:
    r = http.request("DELETE", "/api/delete", json={"model": "nope"})
    assert error_of(r, 404) == "model 'nope' not found"


def test_delete_bundled_is_refused(http: httpx.Client) -> None:
    r = http.request("DELETE", "/api/delete", json={"model": MODEL})
    assert "bundled" in error_of(r, 400)


def test_pull_of_a_model_not_bundled(http: httpx.Client) -> None:
    message = error_of(http.post("/api/pull", json={"model": "llama3"}), 404)
    assert "llama3" in message and "no network" in message and "smollm2" in message
    assert http.post("/api/pull", json={"model": MODEL, "stream": False}).json() == {
        "status": "success"
    }


@pytest.mark.parametrize("name", ["../evil", "a/b/c", "/abs", "bad name", "x:../y", ""])
def test_invalid_names_on_create_copy_delete(http: httpx.Client, name: str) -> None:
    message = error_of(http.post("/api/create", json={"model": name, "from": MODEL}), 400)
    assert "model" in message
    r = http.post("/api/copy", json={"source": MODEL, "destination": name})
    assert "model name" in error_of(r, 400)
    if name:
        r = http.request("DELETE", "/api/delete", json={"model": name})
        assert "model name" in error_of(r, 400)


def test_nothing_escapes_the_models_directory(server: LiveServer) -> None:
    root = Path(server.log).parent
    assert not list(root.parent.rglob("*evil*")), "a name escaped the store"


# -- requests the model or the server cannot serve ---------------------------------------


def test_empty_messages(http: httpx.Client) -> None:
    r = http.post("/api/chat", json={"model": MODEL, "messages": []})
    assert "messages" in error_of(r, 400)


def test_invalid_role(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}], "stream": False}
    message = error_of(http.post("/api/chat", json=body), 400)
    assert "robot" in message and "role" in message


@pytest.mark.parametrize("value", [-3, -100])
def test_negative_num_predict(http: httpx.Client, value: int) -> None:
    body = {"model": MODEL, "prompt": "hi", "options": {"num_predict": value}}
    assert "num_predict" in error_of(http.post("/api/generate", json=body), 400)


@pytest.mark.parametrize("value", [-1, -2])
def test_num_predict_minus_one_and_two_are_accepted(http: httpx.Client, value: int) -> None:
    body = {
        "model": MODEL,
        "prompt": "Say hi.",
        "stream": False,
        "options": {"num_predict": value, "num_ctx": 48, "temperature": 0},
    }
    r = http.post("/api/generate", json=body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("options", "word"),
    [({"num_ctx": 0}, "num_ctx"), ({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p")],
)
def test_out_of_range_options(http: httpx.Client, options: dict, word: str) -> None:
    body = {"model": MODEL, "prompt": "hi", "options": options}
    assert word in error_of(http.post("/api/generate", json=body), 400)


def test_images(http: httpx.Client) -> None:
    r = http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "images": ["aGk="]})
    assert "does not support images" in error_of(r, 400)
    messages = [{"role": "user", "content": "hi", "images": ["aGk="]}]
    r = http.post("/api/chat", json={"model": MODEL, "messages": messages})
    assert "does not support images" in error_of(r, 400)


@pytest.mark.parametrize("fmt", ["yaml", {"type": "objec"}, 3])
def test_a_format_that_cannot_be_honoured_is_a_400(http: httpx.Client, fmt: Any) -> None:
    r = http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "format": fmt})
    assert "format" in error_of(r, 400)
    r = http.post("/api/chat", json={"model": MODEL, "messages": USER, "format": fmt})
    assert "format" in error_of(r, 400)


def test_tools_on_a_model_without_tool_template(http: httpx.Client) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    r = http.post("/api/chat", json={"model": MODEL, "messages": USER, "tools": tools})
    assert error_of(r, 400) == "model 'smollm2' does not support tools"


def test_suffix_is_refused_and_shift_runs_past_the_context(http: httpx.Client) -> None:
    r = http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "suffix": "x"})
    assert "suffix" in error_of(r, 400)
    # counting repeats digits: without the repeat penalty greedy keeps counting, no EOS
    options = {"num_ctx": 64, "num_predict": 80, "temperature": 0, "num_keep": 4}
    options["repeat_penalty"] = 1.0
    body = {
        "model": MODEL,
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
        "raw": True,
        "stream": False,
        "options": options,
    }
    stopped = http.post("/api/generate", json=body).json()
    assert stopped["done_reason"] == "length" and stopped["eval_count"] < 64
    shifted = http.post("/api/generate", json={**body, "shift": True}).json()
    assert shifted["done_reason"] == "length" and shifted["eval_count"] == 80


def test_prompt_over_the_limit_without_truncation(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "prompt": "hi " * 600,
        "truncate": False,
        "stream": False,
        "options": {"num_ctx": 512},
    }
    message = error_of(http.post("/api/generate", json=body), 400)
    assert "prompt is" in message and "tokens" in message and "512" in message
    r = http.post(
        "/api/embed",
        json={"model": MODEL, "input": "hi " * 600, "truncate": False, "options": {"num_ctx": 512}},
    )
    message = error_of(r, 400)
    assert "tokens" in message and "512" in message


def test_oversized_body(server: LiveServer) -> None:
    # the server refuses on the Content-Length header, before reading any of the body
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        head = (
            "POST /api/generate HTTP/1.1\r\nHost: localhost\r\nX-Request-ID: big\r\n"
            f"Content-Type: application/json\r\nContent-Length: {(32 << 20) + 1}\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"model": "smollm2"')
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    assert b" 413 " in status_line, data
    assert b"x-request-id: big" in rest.lower()
    assert b'"error"' in rest and b"bytes" in rest


def test_unknown_route_and_wrong_method(http: httpx.Client) -> None:
    assert error_of(http.get("/api/nope"), 404)
    r = http.get("/api/generate")
    error_of(r, 405)
    assert "POST" in r.headers.get("allow", "")


# -- request ids -------------------------------------------------------------------------


def test_request_id_is_echoed(http: httpx.Client) -> None:
    rid = f"test-{uuid.uuid4().hex[:8]}"
    assert http.get("/api/tags", headers={"X-Request-ID": rid}).headers["x-request-id"] == rid
    r = http.post("/api/show", json={"model": "x"}, headers={"X-Request-ID": rid})
    assert r.status_code == 404 and r.headers["x-request-id"] == rid


def test_request_id_is_generated(http: httpx.Client) -> None:
    first = http.get("/api/version").headers.get("x-request-id")
    second = http.post("/api/show", json={"model": "x"}).headers.get("x-request-id")
    assert first and second and first != second


# -- the whole KV budget -----------------------------------------------------------------


def test_prompt_larger_than_the_whole_kv_budget(http: httpx.Client, tmp_path: Path) -> None:
    # measure the weights, then start a server whose memory limit leaves the KV cache only
    # its floor (16 MiB, about 700 tokens of smollm2) and send a prompt twice that long
    http.post("/api/generate", json={"model": MODEL, "prompt": ""})
    model = next(m for m in http.get("/api/ps").json()["models"] if m["name"].startswith(MODEL))
    weights = model["size"] - model["kv_bytes"]["allocated"]
    live = LiveServer(tmp_path, env={"ACCORDION_MEMORY_LIMIT": str(weights + (4 << 20))})
    try:
        with httpx.Client(base_url=live.url, timeout=120) as small:
            body = {
                "model": MODEL,
                "prompt": "The quick brown fox jumps over the lazy dog. " * 150,
                "stream": False,
                "options": {"num_ctx": 4096, "num_predict": 4},
            }
            message = error_of(small.post("/api/generate", json=body), 400)
            assert "KV memory" in message and "budget" in message
            # the server is still fine for a prompt that fits
            ok = small.post(
                "/api/generate",
                json={**body, "prompt": "Hello", "options": {"num_predict": 4}},
            )
            assert ok.status_code == 200, ok.text
    finally:
        live.stop()
    assert "Traceback" not in live.log.read_text()


def test_no_tracebacks_in_the_server_log(server: LiveServer, http: httpx.Client) -> None:
    http.get("/api/version")  # the server is still up after all of the above
    log = server.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
