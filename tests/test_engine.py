"""The elastic engine: equivalence under pressure, growth, shrink, prefix sharing, limits."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import contiguous_logits

from accordion import LLM, SamplingParams
from accordion.engine.engine import Engine, EngineConfig
from accordion.errors import InvalidRequestError, RequestTooLargeError
from accordion.loader.model import LoadedModel, load_model

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repeat_penalty=1.0)


def tiny(tiny_dir: Path, arch: str) -> LoadedModel:
    return load_model(str(tiny_dir / f"{arch}.gguf"), "fp32")


def engine(model: LoadedModel, budget_tokens: int, **kw: int | float) -> Engine:
    per_token = model.config.n_layers * model.config.n_kv_heads * model.config.head_dim * 4 * 2
    return Engine(model, EngineConfig(kv_budget_bytes=budget_tokens * per_token, **kw))  # type: ignore[arg-type]


def solo_greedy(model: LoadedModel, ids: list[int], n: int) -> list[int]:
    """Greedy continuation recomputed from scratch over one contiguous cache each step."""
    ids, out = list(ids), []
    for _ in range(n):
        token = int(contiguous_logits(model.decoder, model.config, ids)[-1].argmax())
        ids.append(token)
        out.append(token)
    return out


def prompts_with_shared_prefixes(seed: int, count: int, vocab: int = 256) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(40)]
    out = []
    for i in range(count):
        head = system if i % 3 else system[:20]  # two shared prefixes of different lengths
        out.append(head + [rng.randrange(vocab) for _ in range(rng.randrange(5, 45))])
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_twelve_concurrent_requests_under_a_two_sequence_budget_match_solo(
    tiny_dir: Path, arch: str
) -> None:
    model = tiny(tiny_dir, arch)
    prompts = prompts_with_shared_prefixes(7, 12)
    eng = engine(model, budget_tokens=200, segment_tokens=32, warm_tokens=32)
    handles = [eng.submit(p, GREEDY) for p in prompts]
    outs = [h.result() for h in handles]
    assert all(o.error is None and o.finish_reason == "length" for o in outs)
    assert [o.token_ids for o in outs] == [solo_greedy(model, p, 10) for p in prompts]
    assert sum(o.preemptions for o in outs) > 0  # the budget forced preemption
    assert sum(o.cached_tokens for o in outs) > 0  # and prefixes were shared
    stats = eng.kv_stats()
    assert stats["allocated_bytes"] <= stats["budget_bytes"]
    assert stats["used_bytes"] == 0  # every block went back


def test_a_fresh_engine_holds_only_its_warm_floor(tiny_dir: Path) -> None:
    eng = engine(tiny(tiny_dir, "llama"), budget_tokens=4096, segment_tokens=64, warm_tokens=64)
    stats = eng.kv_stats()
    assert stats["allocated_tokens"] == 64
    assert stats["used_tokens"] == 0


def test_idle_engine_shrinks_back_to_the_warm_floor(tiny_dir: Path) -> None:
    eng = engine(tiny(tiny_dir, "llama"), budget_tokens=4096, idle_shrink_s=0.2)
    floor = eng.kv_stats()["allocated_bytes"]
    long = [random.Random(i).randrange(256) for i in range(600)]
    eng.submit(long, GREEDY).result()
    assert eng.kv_stats()["allocated_bytes"] > floor  # it grew with the request
    loop = threading.Thread(target=eng.run_loop, daemon=True)
    loop.start()
    deadline = time.monotonic() + 10
    while eng.kv_stats()["allocated_bytes"] > floor and time.monotonic() < deadline:
        time.sleep(0.05)
    eng.stop()
    loop.join()
    assert eng.kv_stats()["allocated_bytes"] == floor


def test_request_larger_than_the_budget_fails_fast_and_others_still_run(tiny_dir: Path) -> None:
    model = tiny(tiny_dir, "llama")
    eng = engine(model, budget_tokens=128, segment_tokens=32, warm_tokens=32)
    big = eng.submit(list(range(200)), GREEDY)
    small = eng.submit(list(range(30)), GREEDY)
    out = big.result()
    assert out.finish_reason == "error"
    assert isinstance(out.error, RequestTooLargeError)
    assert out.error.tokens > out.error.budget_tokens
    assert small.result().token_ids == solo_greedy(model, list(range(30)), 10)


def test_cancel_frees_the_sequence_at_the_next_step(tiny_dir: Path) -> None:
    eng = engine(tiny(tiny_dir, "llama"), budget_tokens=4096)
    handle = eng.submit(list(range(50)), SamplingParams(temperature=0, max_tokens=1000))
    for _ in range(3):
        eng.step()
    assert eng.kv_stats()["used_tokens"] > 0
    handle.cancel()
    eng.step()
    out = handle.result()
    assert out.finish_reason == "cancelled"
    assert eng.kv_stats()["used_tokens"] == 0


def test_shared_system_prompt_is_evaluated_once_for_twenty_requests(tiny_dir: Path) -> None:
    eng = engine(tiny(tiny_dir, "llama"), budget_tokens=8192)
    rng = random.Random(3)
    system = [rng.randrange(256) for _ in range(1000)]
    prompts = [system + [rng.randrange(256) for _ in range(8)] for _ in range(20)]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    outs = [h.result() for h in [eng.submit(p, params) for p in prompts]]
    prefill = sum(o.evaluated_tokens - (len(o.token_ids) - 1) for o in outs)
    # the 1,000 shared tokens once (to the last full block), then only each request's tail
    assert prefill <= 1000 + 20 * (8 + 16)
    assert sum(o.cached_tokens for o in outs) >= 19 * (1000 - 16)


@pytest.fixture(scope="module")
def smollm2() -> LLM:
    return LLM("smollm2")


def test_prompt_ids_outside_the_vocabulary_are_refused_at_submit(smollm2: LLM) -> None:
    """Token ids given as the prompt (the offline API, batch lines) are checked when
    submitted: an id past the vocabulary or a negative one (which an array lookup would
    wrap around to another token) is the caller's error, before any step runs."""
    vocab = smollm2.model.config.vocab_size
    for bad in ([1, vocab], [-1, 5]):
        with pytest.raises(InvalidRequestError, match=r"prompt token ids must be in \[0, "):
            smollm2.submit(bad)
    assert not smollm2.engine.has_work()
    edge = smollm2.submit([1, vocab - 1], SamplingParams(max_tokens=1)).result()
    assert edge.error is None and edge.finish_reason in ("stop", "length")


