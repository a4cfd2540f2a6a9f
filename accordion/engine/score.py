"""Teacher-forced log-probabilities of a prompt's own tokens, for `echo` with `logprobs`.

Evaluation harnesses send a text with `echo`, `logprobs` and `max_tokens: 0` and read
how likely each of its tokens was given the ones before: one forward pass over the
whole prompt in a scratch cache of its own (the engine's prefix cache keeps no logits),
the head applied in chunks so that a long prompt never holds [tokens, vocab] at once.
Like embeddings, it runs on the thread that drives the model.
"""

from __future__ import annotations

import torch

from accordion.engine.sampler import logprob_of
from accordion.engine.sequence import Logprob
from accordion.models.decoder import Decoder
from accordion.models.embed import final_hidden

HEAD_ROWS = 128  # logits rows computed at once: 128 x 262k floats is 128 MiB


@torch.inference_mode()
def prompt_logprobs(decoder: Decoder, ids: list[int], top: int) -> list[Logprob]:
    """For each token after the first, its logprob given those before (and the `top`
    most likely tokens there)."""
    n = len(ids)
    hidden = final_hidden(decoder, ids)
    out: list[Logprob] = []
    for start in range(0, n - 1, HEAD_ROWS):
        logits = decoder.logits(hidden[start : min(start + HEAD_ROWS, n - 1)])
        for row, token in zip(logits, ids[start + 1 : start + 1 + len(logits)], strict=True):
            out.append(logprob_of(row, token, top))
    return out
