"""The offline API end to end on the bundled SmolLM2, and errors on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_gguf import TinySpec, write_tiny

from accordion import LLM, SamplingParams
from accordion.errors import InvalidModelFileError, ModelNotFoundError, UnsupportedModelError
from accordion.loader.model import load_model

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2")


def test_greedy_chat_answers_paris(llm: LLM) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=64))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.text


def test_stream_pieces_join_to_the_batch_text(llm: LLM) -> None:
    prompt = [{"role": "user", "content": "Name three colours."}]
    pieces = list(llm.stream(prompt, GREEDY))
    assert len(pieces) > 3
    assert "".join(pieces) == llm.chat(prompt, GREEDY)[0].text


def test_batch_of_prompts_equals_each_alone() -> None:
    # fp32: the bf16 fast path batches with other kernels, so near-ties may flip there
    exact = LLM("smollm2", weights="fp32")
    prompts = ["The sun is", "One, two, three,", "def add(a, b):"]
    together = exact.generate(prompts, GREEDY)
    alone = [exact.generate(p, GREEDY)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_max_tokens_and_length_reason(llm: LLM) -> None:
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=5))[0]
    assert len(out.token_ids) == 5
    assert out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stop_string_is_cut_and_not_leaked(llm: LLM) -> None:
    free = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=12))[0]
    assert " 7" in free.text
    stopped = llm.generate(
        "1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=12, stop=[" 7"])
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(" 7")]


def test_same_seed_same_text(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1234, max_tokens=16)
    a = llm.generate("My favourite animal is", params)[0]
    b = llm.generate(["Hello", "My favourite animal is"], params)[1]  # batched with another
    assert a.token_ids == b.token_ids


def test_unknown_model_name() -> None:
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        load_model("no-such-model")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model\n" * 10)
    with pytest.raises(InvalidModelFileError, match="not a GGUF file"):
        load_model(str(bad))


def test_truncated_gguf(tmp_path: Path) -> None:
    whole = write_tiny(tmp_path / "whole.gguf", TinySpec()).read_bytes()
    for cut in (len(whole) // 2, 40):  # inside the tensor data, inside the header
        part = tmp_path / f"cut{cut}.gguf"
        part.write_bytes(whole[:cut])
        with pytest.raises(InvalidModelFileError, match="GGUF"):
            load_model(str(part))


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_tiny(tmp_path / "bert.gguf", TinySpec(arch="bert"))
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported"):
        load_model(str(path))


def test_bad_weights_mode() -> None:
    with pytest.raises(ValueError, match="weights must be one of"):
        load_model("smollm2", weights="int3")