def test_turn_two_evaluates_only_what_follows_the_cached_prefix(smollm2: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=30)
    turn1 = [{"role": "user", "content": "Give me three facts about the Moon."}]
    first = smollm2.chat(turn1, params)[0]
    turn2 = turn1 + [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And one about Mars?"},
    ]
    second = smollm2.chat(turn2, params)[0]
    assert second.cached_tokens >= first.prompt_tokens - 16
    prompt_evaluated = second.evaluated_tokens - max(0, len(second.token_ids) - 1)
    assert prompt_evaluated == second.prompt_tokens - second.cached_tokens


def test_hello_holds_at_most_two_blocks_beyond_its_tokens(smollm2: LLM) -> None:
    eng = smollm2.engine
    handle = smollm2.submit([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=3))
    held = []
    while handle.seq.finish_reason is None:
        eng.step()
        if handle.seq.opened:
            stats = eng.kv_stats()
            held.append((stats["groups"][0]["used_blocks"], handle.seq.num_computed))
    handle.result()
    assert held
    for blocks, tokens in held:
        assert blocks <= -(-tokens // 16) + 2


@pytest.mark.slow
def test_six_thousand_token_conversation_grows_without_a_context_setting(smollm2: LLM) -> None:
    text = (Path(__file__).parent / "data" / "prose.txt").read_text()
    ids = smollm2.tokenizer.encode(text * 8)[:6000]
    before = smollm2.kv_stats()["allocated_tokens"]
    out = smollm2.generate_ids([ids], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.error is None and len(out.token_ids) > 0
    assert before < 6000 <= smollm2.kv_stats()["allocated_tokens"]


@pytest.mark.slow
def test_gemma3_window_layers_stay_bounded_by_the_window() -> None:
    with LLM("gemma3") as llm:
        eng = llm.engine
        window_groups = [i for i, g in enumerate(eng.kv.groups) if g.window]
        assert window_groups and eng.kv.groups[window_groups[0]].window == 512
        text = (Path(__file__).parent / "data" / "prose.txt").read_text()
        ids = llm.tokenizer.encode(text * 6)[:4000]
        handle = eng.submit(ids, SamplingParams(temperature=0, max_tokens=4))
        largest = 0
        while handle.seq.finish_reason is None:
            eng.step()
            if handle.seq.opened:
                for gi in window_groups:
                    largest = max(largest, len(eng.kv.seqs[handle.id].tables[gi]))
        assert handle.result().error is None
        assert 0 < largest <= 512 // 16 + 2
        full = eng.kv.stats()["groups"][0]
        assert full["window"] == 0 and full["allocated_blocks"] >= 4000 // 16


def test_same_seed_same_tokens_alone_or_batched(tiny_dir: Path) -> None:
    model = tiny(tiny_dir, "llama")
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=99, max_tokens=12)
    alone = engine(model, 4096).submit(list(range(20)), params).result()
    eng = engine(model, 4096)
    handles = [eng.submit(list(range(i, i + 25)), params) for i in range(5)]
    handles.insert(2, eng.submit(list(range(20)), params))
    assert [h.result() for h in handles][2].token_ids == alone.token_ids
    torch.manual_seed(0)  # the global generator plays no part
    assert engine(model, 4096).submit(list(range(20)), params).result().token_ids == alone.token_ids


def test_async_iteration_with_the_loop_on_another_thread(tiny_dir: Path) -> None:
    import asyncio

    model = tiny(tiny_dir, "llama")
    eng = engine(model, 4096)
    loop_thread = threading.Thread(target=eng.run_loop, daemon=True)
    loop_thread.start()

    async def main() -> list[list[int]]:
        handles = [eng.submit(list(range(i, i + 30)), GREEDY) for i in range(3)]
        tokens = []
        for h in handles:
            got = [e.token_id async for e in h if e.token_id is not None]
            assert (await h.aresult()).token_ids == got
            tokens.append(got)
        return tokens

    try:
        got = asyncio.run(main())
    finally:
        eng.stop()
        loop_thread.join()
    assert got == [solo_greedy(model, list(range(i, i + 30)), 10) for i in range(3)]


def test_max_running_caps_concurrency(tiny_dir: Path) -> None:
    eng = engine(tiny(tiny_dir, "llama"), 4096, max_running=2)
    handles = [eng.submit(list(range(i, i + 20)), GREEDY) for i in range(5)]
    most = 0
    while any(h.seq.finish_reason is None for h in handles):
        eng.step()
        most = max(most, len(eng.scheduler.running))
    assert most == 2


def test_interactive_requests_are_admitted_before_waiting_background_ones(
    tiny_dir: Path,
) -> None:
    eng = engine(tiny(tiny_dir, "llama"), 4096, max_running=1)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    batch = [eng.submit([5, 6, 7 + i], params, background=True) for i in range(4)]
    chat = eng.submit([9, 9, 9], params)  # arrives last, runs first
    for handle in [chat, *batch]:
        handle.result()
    started = [h.seq.first_scheduled for h in batch]
    assert chat.seq.first_scheduled < min(started)  # type: ignore[operator]
    assert started == sorted(started)  # the batch keeps its own order


def test_shift_keeps_generating_past_the_context_limit(tiny_dir: Path) -> None:
    model = tiny(tiny_dir, "llama")
    eng = engine(model, 4096)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, num_keep=4)
    capped = eng.submit(list(range(20)), params, num_ctx=40).result()
    assert capped.finish_reason == "length" and len(capped.token_ids) == 20  # hit num_ctx
    params.shift = True
    shifted = eng.submit(list(range(20)), params, num_ctx=40).result()
    assert shifted.finish_reason == "length" and len(shifted.token_ids) == 60  # hit max_tokens
    assert shifted.token_ids[:20] == capped.token_ids  # the same until the first shift
    assert eng.kv_stats()["used_tokens"] == 0


