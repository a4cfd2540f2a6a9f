"""Constrained decoding: grammars from requests, compiled per model, a mask per sequence.

The engine asks a `Compiler` (one per model) for a `Constraint` per constrained
sequence, masks that sequence's logits with it before sampling and advances it
with each sampled token. This package knows tokenizers and grammars, not
scheduling; llguidance does the parsing.
"""

from accordion.structured.compiler import Compiler
from accordion.structured.constraint import Constraint
from accordion.structured.grammar import Grammar, GrammarError

__all__ = ["Compiler", "Constraint", "Grammar", "GrammarError"]
