"""What clients send is honoured or refused by name: Ollama's context, blobs, think, show;
OpenAI's token-id inputs and error codes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from live_server import LiveServer
from tiny_gguf import TinySpec, write_tiny

from accordion.loader.bundled import resolve_model_path
from accordion.loader.gguf_file import open_gguf
from accordion.loader.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

MODEL = "smollm2"
GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(resolve_model_path(MODEL)))


def test_generate_returns_context_and_continues_from_it(ollama_client: ollama.Client) -> None:
    first = ollama_client.generate(MODEL, prompt="My name is Ada. Say hi.", options=GREEDY)
    assert first.context and len(first.context) > first.eval_count
    second = ollama_client.generate(
        MODEL, prompt="What is my name?", context=first.context, options=GREEDY
    )
    assert second.context[: len(first.context)] == first.context  # the conversation grows
    assert len(second.context) > len(first.context) + second.eval_count
    raw = ollama_client.generate(MODEL, prompt="Hello", raw=True, options=GREEDY)
    assert not raw.context  # as Ollama: no context in raw mode


def test_context_continuation_renders_one_more_turn(
    server: LiveServer, tokenizer: Tokenizer
) -> None:
    r = httpx.post(
        server.url + "/api/generate",
        json={"model": MODEL, "prompt": "Hi", "stream": False, "options": GREEDY},
        timeout=60,
    )
    context = r.json()["context"]
    follow = httpx.post(
        server.url + "/api/generate",
        json={
            "model": MODEL,
            "prompt": "Again",
            "context": context,
            "stream": False,
            "options": {**GREEDY, "num_predict": 1},
        },
        timeout=60,
    ).json()["context"]
    added = tokenizer.decode(follow[len(context) :])
    # the reply's closing tag, the turn, the next reply's opening
    assert added.startswith(
        "<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "system" not in added  # the template's default system prompt is not repeated
    bad = httpx.post(
        server.url + "/api/generate",
        json={"model": MODEL, "prompt": "x", "context": [10**9], "stream": False},
        timeout=60,
    )
    assert bad.status_code == 400 and "context must be token ids" in bad.json()["error"]


@pytest.mark.parametrize(
    ("route", "extra", "says"),
    [
        ("/api/chat", {"think": True}, "does not support thinking"),
        ("/api/generate", {"think": True}, "does not support thinking"),
        ("/api/generate", {"template": "{{ if .Prompt }}"}, "template"),
        ("/api/create", {"from": MODEL, "quantize": "q4_K_M"}, "quantize"),
        ("/api/create", {"from": MODEL, "adapters": {"a.gguf": "sha256:" + "0" * 64}}, "adapters"),
        ("/api/create", {"files": {"m.gguf": "sha256:" + "0" * 64}}, "never uploaded"),
        ("/api/generate", {"options": {"mirostat": 2}}, "mirostat=2 is not supported"),
        ("/api/generate", {"options": {"typical_p": 0.5}}, "typical_p=0.5 is not supported"),
        ("/api/generate", {"options": {"tfs_z": 0.9}}, "tfs_z=0.9 is not supported"),
    ],
)
def test_fields_we_do_not_honour_are_400s(
    server: LiveServer, route: str, extra: dict, says: str
) -> None:
    body = {"model": MODEL if route != "/api/create" else "made", "stream": False, **extra}
    if route == "/api/chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
    elif route == "/api/generate":
        body["prompt"] = "hi"
    r = httpx.post(server.url + route, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]


def test_think_false_is_fine(ollama_client: ollama.Client) -> None:
    assert ollama_client.chat(MODEL, messages=[{"role": "user", "content": "hi"}], think=False).done


def test_show_formats_parameters_as_ollama_and_lists_embedding(
    ollama_client: ollama.Client,
) -> None:
    ollama_client.create(
        model="quoted", from_=MODEL, parameters={"stop": ["\n\n", "User:"], "top_k": 5}
    )
    info = ollama_client.show("quoted")
    assert "embedding" in info.capabilities and "completion" in info.capabilities
    lines = info.parameters.splitlines()
    assert f"{'stop':<30} " + '"\\n\\n"' in lines and f"{'stop':<30} " + '"User:"' in lines
    assert f"{'top_k':<30} 5" in lines
    ollama_client.delete("quoted")


def test_blobs_and_create_from_files(
    server: LiveServer, ollama_client: ollama.Client, tmp_path: Path
) -> None:
    path = write_tiny(tmp_path / "tiny.gguf", TinySpec())
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    base = server.url
    assert httpx.head(f"{base}/api/blobs/{digest}").status_code == 404
    assert ollama_client.create_blob(path) == digest
    assert httpx.head(f"{base}/api/blobs/{digest}").status_code == 200
    assert ollama_client.create(model="from-blob", files={"tiny.gguf": digest}).status == "success"
    reply = ollama_client.generate("from-blob", prompt="abc", options={"num_predict": 3})
    assert reply.done and reply.eval_count == 3
    ollama_client.delete("from-blob")
    wrong = "sha256:" + "1" * 64
    r = httpx.post(f"{base}/api/blobs/{wrong}", content=path.read_bytes())
    assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
    assert httpx.head(f"{base}/api/blobs/{wrong}").status_code == 404  # nothing kept


def test_openai_token_id_inputs(openai_client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    text = "The capital of France is"
    ids = tokenizer.encode(text, add_bos=False)
    by_text = openai_client.completions.create(
        model=MODEL, prompt=text, max_tokens=6, temperature=0
    )
    by_ids = openai_client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    echoed = openai_client.completions.create(model=MODEL, prompt=[ids], max_tokens=0, echo=True)
    assert echoed.choices[0].text == text
    vectors = openai_client.embeddings.create(
        model=MODEL, input=[text, ids], encoding_format="float"
    )
    a, b = (d.embedding for d in vectors.data)
    assert a == pytest.approx(b, abs=1e-5)


def test_openai_404_codes_tell_a_route_from_a_model(server: LiveServer) -> None:
    r = httpx.post(server.url + "/v1/no-such-route", json={}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


GO_CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def test_a_created_model_renders_through_its_go_template(
    server: LiveServer, ollama_client: ollama.Client, tokenizer: Tokenizer
) -> None:
    assert (
        ollama_client.create(model="go-chatml", from_=MODEL, template=GO_CHATML).status == "success"
    )
    messages = [{"role": "user", "content": "Name a colour."}]
    r = httpx.post(
        server.url + "/api/chat",
        json={"model": "go-chatml", "messages": messages, "stream": False, "options": GREEDY},
        timeout=60,
    ).json()
    expected = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert r["prompt_eval_count"] + r["prompt_cache_count"] == len(tokenizer.encode(expected))
    # generate shows the rendered prompt: its context starts with the prompt's ids
    done = ollama_client.generate("go-chatml", prompt="Name a colour.", options=GREEDY)
    assert tokenizer.decode(done.context[: len(done.context) - done.eval_count]) == expected
    ollama_client.delete("go-chatml")


def test_a_per_request_template_renders_the_prompt(
    ollama_client: ollama.Client, tokenizer: Tokenizer
) -> None:
    done = ollama_client.generate(
        MODEL, prompt="2+2", template="Q: {{ .Prompt }}\nA:", options={"num_predict": 2}
    )
    assert tokenizer.decode(done.context[: len(done.context) - done.eval_count]) == "Q: 2+2\nA:"
