"""What a caller controls about generation, with Ollama's defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from accordion.structured.grammar import Grammar

PENALTY_RANGE = 2.0  # presence / frequency penalties live in [-2, 2], as in OpenAI's API
BAN = -100.0  # a logit_bias this low bans the token; biases live in [-100, 100]
MAX_LOGPROBS = 20  # top logprobs per position, as OpenAI's chat API caps them


@dataclass
class SamplingParams:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.9  # 1 = off
    min_p: float = 0.0  # 0 = off
    repeat_penalty: float = 1.1  # 1 = off
    repeat_last_n: int = 64  # tokens looked back for the penalties; -1 = whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None  # None = until an end token or the context limit
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    shift: bool = False  # at the context limit, drop old tokens and go on instead of stopping
    num_keep: int = 0  # tokens at the start that a shift never drops
    grammar: Grammar | None = None  # the output must match it (constrained decoding)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to logit
    logprobs: int | None = None  # report each output token's logprob and this many top ones

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        reals = ("temperature", "top_p", "min_p", "repeat_penalty")
        for name in (*reals, "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number")
            if not math.isfinite(value):  # NaN and Infinity parse as JSON numbers in Python
                raise ValueError(f"{name} must be a finite number, got {value}")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (
                abs(self.presence_penalty) <= PENALTY_RANGE,
                f"presence_penalty must be in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}]",
            ),
            (
                abs(self.frequency_penalty) <= PENALTY_RANGE,
                f"frequency_penalty must be in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}]",
            ),
            (self.repeat_last_n >= -1, "repeat_last_n must be >= -1"),
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens must be >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (self.num_keep >= 0, "num_keep must be >= 0"),
            (
                all(
                    isinstance(b, int | float) and -BAN >= b >= BAN
                    for b in self.logit_bias.values()
                ),
                f"logit_bias values must be numbers in [{BAN:g}, {-BAN:g}]",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"top logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return (
            self.repeat_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
