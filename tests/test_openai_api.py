"""The /v1 routes against a real server, through the official `openai` client."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from live_server import LiveServer
from openai import OpenAI

pytestmark = pytest.mark.slow

MODEL = "smollm2"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_chat_answers(client: OpenAI) -> None:
    done = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=16
    )
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    choice = done.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = done.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 16
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_stream_matches_non_stream(client: OpenAI) -> None:
    args = {"model": MODEL, "messages": FRANCE, "temperature": 0, "max_tokens": 12}
    client.chat.completions.create(**args)  # warms the prefix cache for both runs below
    # bf16 logits of a prefilled prefix can differ in the last bit from a cached one, so
    # the two runs compared must both hit the cache
    whole = client.chat.completions.create(**args)
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    cached = whole.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and last.usage.prompt_tokens_details.cached_tokens == cached


def test_truncation_is_reported(client: OpenAI) -> None:
    messages = [
        {"role": "user", "content": "tell me about oranges " * 20},
        {"role": "assistant", "content": "Oranges are fruit."},
        {"role": "user", "content": "Thanks!"},
    ]
    done = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, extra_body={"num_ctx": 64}
    )
    report = done.model_extra["truncated"]
    assert report["original"] > 64 > report["kept"]
    assert report["removed"] == report["original"] - report["kept"]
    assert done.usage.prompt_tokens == report["kept"]


def test_completions(client: OpenAI) -> None:
    args = {"model": MODEL, "prompt": "The capital of France is", "temperature": 0}
    done = client.completions.create(**args, max_tokens=8)
    assert done.object == "text_completion" and "Paris" in done.choices[0].text
    assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            **args, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    # extra_body carries accordion's options; a stop string ends the text early
    short = client.completions.create(**args, max_tokens=8, stop=["."], extra_body={"top_k": 1})
    assert "." not in short.choices[0].text and short.choices[0].finish_reason == "stop"


def test_embeddings(client: OpenAI) -> None:
    texts = ["The cat sat on the mat.", "Quarterly revenue grew by four percent."]
    got = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    assert [d.index for d in got.data] == [0, 1]
    a, b = (d.embedding for d in got.data)
    assert len(a) == len(b) == 576
    assert math.isclose(math.fsum(x * x for x in a), 1.0, rel_tol=1e-3)
    assert a != b
    floats = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(a, abs=1e-6)
    assert got.usage.prompt_tokens > floats.usage.prompt_tokens > 0


def test_models(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "smollm2:latest" in ids
    assert client.models.retrieve("smollm2:latest").id == "smollm2:latest"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model:latest")


def test_client_errors(client: OpenAI) -> None:
    long = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(openai.BadRequestError, match=r"prompt is \d+ tokens .* limit is 64"):
        client.chat.completions.create(
            model=MODEL, messages=long, extra_body={"num_ctx": 64, "truncate": False}
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    with pytest.raises(openai.BadRequestError, match="n must be in"):
        client.chat.completions.create(model=MODEL, messages=FRANCE, n=17)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=FRANCE, temperature="hot")


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("chat/completions", {"messages": []}, "messages must not be empty"),
        ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ("chat/completions", {"messages": FRANCE, "max_tokens": "5"}, "max_tokens"),
        ("chat/completions", {"messages": FRANCE, "stream": "yes"}, "stream"),
        ("chat/completions", {"messages": FRANCE, "options": {"top_k": 0.5}}, "top_k"),
        ("chat/completions", {"messages": FRANCE, "tools": [{"type": "function"}]}, "tools"),
        (
            "chat/completions",
            {"messages": FRANCE, "response_format": {"type": "xml"}},
            "response_format",
        ),
        ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("completions", {"prompt": "x", "logprobs": 21}, "logprobs must be at most 20"),
        ("chat/completions", {"messages": FRANCE, "top_logprobs": 2}, "requires logprobs"),
        ("chat/completions", {"messages": FRANCE, "logit_bias": {"x": 1}}, "token ids"),
        ("chat/completions", {"messages": FRANCE, "logit_bias": {"1": 101}}, "logit_bias"),
        ("chat/completions", {"messages": FRANCE, "logit_bias": {"99999999": 1}}, "[0, 49152)"),
        ("completions", {"prompt": [1, "two", 3]}, "prompt"),
        ("embeddings", {"input": [[1, 2], 3]}, "token ids"),
        ("embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_requests_get_openai_errors(server: LiveServer, path: str, body: dict, says: str):
    r = httpx.post(f"{server.url}/v1/{path}", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
