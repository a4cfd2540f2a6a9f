"""A request's tokens are a function of the request alone (docs: DESIGN.md promise 8).

Greedy and seeded runs of the bundled models, in the default weights mode, give
the same tokens alone, in a batch of 16, with prefill cut in chunks of 16 or
512, with the prompt's prefix served from the cache, and after a preemption
that recomputes them. Every step computes a token the same way (one matrix
kernel, one attention kernel, both per row), so these are exact equalities.
"""

from __future__ import annotations

import pytest

from accordion.llm import LLM
from accordion.sampling_params import SamplingParams

TOKENS = 64
GREEDY = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
TOPICS = [
    "the water cycle", "how a bicycle gear works", "why the sky is blue", "the rules of chess",
    "baking sourdough bread", "the history of the printing press", "how vaccines train the body",
    "what a prime number is", "the life of a honeybee", "how to tie a bowline knot",
    "the causes of ocean tides", "how a refrigerator keeps food cold", "the plot of Hamlet",
    "how compound interest grows", "why leaves change colour", "how a compiler works",
]  # fmt: skip
SYSTEM = "You are a patient teacher. Answer in plain words, with one example."


def chats() -> list[list[dict]]:
    """16 varied chats; the shared system prompt gives the prefix cache something to reuse."""
    out = []
    for i, topic in enumerate(TOPICS):
        turn = f"Explain {topic}." if i % 2 else f"In three sentences, tell me about {topic}."
        out.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": turn}])
    return out


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    outs = llm.generate_ids(prompts, params)
    assert all(o.error is None for o in outs)
    return [o.token_ids for o in outs]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_greedy_tokens_depend_on_the_request_alone(name: str) -> None:
    with LLM(name) as llm:
        prompts = [llm.encode_chat(c) for c in chats()]
        alone = [run(llm, [p], GREEDY)[0] for p in prompts]
        assert len({tuple(a) for a in alone}) > 8  # varied prompts, varied answers
        together = run(llm, prompts, GREEDY)  # the prefixes are cached by now
        assert together == alone
        cached = llm.generate_ids(prompts[:4], GREEDY)
        assert all(o.cached_tokens > 0 for o in cached)
        assert [o.token_ids for o in cached] == alone[:4]
    for num_batch in (16, 512):  # fresh engines: cold caches, prefill cut differently
        with LLM(name, num_batch=num_batch) as llm:
            assert run(llm, prompts, GREEDY) == alone, f"num_batch {num_batch}"
    # room for about three sequences: the other thirteen wait, and some are preempted
    # and recomputed with the tokens they had emitted
    per_token = llm.engine.kv.bytes_per_token
    budget = 3 * (max(map(len, prompts)) + TOKENS) * per_token
    with LLM(name, kv_budget_bytes=budget, segment_tokens=16, warm_tokens=16) as llm:
        outs = llm.generate_ids(prompts, GREEDY)
        assert sum(o.preemptions for o in outs) > 0
        assert [o.token_ids for o in outs] == alone


@pytest.mark.slow
def test_seeded_sampling_is_the_same_alone_and_batched() -> None:
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=TOKENS, ignore_eos=True)
    with LLM("smollm2") as llm:
        prompts = [llm.encode_chat(c) for c in chats()[:8]]
        alone = [run(llm, [p], params)[0] for p in prompts]
        assert run(llm, prompts, params) == alone
        greedy = run(
            llm, prompts, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
        )
        assert greedy != alone  # the seed, not greedy decoding, made them agree
