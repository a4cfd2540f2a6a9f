"""Streaming detokenization: text pieces as tokens arrive, never half a character.

A token is not a unit of text: Gemma spells a missing emoji as four `<0xNN>` tokens, and a
byte-level BPE token can end in the middle of a UTF-8 sequence. Decoding tokens one by one
would show U+FFFD for every such piece. Instead we decode a short window of recent tokens
and emit what it adds beyond the text already emitted, holding back while the window's
text ends in an incomplete character (which the decoder renders as U+FFFD).

Rule for special tokens: pieces are exactly what `Tokenizer.decode(ids, skip_special)`
gives, so with the default `skip_special=False` a `<end_of_turn>` appears in the text.
Whether to stop at, or hide, an end-of-generation token is the engine's decision
(`Tokenizer.eog_ids`), made before the token reaches this class.
"""

from __future__ import annotations

from collections.abc import Sequence

from accordion.loader.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
# An incomplete character is at most 3 bytes, each from its own token at worst. More
# tokens than this still ending in U+FFFD are invalid bytes, not a character in progress.
MAX_HELD = 4
# Prompt tokens decoded ahead of the first generated one, so that a decoder which drops
# the leading space of a text (SentencePiece with a space prefix) keeps the first word's.
CONTEXT = 4


class IncrementalDetokenizer:
    """`add(id)` returns the text that token completes; `flush()` the rest at the end.

    Without `prompt_ids`, `"".join(pieces) == tokenizer.decode(ids, skip_special)` for the
    ids added. With them, the pieces are the text the added ids append to the prompt's.
    The one exception is a byte run that is not valid UTF-8: text emitted before the run
    turned out bad cannot be taken back, so the count of U+FFFD may differ from `decode`.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special: bool = False
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        # The window: ids[:read] were emitted (and are kept only as context); ids[read:] wait.
        self._ids = list(prompt_ids[-CONTEXT:])
        self._read = len(self._ids)
        self._emitted = self._decode(self._ids)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) <= len(self._emitted):
            return ""  # e.g. a skipped special token
        if text.endswith(REPLACEMENT) and len(self._ids) - self._read < MAX_HELD:
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """What is still held back (an incomplete character at the end of the output)."""
        if self._read == len(self._ids):
            return ""
        return self._advance(self._decode(self._ids))

    def _advance(self, text: str) -> str:
        # The window's text is recomputed from the same start, so it extends what was
        # emitted; slicing by length keeps that true even if a decoder drops a leading space.
        piece = text[len(self._emitted) :]
        # Keep the last emitted tokens as context and drop the rest: the window stays short.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._emitted = self._decode(self._ids)
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, self._skip) if ids else ""
