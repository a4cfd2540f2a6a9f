"""Token choice: greedy, seeded randomness, top-k/top-p/min-p, llama.cpp penalties."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from accordion.engine import sampler
from accordion.engine.sampler import (
    MAX_INVERSE_TEMPERATURE,
    apply_penalties,
    new_generator,
    sample_one,
)
from accordion.sampling_params import SamplingParams

NO_PENALTY = {"repeat_penalty": 1.0}


@pytest.fixture(autouse=True, params=["native", "python"])
def sampling_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on both ways a token is drawn: native/sample.cpp where the native ops
    are built, and the Python steps it replaces where they are not."""
    if request.param == "native" and not sampler.native.available():
        pytest.skip("native ops unavailable")
    if request.param == "python":
        monkeypatch.setattr(sampler.native, "available", lambda: False)
    return str(request.param)


def params(**kw: object) -> SamplingParams:
    """Sampling with only the given filters on (no top-k/top-p/penalty defaults)."""
    base: dict[str, object] = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, **NO_PENALTY}
    return SamplingParams(**{**base, **kw})  # type: ignore[arg-type]


def random_logits(n: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def draws(logits: torch.Tensor, p: SamplingParams, n: int, seed: int = 0) -> list[int]:
    gen = new_generator(seed)
    return [sample_one(logits, p, [], gen) for _ in range(n)]


def logits_for(probs: list[float]) -> torch.Tensor:
    """Logits whose softmax at temperature 1 is `probs`."""
    return torch.tensor([math.log(q) for q in probs])


# -- greedy and top_k -------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed: int) -> None:
    logits = random_logits(seed=seed)
    p = SamplingParams(temperature=0)
    assert p.greedy
    assert draws(logits, p, 3) == [int(logits.argmax())] * 3


@pytest.mark.parametrize("temperature", [0.05, 1.0, 5.0, 1000.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature: float) -> None:
    for seed in range(5):
        logits = random_logits(seed=seed)
        p = SamplingParams(temperature=temperature, top_k=1, **NO_PENALTY)
        assert set(draws(logits, p, 20, seed)) == {int(logits.argmax())}


def test_top_k_limits_choice_to_the_k_best() -> None:
    logits = random_logits(50)
    best = set(torch.topk(logits, 5).indices.tolist())
    got = draws(logits, params(temperature=10.0, top_k=5), 300)  # hot: all five get drawn
    assert set(got) == best


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(st.floats(-30, 30, width=32, allow_subnormal=False), min_size=1, max_size=40),
    data=st.data(),
    temperature=st.floats(0.05, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_sampled_token_is_always_within_top_k(
    logits: list[float], data: st.DataObject, temperature: float, seed: int
) -> None:
    top_k = data.draw(st.integers(1, len(logits)), label="top_k")
    t = torch.tensor(logits)
    token = sample_one(t, params(temperature=temperature, top_k=top_k), [], new_generator(seed))
    # what top_k ranks: the logits shifted by their maximum, then scaled; both steps may
    # round near values into ties (-1.6e-37 and 0 with a maximum of 1e-30)
    scaled = (t - t.max()) * min(1.0 / temperature, MAX_INVERSE_TEMPERATURE)
    kth_best = torch.sort(scaled, descending=True).values[top_k - 1]
    assert 0 <= token < len(logits)
    assert scaled[token] >= kth_best  # ties with the k-th value may go either way


# -- seeds ------------------------------------------------------------------------


def test_same_seed_same_tokens() -> None:
    logits = torch.zeros(1000)  # uniform: every draw is pure randomness
    p = params(temperature=1.0)
    assert draws(logits, p, 50, seed=42) == draws(logits, p, 50, seed=42)


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1000)
    p = params(temperature=1.0)
    a, b = draws(logits, p, 50, seed=1), draws(logits, p, 50, seed=2)
    assert a != b
    assert sum(x == y for x, y in zip(a, b, strict=True)) < 5  # 1-in-1000 per draw


def test_no_seed_draws_fresh_randomness() -> None:
    logits = torch.zeros(1000)
    p = params(temperature=1.0)
    gens = [new_generator(None) for _ in range(2)]
    a, b = ([sample_one(logits, p, [], g) for _ in range(20)] for g in gens)
    assert a != b


# -- top_p and min_p ----------------------------------------------------------------

PROBS = [0.05, 0.5, 0.15, 0.3]  # best first: ids 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)


@pytest.mark.parametrize(
    ("top_p", "allowed"),
    [(0.3, {1}), (0.7, {1, 3}), (0.9, {1, 2, 3}), (0.99, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p: float, allowed: set[int]) -> None:
    got = draws(logits_for(PROBS), params(temperature=1.0, top_p=top_p), 600)
    assert set(got) == allowed  # never outside; every allowed token shows up in 600 draws


@pytest.mark.parametrize(
    ("min_p", "allowed"),
    [(0.05, {0, 1, 2, 3}), (0.25, {1, 2, 3}), (0.5, {1, 3}), (0.9, {1})],
)
def test_min_p_drops_tokens_below_a_fraction_of_the_best(min_p: float, allowed: set[int]) -> None:
    got = draws(logits_for(PROBS), params(temperature=1.0, min_p=min_p), 600)
    assert set(got) == allowed


def test_top_p_and_min_p_combine_as_an_intersection() -> None:
    got = draws(logits_for(PROBS), params(temperature=1.0, top_p=0.9, min_p=0.4), 400)
    assert set(got) == {1, 3}  # top_p allows {1,3,2}, min_p allows {1,3}


def test_filters_never_pick_masked_out_tokens() -> None:
    logits = torch.full((200,), -1e9)
    logits[[7, 50, 120]] = torch.tensor([2.0, 1.5, 1.0])
    for p in (params(temperature=3.0), params(temperature=3.0, top_p=0.999, top_k=100)):
        assert set(draws(logits, p, 300)) == {7, 50, 120}


# -- penalties (llama.cpp semantics) ------------------------------------------------

LOGITS = [2.0, -2.0, 1.0, -1.0, 0.5, 3.0]


def penalty_params(repeat: float, last_n: int, presence: float, frequency: float) -> SamplingParams:
    return SamplingParams(
        repeat_penalty=repeat,
        repeat_last_n=last_n,
        presence_penalty=presence,
        frequency_penalty=frequency,
    )


def penalized(history: list[int], **kw: float) -> list[float]:
    return apply_penalties(torch.tensor(LOGITS), history, SamplingParams(**kw)).tolist()


def test_repeat_penalty_divides_positive_and_multiplies_negative() -> None:
    out = penalized([0, 1, 1, 3], repeat_penalty=2.0)
    assert out == [1.0, -4.0, 1.0, -2.0, 0.5, 3.0]  # ids 0, 1, 3 only; count does not matter


def test_presence_penalty_subtracts_once_per_present_token() -> None:
    out = penalized([0, 1, 1, 3], repeat_penalty=1.0, presence_penalty=0.5)
    assert out == [1.5, -2.5, 1.0, -1.5, 0.5, 3.0]


def test_frequency_penalty_subtracts_count_times_value() -> None:
    out = penalized([0, 1, 1, 1, 3], repeat_penalty=1.0, frequency_penalty=0.25)
    assert out == [1.75, -2.75, 1.0, -1.25, 0.5, 3.0]


def test_penalties_combine_repeat_first_then_presence_and_frequency() -> None:
    out = penalized([0, 0], repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    assert out == pytest.approx([2.0 / 2 - 0.5 - 2 * 0.25, *LOGITS[1:]])


def test_negative_presence_and_frequency_reward_repeats() -> None:
    out = penalized([4], repeat_penalty=1.0, presence_penalty=-1.0, frequency_penalty=-0.5)
    assert out == [*LOGITS[:4], 2.0, 3.0]


def test_apply_penalties_does_not_modify_its_input() -> None:
    logits = torch.tensor(LOGITS)
    apply_penalties(logits, [0, 1], SamplingParams(repeat_penalty=2.0))
    assert logits.tolist() == LOGITS


@pytest.mark.parametrize(
    ("last_n", "changed"),
    [(2, {2, 3}), (3, {1, 2, 3}), (100, {0, 1, 2, 3}), (-1, {0, 1, 2, 3}), (0, set())],
)
def test_repeat_last_n_window(last_n: int, changed: set[int]) -> None:
    out = penalized([0, 1, 2, 3], repeat_penalty=2.0, repeat_last_n=last_n)
    assert {i for i, (a, b) in enumerate(zip(out, LOGITS, strict=True)) if a != b} == changed


def test_window_counts_only_recent_occurrences() -> None:
    out = penalized([0, 0, 0, 1, 0], repeat_penalty=1.0, frequency_penalty=1.0, repeat_last_n=2)
    assert out[0] == LOGITS[0] - 1 and out[1] == LOGITS[1] - 1


def test_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([3.0, 2.0])
    gen = new_generator(0)
    assert sample_one(logits, SamplingParams(temperature=0, repeat_penalty=1.0), [0], gen) == 0
    assert sample_one(logits, SamplingParams(temperature=0, repeat_penalty=2.0), [0], gen) == 1


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, allow_subnormal=False), min_size=8, max_size=8),
    history=st.lists(st.integers(0, 7), max_size=20),
    last_n=st.integers(-1, 25),
    repeat=st.floats(0.1, 4),
    presence=st.floats(-2, 2),
    frequency=st.floats(-2, 2),
)
def test_penalties_touch_exactly_the_recent_ids(
    logits: list[float],
    history: list[int],
    last_n: int,
    repeat: float,
    presence: float,
    frequency: float,
) -> None:
    p = penalty_params(repeat, last_n, presence, frequency)
    t = torch.tensor(logits)
    out = apply_penalties(t, history, p)
    window = [] if last_n == 0 else history if last_n == -1 else history[-last_n:]
    for i, x in enumerate(t.tolist()):
        if i not in window:
            assert out[i].item() == x
            continue
        expected = (x / repeat if x > 0 else x * repeat) - presence - frequency * window.count(i)
        assert out[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-4)


@settings(max_examples=300, deadline=None)
@given(
    logits=st.lists(
        st.floats(width=32) | st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan]),
        min_size=1,
        max_size=40,
    ),
    history=st.lists(st.integers(0, 39), max_size=80),
    last_n=st.integers(-1, 70),
    repeat=st.floats(0.001, 4),
    presence=st.floats(-2, 2),
    frequency=st.floats(-2, 2),
)
def test_native_penalties_are_the_python_steps_bits(
    logits: list[float],
    history: list[int],
    last_n: int,
    repeat: float,
    presence: float,
    frequency: float,
) -> None:
    """native/sample.cpp's penalize computes apply_penalties' float32 steps exactly."""
    if not sampler.native.available():  # the "python" run of the fixture, or no build
        pytest.skip("compares the native path with the Python one")
    t = torch.tensor(logits, dtype=torch.float32)
    history = [h % len(logits) for h in history]
    p = penalty_params(repeat, last_n, presence, frequency)
    ours = apply_penalties(t, history, p)
    with mock.patch.object(sampler.native, "available", lambda: False):
        python = apply_penalties(t, history, p)
    assert torch.equal(ours.view(torch.int32), python.view(torch.int32))


