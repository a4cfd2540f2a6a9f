"""Build a `tokenizers` tokenizer from a GGUF vocabulary, and cache it per file.

Two vocabulary kinds are supported, named by `tokenizer.ggml.model`:

* `gpt2`: byte-level BPE with the file's merges, split first by the regexes of the
  pre-tokenizer `tokenizer.ggml.pre` names (taken from llama.cpp).
* `llama`: SentencePiece-style BPE. The file has scores instead of merges, so the merges
  are every split of a token into two tokens, best first; spaces are spelled `▁` and
  characters outside the vocabulary fall back to `<0xNN>` byte tokens.

Building means reading the big vocabulary arrays (seconds on a 262k vocabulary), so the
result goes to `gf.cache_dir` as `tokenizer.json` plus a small JSON of the ids and flags
we keep beside it. A cached open only parses those two files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from accordion.errors import InvalidModelFileError, UnsupportedModelError
from accordion.loader.gguf_file import GGUFFile

log = logging.getLogger(__name__)

CACHE_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
INFO_FILE = "tokenizer.info.json"
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (1 normal, 6 byte)

# Texts that end a turn; llama.cpp treats any token spelled like this as end-of-generation.
EOG_TEXTS = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
     "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"}
)  # fmt: skip

# Pre-tokenizer regexes by `tokenizer.ggml.pre`, as llama.cpp's llm_tokenizer_bpe applies them:
# each regex splits the pieces the previous one produced.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0")
_SMOLLM_NAMES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "tekken": (_TEKKEN,),
    **dict.fromkeys(("gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion", "exaone4"), (_GPT2,)),
    **dict.fromkeys((*_LLAMA3_NAMES, "lfm2", "dbrx", "smaug-bpe"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"), (_QWEN2,)),
    **dict.fromkeys(_SMOLLM_NAMES, (r"\p{N}", _GPT2)),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), (_GPT4O,)),
}
# llama.cpp takes a whole pre-token that is itself in the vocabulary without merging.
IGNORE_MERGES = frozenset((*_LLAMA3_NAMES, "lfm2", "tekken"))


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """What the engine asks of a tokenizer without tokenizing; cached next to tokenizer.json."""

    model: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    eog_ids: frozenset[int]
    special_ids: frozenset[int]
    bos_token: str
    eos_token: str
    respelled: dict[int, str]  # id -> the file's spelling, where the backend spells it otherwise

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["eog_ids"], doc["special_ids"] = sorted(self.eog_ids), sorted(self.special_ids)
        return {"version": CACHE_VERSION, "tokenizers": tokenizers.__version__, **doc}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TokenizerInfo | None:
        if doc.pop("version", None) != CACHE_VERSION:
            return None
        if doc.pop("tokenizers", None) != tokenizers.__version__:
            return None  # a newer library may read or write tokenizer.json differently
        doc["eog_ids"] = frozenset(doc["eog_ids"])
        doc["special_ids"] = frozenset(doc["special_ids"])
        doc["respelled"] = {int(k): v for k, v in doc["respelled"].items()}
        return cls(**doc)


_SURROGATE = re.compile("[\ud800-\udfff]")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """Text <-> token ids for one GGUF model."""

    def __init__(self, backend: Backend, info: TokenizerInfo) -> None:
        self.backend = backend  # the `tokenizers.Tokenizer`
        self.info = info
        self.vocab_size = info.vocab_size
        self.bos_id, self.eos_id, self.pad_id = info.bos_id, info.eos_id, info.pad_id
        self.bos_token, self.eos_token = info.bos_token, info.eos_token
        self.add_bos = info.add_bos
        self.eog_ids = info.eog_ids

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> Tokenizer:
        info = _read_info(gf.cache_dir)
        backend = _read_backend(gf) if info is not None else None
        if backend is not None and info is not None:
            return cls(backend, info)
        backend, info = build(gf)
        _save(gf.cache_dir, backend, info)
        return cls(backend, info)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised whole."""
        # encode_batch releases the GIL while it works, encode holds it: 0.2 s for a
        # 20,000-message chat, during which the server's HTTP thread could not answer
        try:
            ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        except TypeError:  # lone surrogates (JSON allows "\ud800"): U+FFFD each, as Go does
            text = _SURROGATE.sub("\ufffd", text)
            ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if self.info.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        """The token as the GGUF vocabulary spells it (byte-level `Ġ`, `<0x0A>`, ...)."""
        if token_id in self.info.respelled:
            return self.info.respelled[token_id]
        text = self.backend.id_to_token(token_id)
        if text is None:
            raise IndexError(f"token id {token_id} outside the vocabulary of {self.vocab_size}")
        return text

    def is_special(self, token_id: int) -> bool:
        return token_id in self.info.special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a piece of a character, for some): what
        logprobs report as `bytes`. Special tokens are their own spelling."""
        text = self.token_text(token_id)
        if self.is_special(token_id):
            return text.encode()
        if self.info.model == "gpt2":
            chars = _char_to_byte()
            if all(c in chars for c in text):
                return bytes(chars[c] for c in text)
            return text.encode()
        byte = _BYTE_TOKEN.fullmatch(text)
        return bytes([int(byte.group(1), 16)]) if byte else text.replace("▁", " ").encode()


def _read_info(cache_dir: Path) -> TokenizerInfo | None:
    try:
        return TokenizerInfo.from_json(json.loads((cache_dir / INFO_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_backend(gf: GGUFFile) -> Backend | None:
    path = gf.cache_dir / TOKENIZER_FILE
    try:
        return Backend.from_file(str(path))
    except Exception as e:  # missing or unreadable: ours to rebuild
        if path.exists():
            log.warning("%s: rebuilding the cached tokenizer (%s)", gf.path.name, e)
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _save(cache_dir: Path, backend: Backend, info: TokenizerInfo) -> None:
    doc = json.loads(backend.to_str())
    merges = doc["model"].get("merges") or []
    # "a b" strings parse in half the time of ["a", "b"] pairs; only possible without spaces.
    if all(" " not in a and " " not in b for a, b in merges):
        doc["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(cache_dir / TOKENIZER_FILE, json.dumps(doc, ensure_ascii=False))
        # Written last: its presence says tokenizer.json is complete.
        _write_atomic(cache_dir / INFO_FILE, json.dumps(info.to_json()))
    except OSError as e:  # the tokenizer works without its cache, only slower to open
        log.warning("%s: cannot cache the tokenizer (%s)", cache_dir, e)


def build(gf: GGUFFile) -> tuple[Backend, TokenizerInfo]:
    """The slow path: the backend and its info from the file's vocabulary arrays."""
    kind = gf.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise UnsupportedModelError(
            f"{gf.path.name}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)"
        )
    tokens = gf.array("tokenizer.ggml.tokens")
    if not tokens:
        raise InvalidModelFileError(gf.path.name, "no tokenizer.ggml.tokens in the file")
    types = gf.array("tokenizer.ggml.token_type")
    types = [1] * len(tokens) if types is None or len(types) == 0 else types.tolist()

    def token_id(key: str) -> int | None:
        value = gf.get(f"tokenizer.ggml.{key}_token_id")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos, eos = token_id("bos"), token_id("eos")
    eog = {i for i in (eos, token_id("eot"), token_id("eom")) if i is not None}
    eog |= {i for i, t in enumerate(tokens) if t in EOG_TEXTS}
    # Like llama.cpp, an end marker counts as a control token whatever the file says.
    special = {i for i, ty in enumerate(types) if ty == CONTROL} | eog

    if kind == "gpt2":
        backend, vocab = _byte_level(gf, tokens, types)
    else:
        backend, vocab = _sentencepiece(gf, tokens, unk=token_id("unknown"))
    respelled = {i: t for i, t in enumerate(tokens) if vocab[i] != t}
    # A respelled token's file spelling is not in the backend's vocabulary: adding it would
    # make a new id. Gemma's space runs are such; the `▁` merges build them instead.
    whole = [
        i
        for i, ty in enumerate(types)
        if (ty in (CONTROL, USER_DEFINED) or i in eog) and i not in respelled
    ]
    backend.add_special_tokens([_added(tokens[i], True) for i in whole if i in special])
    # User-defined tokens (`<think>`, runs of newlines) are matched whole too, but are text.
    backend.add_tokens([_added(tokens[i], False) for i in whole if i not in special])

    info = TokenizerInfo(
        model=kind,
        vocab_size=len(tokens),
        bos_id=bos,
        eos_id=eos,
        pad_id=token_id("padding"),
        add_bos=bool(gf.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        add_eos=bool(gf.get("tokenizer.ggml.add_eos_token", False)),
        eog_ids=frozenset(eog),
        special_ids=frozenset(special),
        bos_token=tokens[bos] if bos is not None else "",
        eos_token=tokens[eos] if eos is not None else "",
        respelled=respelled,
    )
    return backend, info


def _added(content: str, special: bool) -> AddedToken:
    return AddedToken(content, special=special, normalized=False)


def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable spelling of every byte, as byte-level vocabularies use it."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


@functools.cache
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_char().items()}


