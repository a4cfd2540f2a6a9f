"""logprobs, n, echo, logit_bias and ignore_eos through a real server and the official clients."""

from __future__ import annotations

import math
import re
import uuid

import httpx
import ollama
import openai
import pytest
from live_server import LiveServer

from accordion.loader.bundled import resolve_model_path
from accordion.loader.gguf_file import open_gguf
from accordion.loader.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

MODEL = "smollm2"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def metric(server: LiveServer, kind: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    pattern = rf'^accordion_tokens_total{{kind="{kind}",model="{MODEL}(?::latest)?"}} (\S+)$'
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def test_chat_logprobs_with_top_alternatives(openai_client: openai.OpenAI) -> None:
    done = openai_client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    choice = done.choices[0]
    content = choice.logprobs.content
    assert len(content) == done.usage.completion_tokens
    assert "".join(e.token for e in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely
        assert bytes(entry.bytes).decode() == entry.token
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)


def test_streamed_chat_logprobs_equal_the_whole_ones(openai_client: openai.OpenAI) -> None:
    args = {"model": MODEL, "messages": FRANCE, "temperature": 0, "max_tokens": 8}
    whole = openai_client.chat.completions.create(**args, logprobs=True).choices[0].logprobs.content
    chunks = list(openai_client.chat.completions.create(**args, logprobs=True, stream=True))
    pieces = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    streamed = [e for piece in pieces for e in piece.content]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-4)


def test_legacy_completion_logprobs(openai_client: openai.OpenAI) -> None:
    done = openai_client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == done.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_echo_with_logprobs_and_no_tokens_scores_the_prompt(openai_client: openai.OpenAI) -> None:
    prompt = "The capital of France is Paris"
    done = openai_client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = done.choices[0]
    lp = choice.logprobs
    assert choice.text == prompt and "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before it
    assert all(v <= 0 and math.isfinite(v) for v in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == prompt.rindex(lp.tokens[-1])
    # The next token's logprob when decoding equals its score when the text is echoed.
    more = openai_client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, logprobs=0, temperature=0
    )
    token = more.choices[0].text
    extended = openai_client.completions.create(
        model=MODEL, prompt=prompt + token, max_tokens=0, echo=True, logprobs=0
    )
    assert extended.choices[0].logprobs.tokens[-1] == token
    assert extended.choices[0].logprobs.token_logprobs[-1] == pytest.approx(
        more.choices[0].logprobs.token_logprobs[0], abs=1e-3
    )


def test_n_choices_share_one_prompt_evaluation(
    server: LiveServer, openai_client: openai.OpenAI
) -> None:
    words = " ".join(uuid.uuid4().hex for _ in range(40))  # nothing cached can match it
    messages = [{"role": "user", "content": f"Repeat after me: {words}"}]
    prompt0, cached0 = metric(server, "prompt"), metric(server, "cached")
    done = openai_client.chat.completions.create(
        model=MODEL, messages=messages, n=3, temperature=1.0, seed=11, max_tokens=6
    )
    assert [c.index for c in done.choices] == [0, 1, 2]
    evaluated = (metric(server, "prompt") - prompt0) - (metric(server, "cached") - cached0)
    prompt = done.usage.prompt_tokens
    # the prompt once (less the template's cached head); choices 1 and 2 their last block
    assert prompt / 2 < evaluated <= prompt + 2 * 16
    assert 3 <= done.usage.completion_tokens <= 3 * 6  # every choice's tokens
    again = openai_client.chat.completions.create(
        model=MODEL, messages=messages, n=3, temperature=1.0, seed=11, max_tokens=6
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in done.choices]
    assert len({c.message.content for c in done.choices}) > 1  # seed + i per choice


def test_n_choices_stream_interleaved(openai_client: openai.OpenAI) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            model=MODEL, messages=FRANCE, n=2, temperature=0.8, seed=3, max_tokens=8, stream=True
        )
    )
    texts = {0: "", 1: ""}
    finished = set()
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and all(texts.values())
    whole = openai_client.chat.completions.create(
        model=MODEL, messages=FRANCE, n=2, temperature=0.8, seed=3, max_tokens=8
    )
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]


def test_ignore_eos_runs_to_max_tokens(openai_client: openai.OpenAI) -> None:
    done = openai_client.completions.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=40,
        temperature=0,
        extra_body={"ignore_eos": True, "stop": None},
    )
    assert done.usage.completion_tokens == 40 and done.choices[0].finish_reason == "length"


def test_logit_bias_bans_the_greedy_token(openai_client: openai.OpenAI) -> None:
    args = {"model": MODEL, "messages": FRANCE, "temperature": 0, "max_tokens": 4}
    first = (
        openai_client.chat.completions.create(**args, logprobs=True).choices[0].logprobs.content[0]
    )
    tokenizer = Tokenizer.from_gguf(open_gguf(resolve_model_path(MODEL)))
    (token_id,) = tokenizer.encode(first.token, add_bos=False)
    banned = openai_client.chat.completions.create(
        **args, logprobs=True, top_logprobs=5, logit_bias={str(token_id): -100}
    )
    entry = banned.choices[0].logprobs.content[0]
    assert entry.token != first.token
    assert first.token not in [t.token for t in entry.top_logprobs]  # -inf: not listed


def test_ollama_logprobs(server: LiveServer, ollama_client: ollama.Client) -> None:
    reply = ollama_client.chat(
        MODEL,
        messages=FRANCE,
        logprobs=True,
        top_logprobs=2,
        options={"temperature": 0, "num_predict": 8},
    )
    assert len(reply.logprobs) == reply.eval_count
    assert "".join(e.token for e in reply.logprobs) == reply.message.content
    assert all(len(e.top_logprobs) == 2 for e in reply.logprobs)
    chunks = list(
        ollama_client.generate(
            MODEL,
            prompt="The capital of France is",
            logprobs=True,
            stream=True,
            options={"temperature": 0, "num_predict": 6},
        )
    )
    streamed = [e for c in chunks for e in (c.logprobs or [])]
    assert len(streamed) == chunks[-1].eval_count
    assert "".join(e.token for e in streamed) == "".join(c.response for c in chunks)
    r = httpx.post(
        server.url + "/api/chat",
        json={"model": MODEL, "messages": FRANCE, "top_logprobs": 2, "stream": False},
        timeout=60,
    )
    assert r.status_code == 400 and "requires logprobs" in r.json()["error"]