def test_a_failing_sample_ends_only_its_own_sequence(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import accordion.engine.engine as engine_module

    model = tiny(tiny_dir, "llama")
    eng = engine(model, budget_tokens=400)
    real = engine_module.choose
    poisoned = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, seed=666)
    calls = [0]

    def sample(logits, p, gen):  # noqa: ANN001, ANN202
        calls[0] += p is poisoned
        if p is poisoned and calls[0] > 3:
            raise RuntimeError("a sampler bug")
        return real(logits, p, gen)

    monkeypatch.setattr(engine_module, "choose", sample)
    prompts = prompts_with_shared_prefixes(3, 3)
    handles = [eng.submit(prompts[0], GREEDY), eng.submit(prompts[1], poisoned)]
    handles.append(eng.submit(prompts[2], GREEDY))
    outs = [h.result() for h in handles]
    assert outs[1].finish_reason == "error" and "sampler bug" in str(outs[1].error)
    for out, prompt in zip((outs[0], outs[2]), (prompts[0], prompts[2]), strict=True):
        assert out.error is None and out.token_ids == solo_greedy(model, prompt, 10)
    assert eng.kv.stats()["used_bytes"] == 0


def test_a_failing_forward_step_ends_its_sequences_and_the_engine_goes_on(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import accordion.engine.engine as engine_module

    model = tiny(tiny_dir, "llama")
    eng = engine(model, budget_tokens=400)
    real, calls = engine_module.run, []

    def run(decoder, kv, work):  # noqa: ANN001, ANN202
        calls.append(len(work))
        if len(calls) == 2:
            raise RuntimeError("a kernel bug")
        return real(decoder, kv, work)

    monkeypatch.setattr(engine_module, "run", run)
    first = eng.submit([1, 2, 3, 4], GREEDY)
    assert eng.step()  # admitted and prefilled
    failed = first.result()
    assert failed.finish_reason == "error" and "kernel bug" in str(failed.error)
    later = eng.submit([5, 6, 7], GREEDY).result()
    assert later.error is None and later.token_ids == solo_greedy(model, [5, 6, 7], 10)