# -- SamplingParams validation --------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"min_p": -0.01},
        {"min_p": 1.5},
        {"repeat_penalty": 0.0},
        {"repeat_penalty": -1.0},
        {"repeat_last_n": -2},
        {"max_tokens": -1},
        {"stop": [""]},
        {"stop": ["ok", 3]},
    ],
)
def test_sampling_params_rejects_invalid_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)  # type: ignore[arg-type]


def test_sampling_params_accepts_edge_values() -> None:
    p = SamplingParams(
        temperature=0, top_k=0, top_p=1.0, min_p=1.0, repeat_last_n=-1, max_tokens=0, stop="x"
    )
    assert p.greedy and p.stop == ["x"]
    assert not SamplingParams(repeat_penalty=1.0).penalized
    assert SamplingParams().penalized  # Ollama's default repeat_penalty is 1.1


@pytest.mark.parametrize("temperature", [0.0, 1e-320, 1e-40, 0.7, 50.0])
def test_non_finite_logits_never_break_sampling(temperature: float) -> None:
    logits = random_logits(64)
    logits[3], logits[9], logits[11] = float("nan"), float("inf"), float("-inf")
    p = params(temperature=temperature, top_k=0, top_p=0.95, min_p=0.01)
    assert set(draws(logits, p, 30)) == {9}  # +inf dominates; NaN is never chosen
    logits[9] = 0.0
    got = draws(logits, params(temperature=temperature), 30)
    assert 3 not in got and 11 not in got


def test_nan_everywhere_is_an_error_not_a_token() -> None:
    logits = torch.full((16,), float("nan"))
    for temperature in (0.0, 1.0):
        with pytest.raises(RuntimeError, match="no finite logit"):
            draws(logits, params(temperature=temperature), 1)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": float("nan")},
        {"top_p": float("inf")},
        {"presence_penalty": -1e308},
        {"frequency_penalty": 2.01},
        {"repeat_penalty": float("nan")},
    ],
)
def test_parameters_must_be_finite_and_in_range(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        SamplingParams(**bad)  # type: ignore[arg-type]
