"""The GGUF tokenizer against transformers' own GGUF tokenizer, plus streaming and caching."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from conftest import share_transformers_gguf_metadata

from accordion.errors import UnsupportedModelError
from accordion.loader.bundled import resolve_model_path
from accordion.loader.detokenizer import IncrementalDetokenizer
from accordion.loader.gguf_file import GGUFFile, open_gguf
from accordion.loader.tokenizer import INFO_FILE, TOKENIZER_FILE, Tokenizer

transformers = pytest.importorskip("transformers")
share_transformers_gguf_metadata()  # AutoTokenizer's config parse, shared with other modules

MODELS = ["smollm2", "gemma3"]
CORPUS = [
    "",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "multiple   spaces  between\twords",
    "def f(x):\n\tif x:\n\t\treturn x  # tab\n    else:\n        return None\n",
    "café naïve résumé über Ångström œ ß",
    "日本語のテキストと中文字符，한국어",
    "emoji 👩‍💻 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and 🫠",
    "digits 1234567 3.14159 -42 1e10 2024-01-01",
    "\n\n\nnewlines\r\nand CRLF\n",
    "mixed: <b>html</b> & \"quotes\" 'single' it's don't I'LL",
    "    ",
    "math ∑∫√∞ ≤ ≥ ≠",
]
# Characters Gemma has no token for: they come out as <0xNN> byte-fallback tokens.
RARE = "rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 ꙮ 𐍈 ᚠ \x00\x07"
CHAT = {
    "smollm2": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "gemma3": "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
}
END_OF_TURN = {"smollm2": "<|im_end|>", "gemma3": "<end_of_turn>"}
# One byte that starts a 4-byte character, as each vocabulary spells it.
LEAD_BYTE = {"smollm2": "ð", "gemma3": "<0xF0>"}


def texts(model: str) -> list[str]:
    return [*CORPUS, RARE, CHAT[model]]


@pytest.fixture(scope="module", params=MODELS)
def model(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def path(model: str) -> Path:
    return resolve_model_path(model)


@pytest.fixture(scope="module")
def tok(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(path))


@pytest.fixture(scope="module")
def ref(path: Path):  # gemma3's takes ~15 s: build it once per module
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def stream(tok: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    pieces = [detok.add(i) for i in ids]
    return [*pieces, detok.flush()]


@pytest.mark.slow
def test_encode_matches_transformers(tok: Tokenizer, ref, model: str) -> None:
    for text in texts(model):
        assert tok.encode(text) == ref.encode(text), text


@pytest.mark.slow
def test_add_bos_overrides_the_default(tok: Tokenizer) -> None:
    assert tok.bos_id is not None
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
    assert tok.bos_id not in tok.encode("hi", add_bos=False)
    assert (tok.encode("hi")[0] == tok.bos_id) == tok.add_bos


@pytest.mark.slow
def test_decode_round_trips(tok: Tokenizer, model: str) -> None:
    for text in texts(model):
        assert tok.decode(tok.encode(text, add_bos=False)) == text


@pytest.mark.slow
def test_decode_skip_special_matches_transformers(tok: Tokenizer, ref, model: str) -> None:
    ids = tok.encode(CHAT[model] + "hello" + END_OF_TURN[model])
    assert tok.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)
    assert END_OF_TURN[model] not in tok.decode(ids, skip_special=True)


@pytest.mark.slow
def test_stream_concatenates_to_decode_without_replacement_chars(
    tok: Tokenizer, model: str
) -> None:
    for text in texts(model):
        ids = tok.encode(text)
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), text
        assert not any("\ufffd" in p for p in pieces), (text, pieces)
        assert pieces[-1] == "", "a complete text leaves nothing for flush()"


@pytest.mark.slow
def test_stream_holds_back_split_characters(tok: Tokenizer, model: str) -> None:
    ids = tok.encode(RARE, add_bos=False)
    if model == "gemma3":
        assert any(tok.token_text(i).startswith("<0x") for i in ids), "no byte fallback"
    pieces = stream(tok, ids)
    assert "" in pieces[:-1], "some token must end inside a character"
    assert "".join(pieces) == RARE


@pytest.mark.slow
def test_stream_skip_special_and_prompt_context(tok: Tokenizer, model: str) -> None:
    ids = tok.encode(CHAT[model] + "Hi 👩‍💻" + END_OF_TURN[model])
    assert "".join(stream(tok, ids, skip_special=True)) == tok.decode(ids, skip_special=True)
    prompt, answer = tok.encode(CHAT[model]), tok.encode(" Sure, 1234 🇫🇷.", add_bos=False)
    expected = tok.decode(prompt + answer)[len(tok.decode(prompt)) :]
    assert "".join(stream(tok, answer, prompt_ids=prompt)) == expected == " Sure, 1234 🇫🇷."


@pytest.mark.slow
def test_stream_invalid_bytes_still_match_decode(tok: Tokenizer, model: str) -> None:
    lead = tok.backend.token_to_id(LEAD_BYTE[model])
    word = tok.encode("hello", add_bos=False)
    for ids in ([lead], [*word, lead], [lead, *word], [lead] * 9, [*word, lead, lead, *word]):
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), ids


@pytest.mark.slow
def test_special_tokens_and_end_of_generation(tok: Tokenizer, model: str) -> None:
    end = tok.encode(END_OF_TURN[model], add_bos=False)
    assert len(end) == 1 and end[0] in tok.eog_ids
    assert tok.eos_id in tok.eog_ids and tok.is_special(end[0])
    assert tok.token_text(tok.bos_id) == tok.bos_token
    assert tok.token_text(tok.eos_id) == tok.eos_token
    assert not tok.is_special(tok.encode("hello", add_bos=False)[0])
    assert tok.vocab_size == {"smollm2": 49152, "gemma3": 262144}[model]
    if model == "smollm2":
        assert tok.encode("<|endoftext|>")[-1] in tok.eog_ids
    else:
        assert tok.token_text(138) == "  "  # stored with real spaces, built from `▁`s


def _forbid_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_path(self: GGUFFile, key: str) -> None:
        raise AssertionError(f"cached open read {key}")

    monkeypatch.setattr(GGUFFile, "array", slow_path)


@pytest.mark.slow
def test_cached_open_is_fast_and_skips_the_vocabulary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = resolve_model_path("smollm2")
    monkeypatch.setenv("ACCORDION_CACHE", str(tmp_path))
    gf = open_gguf(path)
    built = Tokenizer.from_gguf(gf)
    assert (gf.cache_dir / TOKENIZER_FILE).is_file() and (gf.cache_dir / INFO_FILE).is_file()
    _forbid_arrays(monkeypatch)
    start = time.perf_counter()
    cached = Tokenizer.from_gguf(open_gguf(path))
    assert time.perf_counter() - start < 0.5  # ~0.05 s
    assert cached.encode(CHAT["smollm2"]) == built.encode(CHAT["smollm2"])
    assert cached.info == built.info


@pytest.mark.slow
def test_cached_gemma_open_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    path = resolve_model_path("gemma3")
    Tokenizer.from_gguf(open_gguf(path))  # the cache exists from here on
    _forbid_arrays(monkeypatch)
    start = time.perf_counter()
    cached = Tokenizer.from_gguf(open_gguf(path))
    elapsed = time.perf_counter() - start
    print(f"gemma3 cached from_gguf: {elapsed:.3f}s")
    # ~0.45 s on a slow 2-core box, nearly all of it `tokenizers` building a 262k-token BPE;
    # the bound leaves room for a busy machine while still catching a slow-path rebuild (~9 s).
    assert elapsed < 2
    assert cached.encode(CHAT["gemma3"])[:3] == [2, 105, 2364]


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = resolve_model_path("smollm2")
    monkeypatch.setenv("ACCORDION_CACHE", str(tmp_path))
    gf = open_gguf(path)
    expected = Tokenizer.from_gguf(gf).encode(CORPUS[5])
    (gf.cache_dir / TOKENIZER_FILE).write_text("{not json")
    assert Tokenizer.from_gguf(open_gguf(path)).encode(CORPUS[5]) == expected
    assert Tokenizer.from_gguf(open_gguf(path)).encode(CORPUS[5]) == expected


# Tiny GGUF files written here exercise what the two bundled models do not.


def _write_gguf(path: Path, model: str, tokens: list[str], **fields) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_tokenizer_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ACCORDION_CACHE", str(tmp_path / "cache"))
    path = _write_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "[UNK]", "hello"])
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        Tokenizer.from_gguf(open_gguf(path))


def test_sentencepiece_scores_and_space_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ACCORDION_CACHE", str(tmp_path / "cache"))
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "llo", "hello"]
    pieces += ["▁hello", "▁w", "or", "▁wor", "ld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    path = _write_gguf(
        tmp_path / "spm.gguf",
        "llama",
        tokens,
        token_scores=[0.0] * 259 + [-float(i) for i in range(len(pieces))],
        token_types=[2, 3, 3] + [6] * 256 + [1] * len(pieces),
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
        add_space_prefix=True,
    )
    tok = Tokenizer.from_gguf(open_gguf(path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["hello world", "hello  world", "héllo wörld", "world</s>hello"]:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    # The space prefix: a word streamed after a prompt keeps its space, as in the full text.
    prompt, word = tok.encode("hello"), tok.encode("world", add_bos=False)
    assert tok.token_text(word[0]) == "▁world" and tok.decode(word) == "world"
    assert "".join(stream(tok, word, prompt_ids=prompt)) == " world"


def test_unknown_pre_tokenizer_splits_like_gpt2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ACCORDION_CACHE", str(tmp_path / "cache"))
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ"]
    path = _write_gguf(
        tmp_path / "bpe.gguf",
        "gpt2",
        [*alphabet, "he", "ll", "hell", "hello", "Ġw", "Ġwo", "<|end|>"],
        token_merges=["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"],
        token_types=[1] * (len(alphabet) + 6) + [3],
        tokenizer_pre="mystery",
        eos_token_id=len(alphabet) + 6,
    )
    with caplog.at_level(logging.WARNING):
        tok = Tokenizer.from_gguf(open_gguf(path))
    assert "mystery" in caplog.text
    ids = tok.encode("hello wo<|end|>")
    assert [tok.token_text(i) for i in ids] == ["hello", "Ġwo", "<|end|>"]
    assert tok.eog_ids == {len(alphabet) + 6} and tok.decode(ids, skip_special=True) == "hello wo"
