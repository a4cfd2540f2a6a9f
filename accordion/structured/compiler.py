"""Grammars compiled against one model's vocabulary, cached by grammar.

llguidance reads the vocabulary from the `tokenizers` JSON we already build from
the GGUF. Reading it takes ~0.2 s for SmolLM2's 49k tokens and ~1.5 s for
Gemma's 262k, holding the GIL, so it happens once per model, on the first
constrained request (models that never see one never pay it). Compiling a schema
takes about a millisecond; the compiled matcher is kept, and each sequence
starts from a copy of it (microseconds).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import llguidance

from accordion.loader.tokenizer import Tokenizer
from accordion.structured.constraint import Constraint
from accordion.structured.grammar import Grammar, GrammarError

CACHE_SIZE = 64  # compiled grammars kept per model
MAX_MESSAGE = 500
LIMITS = llguidance.LLParserLimits(verbose_errors=False)  # errors name the rule, not the state


class Compiler:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width, which may exceed the tokenizer's
        self._lltok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[Grammar, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def vocabulary(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(),
                    n_vocab=self.vocab_size,
                    eos_token=sorted(self._tokenizer.eog_ids),
                )
            return self._lltok

    def compile(self, grammar: Grammar) -> llguidance.LLMatcher:
        """The grammar's pristine matcher; GrammarError names what the library refused."""
        with self._lock:
            if grammar in self._cache:
                self._cache.move_to_end(grammar)
                return self._cache[grammar]
        vocabulary = self.vocabulary()
        try:
            serialized = grammar.to_llguidance()
        except ValueError as e:
            raise GrammarError(f"{grammar.field}: {e}") from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            serialized, vocabulary, limits=LIMITS
        )
        if failed:
            raise GrammarError(f"{grammar.field} is not supported: {_one_line(messages)}")
        matcher = llguidance.LLMatcher(vocabulary, serialized, log_level=0, limits=LIMITS)
        if matcher.is_error():
            raise GrammarError(f"{grammar.field} is not supported: {matcher.get_error()}")
        with self._lock:
            self._cache[grammar] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def start(self, grammar: Grammar) -> Constraint:
        """A fresh constraint for one sequence."""
        return Constraint(self.compile(grammar).deep_copy(), self.vocab_size)


def _one_line(messages: list[str]) -> str:
    # regex errors span lines (the pattern, a caret, the reason): one line, whole
    text = " ".join(" ".join(messages).split()) or "the grammar was refused"
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."
