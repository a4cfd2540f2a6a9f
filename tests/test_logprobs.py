"""Logprobs, logit_bias and prompt scoring in the engine, against a reference forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import contiguous_logits

from accordion import LLM, SamplingParams
from accordion.engine.score import prompt_logprobs
from accordion.errors import InvalidRequestError

PROMPT = [7, 40, 41, 42, 100, 101, 9]


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir: Path) -> LLM:
    return LLM(str(tiny_dir / "llama.gguf"), "fp32", kv_budget_bytes=64 << 20)


def reference(llm: LLM, ids: list[int], bias: dict[int, float] | None = None) -> torch.Tensor:
    """log_softmax of the next-token logits after `ids`, recomputed from scratch."""
    logits = contiguous_logits(llm.model.decoder, llm.model.config, ids)[-1].clone()
    for token, b in (bias or {}).items():
        logits[token] += b
    return torch.log_softmax(logits, dim=-1)


def test_logprobs_are_log_softmax_of_the_logits_the_sampler_saw(tiny_llm: LLM) -> None:
    params = SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, repeat_penalty=1.0, logprobs=5
    )
    out = tiny_llm.submit(PROMPT, params).result()
    assert len(out.logprobs) == len(out.token_ids) == 6
    ids = list(PROMPT)
    for token, lp in zip(out.token_ids, out.logprobs, strict=True):
        ref = reference(tiny_llm, ids)
        assert lp.token == token
        assert lp.logprob == pytest.approx(float(ref[token]), abs=1e-4)
        best = torch.topk(ref, 5)
        assert [t for t, _ in lp.top] == best.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert lp.top[0][0] == token  # greedy picks the most likely
        ids.append(token)


def test_logit_bias_shifts_the_distribution_and_minus_100_bans(tiny_llm: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repeat_penalty=1.0)
    first = tiny_llm.submit(PROMPT, free).result().token_ids
    banned = first[0]
    bias = {banned: -100.0, 33: 2.5}
    biased = SamplingParams(
        temperature=0,
        max_tokens=8,
        ignore_eos=True,
        repeat_penalty=1.0,
        logit_bias=bias,
        logprobs=3,
    )
    out = tiny_llm.submit(PROMPT, biased).result()
    assert banned not in out.token_ids  # never chosen, at any position
    ref = reference(tiny_llm, PROMPT, {33: 2.5, banned: -float("inf")})
    assert out.logprobs[0].logprob == pytest.approx(float(ref[out.token_ids[0]]), abs=1e-4)
    assert all(t != banned for t, _ in out.logprobs[0].top)


def test_logit_bias_outside_the_vocabulary_or_range_is_refused(tiny_llm: LLM) -> None:
    vocab = tiny_llm.model.config.vocab_size
    with pytest.raises(InvalidRequestError, match="logit_bias keys"):
        tiny_llm.submit(PROMPT, SamplingParams(logit_bias={vocab: 1.0}))
    with pytest.raises(ValueError, match="logit_bias values"):
        SamplingParams(logit_bias={1: 150.0})
    with pytest.raises(ValueError, match="top logprobs"):
        SamplingParams(logprobs=21)


def test_prompt_logprobs_equal_a_teacher_forced_pass(tiny_llm: LLM) -> None:
    ids = [3, 17, 99, 4, 250, 61, 12, 8, 77, 5] * 30  # 300 tokens: the head runs in chunks
    scored = prompt_logprobs(tiny_llm.model.decoder, ids, 2)
    assert len(scored) == len(ids) - 1
    logits = contiguous_logits(tiny_llm.model.decoder, tiny_llm.model.config, ids)
    ref = torch.log_softmax(logits, dim=-1)
    for i, lp in enumerate(scored):
        assert lp.token == ids[i + 1]
        assert lp.logprob == pytest.approx(float(ref[i, ids[i + 1]]), abs=1e-4)
        assert [t for t, _ in lp.top] == torch.topk(ref[i], 2).indices.tolist()


def test_decode_logprobs_agree_with_scoring_the_same_text(tiny_llm: LLM) -> None:
    """The engine's logprob of a generated token (cached prefix, decode step) is the
    teacher-forced logprob of that token after the prompt."""
    params = SamplingParams(
        temperature=0.9, seed=4, max_tokens=5, ignore_eos=True, repeat_penalty=1.0, logprobs=0
    )
    out = tiny_llm.submit(PROMPT, params).result()
    scored = prompt_logprobs(tiny_llm.model.decoder, PROMPT + out.token_ids, 0)
    tail = scored[len(PROMPT) - 1 :]
    assert [lp.token for lp in tail] == out.token_ids
    for lp, ref in zip(out.logprobs, tail, strict=True):
        assert lp.logprob == pytest.approx(ref.logprob, abs=1e-4)
