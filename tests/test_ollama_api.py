"""Ollama's HTTP API end to end: a real server, the official `ollama` client, httpx for extras.

One server serves the whole module (tests run in file order and share its loaded
model); the eviction test starts a second one with a memory limit of its own.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import ollama
import pytest
from live_server import LiveServer

MODEL = "smollm2"
FAST = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def ps_models(http: httpx.Client) -> dict[str, dict]:
    r = http.get("/api/ps")
    assert r.status_code == 200
    return {m["name"]: m for m in r.json()["models"]}


def ps_of(http: httpx.Client, name: str = "smollm2:latest") -> dict:
    models = ps_models(http)
    assert name in models, f"{name} not loaded: {list(models)}"
    return models[name]


def wait_for(predicate, timeout: float = 5.0, every: float = 0.1) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def expires(model: dict) -> datetime:
    return datetime.fromisoformat(model["expires_at"].replace("Z", "+00:00"))


# -- model routes -----------------------------------------------------------------------


def test_list(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    assert "smollm2:latest" in models
    smol = models["smollm2:latest"]
    assert smol.size and smol.size > 0
    assert smol.digest
    assert smol.details.format == "gguf"
    assert smol.details.family == "llama"
    assert smol.details.parameter_size == "135M"


def test_show(client: ollama.Client) -> None:
    info = client.show(MODEL)
    assert info.modelfile.startswith("FROM ")
    assert "TEMPLATE" in info.modelfile
    assert "<|im_start|>" in info.template
    assert info.parameters is not None
    assert info.details.family == "llama"
    assert info.details.quantization_level
    assert info.modelinfo["general.architecture"] == "llama"
    assert info.modelinfo["llama.context_length"] == 8192
    assert info.modelinfo["llama.embedding_length"] == 576
    assert "completion" in info.capabilities


def test_show_unknown_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.show("no-such-model")
    assert e.value.status_code == 404
    assert "not found" in e.value.error


def test_create_show_copy_delete(client: ollama.Client) -> None:
    status = client.create(
        model="pirate",
        from_=MODEL,
        parameters={"temperature": 0, "num_ctx": 1024, "stop": ["<|im_end|>"]},
        system="You are a pirate.",
    )
    assert status.status == "success"
    info = client.show("pirate")
    assert f"{'temperature':<30} 0" in info.parameters.splitlines()
    assert f"{'num_ctx':<30} 1024" in info.parameters.splitlines()
    assert 'SYSTEM """You are a pirate."""' in info.modelfile
    assert "PARAMETER num_ctx 1024" in info.modelfile
    assert info.details.parent_model == MODEL
    names = {m.model for m in client.list().models}
    assert "pirate:latest" in names

    assert client.copy("pirate", "pirate-copy").status == "success"
    assert 'SYSTEM """You are a pirate."""' in client.show("pirate-copy").modelfile
    # the created model runs, with its own parameters
    reply = client.generate(model="pirate-copy", prompt="Hi", options={"num_predict": 4})
    assert reply.done

    for name in ("pirate", "pirate-copy"):
        assert client.delete(name).status == "success"
    names = {m.model for m in client.list().models}
    assert not names & {"pirate:latest", "pirate-copy:latest"}
    with pytest.raises(ollama.ResponseError) as e:
        client.show("pirate")
    assert e.value.status_code == 404


# -- generation -------------------------------------------------------------------------


def test_generate_paris(client: ollama.Client) -> None:
    reply = client.generate(
        model=MODEL,
        prompt="What is the capital of France?",
        options={"temperature": 0, "num_predict": 32},
    )
    assert "Paris" in reply.response
    assert reply.done
    assert reply.done_reason in ("stop", "length")
    assert reply.prompt_eval_count and reply.prompt_eval_count > 0
    assert reply.eval_count and reply.eval_count > 0
    assert reply.total_duration and reply.total_duration > 0


def test_generate_stream(client: ollama.Client) -> None:
    chunks = list(client.generate(model=MODEL, prompt="Count to five.", options=FAST, stream=True))
    assert len(chunks) >= 2
    assert all(not c.done for c in chunks[:-1])
    assert chunks[-1].done and chunks[-1].done_reason == "length"
    assert chunks[-1].eval_count == 8
    assert "".join(c.response for c in chunks).strip()


def test_chat(client: ollama.Client) -> None:
    reply = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        options={"temperature": 0, "num_predict": 32},
    )
    assert reply.message.role == "assistant"
    assert "Paris" in reply.message.content
    assert reply.done and reply.eval_count > 0


def test_chat_stream(client: ollama.Client) -> None:
    chunks = list(
        client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hello."}],
            options=FAST,
            stream=True,
        )
    )
    assert len(chunks) >= 2
    assert all(c.message.role == "assistant" for c in chunks)
    assert chunks[-1].done and chunks[-1].eval_count == 8
    assert "".join(c.message.content for c in chunks).strip()


def test_embed(client: ollama.Client) -> None:
    reply = client.embed(model=MODEL, input=["The sky is blue.", "Paris is in France."])
    assert len(reply.embeddings) == 2
    for vector in reply.embeddings:
        assert len(vector) == 576
        assert math.sqrt(sum(x * x for x in vector)) == pytest.approx(1.0, abs=1e-3)
    assert reply.embeddings[0] != reply.embeddings[1]
    single = client.embed(model=MODEL, input="The sky is blue.")
    assert single.embeddings[0] == pytest.approx(reply.embeddings[0], abs=1e-4)


def test_ps(client: ollama.Client, http: httpx.Client) -> None:
    client.generate(model=MODEL, prompt="Hi", options=FAST)
    models = {m.model: m for m in client.ps().models}
    smol = models["smollm2:latest"]
    assert smol.size and smol.size > 0
    assert smol.context_length == 8192
    assert smol.details.family == "llama"
    assert smol.expires_at is not None
    raw = ps_of(http)
    assert {"max", "allocated", "used", "cached"} <= raw["context"].keys()
    assert raw["kv_bytes"]["allocated"] > 0
    assert isinstance(raw["engine_id"], int)


# -- one engine, context that grows with the conversation --------------------------------


def test_num_ctx_does_not_reload(http: httpx.Client) -> None:
    def ask(num_ctx: int) -> dict:
        r = http.post(
            "/api/generate",
            json={
                "model": MODEL,
                "prompt": "Hello",
                "stream": False,
                "options": {**FAST, "num_ctx": num_ctx},
            },
        )
        assert r.status_code == 200, r.text
        return r.json()

    ask(2048)
    before = ps_of(http)["engine_id"]
    second = ask(8192)
    assert second["load_duration"] < 50_000_000  # ns
    third = ask(2048)
    assert third["load_duration"] < 50_000_000
    assert ps_of(http)["engine_id"] == before


def test_hello_chat_allocates_little(http: httpx.Client) -> None:
    r = http.post(
        "/api/chat",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "stream": False,
            "options": {"temperature": 0, "num_predict": 16},
        },
    )
    assert r.status_code == 200, r.text
    model = ps_of(http)
    ctx = model["context"]
    assert ctx["max"] == 8192
    assert model["context_length"] == 8192
    held = ctx["used"] + ctx["cached"]
    assert 0 < ctx["allocated"] <= held + 64, ctx


def long_history(turns: int = 12) -> list[dict]:
    system = {
        "role": "system",
        "content": "You are a terse assistant for a geography quiz held in a small village"
        " library every Thursday evening. Answer every question with one short sentence,"
        " name the country when you name a city, never apologise, never ask a question"
        " back, and keep every number you give rounded to the nearest ten.",
    }
    messages = [system]
    for i in range(turns):
        messages.append(
            {
                "role": "user",
                "content": f"Question {i}: tell me something about river number {i}, its"
                " length, its source in the mountains, the countries and cities it flows"
                " through, and where it finally reaches the sea.",
            }
        )
        messages.append(
            {
                "role": "assistant",
                "content": f"River number {i} rises in high mountains, flows for about"
                f" {100 + i * 37} kilometres through several countries and many cities,"
                " and reaches the sea through a wide delta.",
            }
        )
    messages.append({"role": "user", "content": "What is the capital of France?"})
    return messages


def test_truncation_keeps_system_prompt(http: httpx.Client) -> None:
    messages = long_history()
    body = {
        "model": MODEL,
        "messages": messages,
        "stream": False,
        "options": {"temperature": 0, "num_ctx": 512, "num_predict": 16},
    }
    refused = http.post("/api/chat", json={**body, "truncate": False})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert "512" in error and "tokens" in error
    original = int(error.split("prompt is ")[1].split(" tokens")[0])
    assert 800 <= original <= 1100, error  # the history is ~900 tokens

    r = http.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    report = doc["truncated"]
    assert report["original"] == original
    assert report["original"] > 512 > report["kept"] > 0
    assert report["removed"] == report["original"] - report["kept"]
    assert doc["prompt_eval_count"] + doc["prompt_cache_count"] == report["kept"]
    assert doc["message"]["content"]

    # The kept prompt began with the system message: a request of just the system
    # message and the last question finds (at least) its blocks in the prefix cache.
    short = http.post("/api/chat", json={**body, "messages": [messages[0], messages[-1]]})
    assert short.status_code == 200, short.text
    assert short.json()["prompt_cache_count"] >= 48  # the system message is ~65 tokens
    assert "truncated" not in short.json()


def test_streamed_truncation_reports_in_final_chunk(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "messages": long_history(),
        "options": {"temperature": 0, "num_ctx": 512, "num_predict": 4},
    }
    with http.stream("POST", "/api/chat", json=body) as r:
        assert r.status_code == 200
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"]
    assert lines[-1]["truncated"]["original"] > 512 > lines[-1]["truncated"]["kept"]


def test_second_turn_reuses_the_first(http: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant who answers briefly."},
        {"role": "user", "content": "Name three colours of the rainbow, please."},
    ]
    opts = {"temperature": 0, "num_predict": 24}
    first = http.post(
        "/api/chat", json={"model": MODEL, "messages": messages, "stream": False, "options": opts}
    ).json()
    turn1 = first["prompt_eval_count"] + first["prompt_cache_count"]
    messages += [first["message"], {"role": "user", "content": "And two more?"}]
    second = http.post(
        "/api/chat", json={"model": MODEL, "messages": messages, "stream": False, "options": opts}
    ).json()
    assert second["prompt_cache_count"] >= turn1 - 16, (first, second)


# -- keep_alive and eviction ------------------------------------------------------------


def test_keep_alive_zero_unloads(client: ollama.Client, http: httpx.Client) -> None:
    client.generate(model=MODEL, prompt="Hi", options=FAST, keep_alive=0)
    assert "smollm2:latest" not in ps_models(http)


def test_keep_alive_one_second(client: ollama.Client, http: httpx.Client) -> None:
    client.generate(model=MODEL, prompt="Hi", options=FAST, keep_alive="1s")
    start = time.monotonic()
    assert wait_for(lambda: "smollm2:latest" not in ps_models(http), timeout=5)
    assert time.monotonic() - start >= 0.5  # not unloaded at once


def test_request_without_keep_alive_keeps_the_loaded_value(
    client: ollama.Client, http: httpx.Client
) -> None:
    client.generate(model=MODEL, prompt="", keep_alive=-1)  # load only
    assert expires(ps_of(http)).year >= 2099
    client.generate(model=MODEL, prompt="Hi", options=FAST)
    assert expires(ps_of(http)).year >= 2099  # still forever, not the default 5m
    client.generate(model=MODEL, prompt="Hi", options=FAST, keep_alive="5m")
    left = (expires(ps_of(http)) - datetime.now(UTC)).total_seconds()
    assert 240 < left <= 301
    client.generate(model=MODEL, prompt="Hi", options=FAST)
    left = (expires(ps_of(http)) - datetime.now(UTC)).total_seconds()
    assert 240 < left <= 301


def test_load_and_unload_without_prompt(client: ollama.Client, http: httpx.Client) -> None:
    loaded = client.generate(model=MODEL, prompt="")
    assert loaded.done and loaded.done_reason == "load"
    unloaded = client.generate(model=MODEL, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert "smollm2:latest" not in ps_models(http)


# -- clients that go away ----------------------------------------------------------------


def test_fifty_disconnects_leave_no_used_blocks(server: LiveServer, http: httpx.Client) -> None:
    http.post("/api/generate", json={"model": MODEL, "prompt": "", "keep_alive": "5m"})
    started = threading.Barrier(50, timeout=60)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            body = {
                "model": MODEL,
                "prompt": f"Write a long story about dragon number {i}.",
                "options": {"temperature": 0.8, "num_predict": 1000},
            }
            with (
                httpx.Client(base_url=server.url, timeout=120) as c,
                c.stream("POST", "/api/generate", json=body) as r,
            ):
                assert r.status_code == 200
                lines = r.iter_lines()
                next(lines)
                started.wait()
                next(lines)
            # leaving the block closes the connection mid-stream
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]

    def idle() -> bool:
        model = ps_of(http)
        return model["context"]["used"] == 0 and model["active"] == 0

    assert wait_for(idle, timeout=15, every=0.25), ps_of(http)
    reply = http.post(
        "/api/generate",
        json={
            "model": MODEL,
            "prompt": "What is the capital of France?",
            "stream": False,
            "options": {"temperature": 0, "num_predict": 32},
        },
    )
    assert reply.status_code == 200
    assert "Paris" in reply.json()["response"]


# -- two models, one memory budget ------------------------------------------------------


@pytest.mark.slow
def test_loading_a_second_model_evicts_the_idle_first(
    client: ollama.Client, http: httpx.Client, tmp_path: Path
) -> None:
    # measure both models' weights on the shared server, then give a new server room for one
    client.generate(model=MODEL, prompt="", keep_alive="5m")
    client.generate(model="gemma3", prompt="", keep_alive="5m")
    weights = {}
    for name, model in ps_models(http).items():
        weights[name] = model["size"] - model["kv_bytes"]["allocated"]
    client.generate(model="gemma3", prompt="", keep_alive=0)
    smol, gemma = weights["smollm2:latest"], weights["gemma3:latest"]
    limit = max(smol, gemma) + (48 << 20)  # one model plus some KV, never both
    assert smol + gemma > limit

    live = LiveServer(tmp_path, env={"ACCORDION_MEMORY_LIMIT": str(limit)})
    try:
        other = ollama.Client(host=live.url, timeout=120)
        other.generate(model=MODEL, prompt="Hi", options=FAST)
        assert [m.model for m in other.ps().models] == ["smollm2:latest"]
        reply = other.generate(model="gemma3", prompt="The capital of France is", options=FAST)
        assert reply.response
        assert [m.model for m in other.ps().models] == ["gemma3:latest"]
    finally:
        live.stop()
