"""Log-probabilities as each API spells them, from the engine's per-token `Logprob`s.

The numbers are log_softmax of the logits the sampler saw (after logit_bias, penalties
and any grammar mask; before temperature, top-k and top-p). Tokens a grammar banned
are -inf, which JSON cannot carry: they are left out of the top lists.

- OpenAI chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.
- OpenAI completions (legacy): `{"tokens", "token_logprobs", "top_logprobs": [{token:
  logprob}], "text_offset"}`, with the prompt's tokens first under `echo`.
- Ollama: a list of `{"token", "logprob", "bytes", "top_logprobs": [...]}`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from accordion.engine.sequence import Logprob
from accordion.loader.tokenizer import Tokenizer


def token_entry(tokenizer: Tokenizer, token: int, logprob: float) -> dict[str, Any]:
    raw = tokenizer.token_bytes(token)
    return {"token": raw.decode(errors="replace"), "logprob": logprob, "bytes": list(raw)}


def entries(tokenizer: Tokenizer, logprobs: Sequence[Logprob]) -> list[dict[str, Any]]:
    """OpenAI chat's `content` list, which is also Ollama's `logprobs`."""
    return [
        {
            **token_entry(tokenizer, lp.token, lp.logprob),
            "top_logprobs": [token_entry(tokenizer, t, v) for t, v in lp.top if not math.isinf(v)],
        }
        for lp in logprobs
    ]


def completion(
    tokenizer: Tokenizer, rows: Sequence[tuple[int, Logprob | None]], offset: int = 0
) -> dict[str, Any]:
    """The legacy completions object from (token id, its Logprob or None) rows: None is a
    position with no logprob (the first prompt token under echo)."""
    tokens, values, tops, offsets = [], [], [], []
    for token, lp in rows:
        text = tokenizer.token_bytes(token).decode(errors="replace")
        tokens.append(text)
        values.append(None if lp is None else lp.logprob)
        tops.append(
            None
            if lp is None
            else {
                tokenizer.token_bytes(t).decode(errors="replace"): v
                for t, v in lp.top
                if not math.isinf(v)
            }
        )
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