def _byte_level(gf: GGUFFile, tokens: list[str], types: list[int]) -> tuple[Backend, list[str]]:
    spelling = _byte_to_char()
    alphabet = set(spelling.values())
    # A normal token written in plain UTF-8 would never match the byte-level pieces.
    vocab = [
        t if ty != 1 or set(t) <= alphabet else "".join(spelling[b] for b in t.encode())
        for t, ty in zip(tokens, types, strict=True)
    ]
    merges = [tuple(m.split(" ", 1)) for m in gf.array("tokenizer.ggml.merges") or []]
    pre = str(gf.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_SPLITS:
        log.warning("%s: unknown pre-tokenizer %r, splitting like gpt2", gf.path.name, pre)
    model = models.BPE(
        {t: i for i, t in enumerate(vocab)}, merges, ignore_merges=pre in IGNORE_MERGES
    )
    backend = Backend(model)
    splits = [
        pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS.get(pre, (_GPT2,))
    ]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend, vocab


def _sentencepiece(gf: GGUFFile, tokens: list[str], unk: int | None) -> tuple[Backend, list[str]]:
    # Gemma stores runs of spaces as real spaces; the text reaches the model as `▁`s.
    vocab = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
    # Gemma's scores are -1000 for the user-defined space and newline runs, which would
    # rank their merges late; its file order is the merge order (as transformers has it).
    scores = None if gf.architecture.startswith("gemma") else gf.array("tokenizer.ggml.scores")
    no_scores = scores is None or len(scores) == 0
    priority: Sequence[float] = range(0, -len(vocab), -1) if no_scores else scores.tolist()
    model = models.BPE(
        {t: i for i, t in enumerate(vocab)},
        _merges_from_priority(vocab, priority),
        unk_token=vocab[unk] if unk is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Backend(model)
    prefix = bool(gf.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:  # the space the pre-tokenizer added is not part of the text
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend, vocab


def _merges_from_priority(vocab: list[str], priority: Sequence[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, ordered by the token's priority, best first.

    Within one token the longer left part goes first, and ties between tokens keep
    vocabulary order: transformers' `generate_merges`, so the encodings agree with it.
    """
    ids = {t: i for i, t in enumerate(vocab)}
    found: list[tuple[float, int, int, str, str]] = []
    for token, i in ids.items():
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                found.append((-priority[i], -cut, cut - len(token), left, right))
    found.sort(key=lambda m: m[:3])  # stable: equal keys stay in vocabulary order
    return _used_merges([(m[3], m[4]) for m in found])


def _used_merges(merges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The merges BPE can ever apply: at most one per token, half of them here.

    Wherever a token forms, only its own characters took part (a merge reaching outside
    would leave a symbol that cannot be undone), and BPE merged them in the same order as
    on the token's text alone. So the merge completing a token is the last one BPE makes
    on its text alone, and its other splits never fire. Fewer merges load faster.
    """
    rank = {m: r for r, m in enumerate(merges)}
    splits = Counter(a + b for a, b in merges)
    last = {t: _last_merge(t, rank) for t, n in splits.items() if n > 1}
    return [m for m in merges if splits[m[0] + m[1]] == 1 or last[m[0] + m[1]] == m]


def _last_merge(text: str, rank: dict[tuple[str, str], int]) -> tuple[str, str] | None:
    """BPE on `text` alone (best-ranked pair first, leftmost on ties) up to its last merge."""
    symbols = list(text)
    while len(symbols) > 2:
        best, at = None, -1
        for k in range(len(symbols) - 1):
            r = rank.get((symbols[k], symbols[k + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, k
        if best is None:
            return None  # the token never forms from its characters
        symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
    pair = (symbols[0], symbols[1]) if len(symbols) == 2 else None
    return pair if pair in rank else None
