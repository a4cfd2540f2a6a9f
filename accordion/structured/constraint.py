"""One sequence's grammar state: the tokens allowed next, advanced token by token.

The engine calls `mask` on the sequence's logits before sampling and `advance`
with the token it sampled. End-of-generation tokens are allowed only where the
grammar accepts, and once the grammar can take nothing more the sequence is
`finished` without sampling an end token.
"""

from __future__ import annotations

import llguidance
import numpy as np
import torch

_LANES = np.arange(32)


class Constraint:
    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._bits = np.zeros(mask_words(vocab_size), dtype=np.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with every token the grammar does not allow next at -inf."""
        bits = self._bits
        self._matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        self._raise_if_failed()
        # Masks are nearly all ones (inside a string) or nearly all zeros (after a
        # key): only the words that are neither are unpacked, 3-4x faster than
        # unpacking a 262k vocabulary whole.
        if np.count_nonzero(bits == -1) * 2 > len(bits):
            out = logits.clone()
            out.numpy()[_positions(bits, bits != -1, 0, logits.shape[-1])] = -np.inf
            return out
        allowed = torch.from_numpy(_positions(bits, bits != 0, 1, logits.shape[-1]))
        out = torch.full_like(logits, -np.inf)
        out[allowed] = logits[allowed]
        return out

    def advance(self, token: int) -> None:
        self._matcher.consume_token(token)
        self._raise_if_failed()

    @property
    def finished(self) -> bool:
        """Nothing more can follow: the output is complete."""
        return self._matcher.is_stopped()

    def _raise_if_failed(self) -> None:
        if self._matcher.is_error():  # only a bug lands here: the mask allowed the token
            raise RuntimeError(f"grammar state failed: {self._matcher.get_error()}")


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _positions(bits: np.ndarray, words: np.ndarray, value: int, n: int) -> np.ndarray:
    """Token ids below n whose bit is `value`, among the chosen 32-bit words."""
    index = np.flatnonzero(words)
    unpacked = np.unpackbits(bits[index].view(np.uint8), bitorder="little").reshape(-1, 32)
    ids = (index[:, None] * 32 + _LANES)[unpacked == value]
    return ids[ids < n]
