"""Write tiny random-weight GGUF models with gguf's writer, for fast engine tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants

Q = GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A ChatML template that offers tools the Hermes / Qwen 2.5 way
TOOLS_TEMPLATE = (Path(__file__).parent / "data" / "tools_template.jinja").read_text()


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    ffn: int = 128
    context: int = 2048
    window: int = 0  # gemma3: sliding window of the local layers
    quant: Q = Q.Q4_0  # type of the big matrices (F32, F16, Q4_0, Q4_1, Q8_0)
    seed: int = 0
    vocab: int = 0  # pad the byte vocabulary with filler tokens up to this size (0: don't)
    embed_quant: Q = Q.F32  # type of token_embd (real files quantize it like the rest)
    # per-tensor types by name ending, e.g. Q4_K_M's (("attn_v.weight", Q.Q6_K), ...)
    overrides: tuple[tuple[str, Q], ...] = ()
    chat_template: str = ""  # tokenizer.chat_template, if any


K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


def k_quant_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: Q) -> np.ndarray:
    """Random K-quant blocks, [rows, row bytes]: gguf's Python has no K-quant quantizer,
    so values and sub-block scales are random bytes and the super-block scales small
    enough that activations stay finite through many layers."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)
    top = 4e-5 if qtype == Q.Q6_K else 2e-4  # Q6_K's sub-scales are int8, the others 6-bit

    def scales() -> np.ndarray:
        d = rng.uniform(top / 4, top, raw.shape[:2]).astype(np.float16)
        return d.view(np.uint8).reshape(*raw.shape[:2], 2)

    if qtype == Q.Q6_K:
        raw[..., 208:210] = scales()
    else:  # d and dmin
        raw[..., 0:2], raw[..., 2:4] = scales(), scales()
    return raw.reshape(rows, -1)


def _byte_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary: 256 byte symbols, a few merges, three specials."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    tokens = [mapping[b] for b in range(256)]
    space = mapping[ord(" ")]
    merges = [f"{space} t", "h e", f"{space}t he", "i n", "e r", f"{space} a", "o n", "r e"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    return tokens + SPECIALS, merges


def _matrix(rng: np.random.Generator, rows: int, cols: int, scale: float) -> np.ndarray:
    return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)


def write_tiny(path: Path, spec: TinySpec) -> Path:
    rng = np.random.default_rng(spec.seed)
    tokens, merges = _byte_vocab()
    specials = tokens[-len(SPECIALS) :]
    fillers = [f"<filler{i}>" for i in range(max(0, spec.vocab - len(tokens)))]
    tokens = tokens[: -len(SPECIALS)] + fillers + specials
    vocab = len(tokens)
    w = GGUFWriter(str(path), spec.arch)
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.hidden)
    w.add_block_count(spec.layers)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_freq_base(10000.0 if spec.arch != "gemma3" else 1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    if spec.window:
        w.add_sliding_window(spec.window)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - len(SPECIALS)) + [3] * len(SPECIALS))
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 1)
    w.add_add_bos_token(False)
    if spec.chat_template:
        w.add_chat_template(spec.chat_template)

    def big(name: str, rows: int, cols: int, scale: float = 0.08) -> None:
        qtype = next((t for end, t in spec.overrides if name.endswith(end)), spec.quant)
        if qtype in K_QUANTS:
            w.add_tensor(name, k_quant_blocks(rng, rows, cols, qtype), raw_dtype=qtype)
            return
        m = _matrix(rng, rows, cols, scale)
        if qtype in (Q.F32,):
            w.add_tensor(name, m)
        elif qtype == Q.F16:
            w.add_tensor(name, m.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(m, qtype), raw_dtype=qtype)

    def vec(name: str, n: int, around: float = 1.0) -> None:
        w.add_tensor(name, (around + 0.1 * rng.standard_normal(n)).astype(np.float32))

    q_dim, kv_dim = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    embed = _matrix(rng, vocab, spec.hidden, 0.5)
    if spec.embed_quant in K_QUANTS:
        raw = k_quant_blocks(rng, vocab, spec.hidden, spec.embed_quant)
        w.add_tensor("token_embd.weight", raw, raw_dtype=spec.embed_quant)
    elif spec.embed_quant == Q.F32:
        w.add_tensor("token_embd.weight", embed)
    else:
        w.add_tensor(
            "token_embd.weight",
            quants.quantize(embed, spec.embed_quant),
            raw_dtype=spec.embed_quant,
        )
    vec("output_norm.weight", spec.hidden)
    for i in range(spec.layers):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", spec.hidden)
        big(p + "attn_q.weight", q_dim, spec.hidden)
        big(p + "attn_k.weight", kv_dim, spec.hidden)
        big(p + "attn_v.weight", kv_dim, spec.hidden)
        big(p + "attn_output.weight", spec.hidden, q_dim)
        vec(p + "ffn_norm.weight", spec.hidden)
        big(p + "ffn_gate.weight", spec.ffn, spec.hidden)
        big(p + "ffn_up.weight", spec.ffn, spec.hidden)
        big(p + "ffn_down.weight", spec.hidden, spec.ffn)
        if spec.arch == "qwen2":
            for x, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                vec(f"{p}attn_{x}.bias", n, 0.0)
        if spec.arch in ("qwen3", "gemma3"):
            vec(p + "attn_q_norm.weight", spec.head_dim)
            vec(p + "attn_k_norm.weight", spec.head_dim)
        if spec.arch == "gemma3":
            vec(p + "post_attention_norm.weight", spec.hidden)
            vec(p + "post_ffw_norm.weight", spec.hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
