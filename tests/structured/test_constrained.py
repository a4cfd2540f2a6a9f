"""Constrained decoding in the engine: every output matches its grammar, batched or alone."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jsonschema
import ollama
import openai
import pytest
import torch
from live_server import LiveServer

from accordion import LLM, SamplingParams
from accordion.structured import Grammar, GrammarError

# Nested object, array, enum, integer bounds, required fields; strings and arrays are
# bounded so that a random-weight model (which never chooses to close them) still ends.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir: Path) -> LLM:
    return LLM(str(tiny_dir / "llama.gguf"), "fp32", kv_budget_bytes=64 << 20)


def params(grammar: Grammar, seed: int, **kw: object) -> SamplingParams:
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw}
    return SamplingParams(seed=seed, grammar=grammar, **sampling)  # type: ignore[arg-type]


def test_random_model_output_validates_against_the_schema_for_every_seed(tiny_llm: LLM) -> None:
    grammar = Grammar.json_schema(SCHEMA, "format")
    handles = [tiny_llm.submit([1, 2, 3], params(grammar, s, max_tokens=400)) for s in range(6)]
    for handle in handles:
        out = handle.result()
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert list(json.loads(out.text))[:2] == ["name", "age"]  # the schema's key order


def test_constrained_and_free_sequences_share_a_batch(tiny_llm: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repeat_penalty=1.0)
    alone = tiny_llm.submit([5, 6, 7], free).result().token_ids
    grammar = Grammar.regex(r"[a-f]{4}-[0-9]{2,3}", "structured_outputs.regex")
    mixed = [tiny_llm.submit([5, 6, 7], free)] + [
        tiny_llm.submit([9, 9], params(grammar, seed)) for seed in range(3)
    ]
    results = [h.result() for h in mixed]
    assert results[0].token_ids == alone  # a neighbour's mask never reaches another row
    for out in results[1:]:
        assert re.fullmatch(r"[a-f]{4}-[0-9]{2,3}", out.text), out.text
        assert out.finish_reason == "stop"


def test_choice_ends_as_soon_as_the_choice_is_whole(tiny_llm: LLM) -> None:
    grammar = Grammar.choice(["alpha", "beta", "gamma delta"], "structured_outputs.choice")
    seen = set()
    for seed in range(8):  # hot: the random model's logits are peaked
        out = tiny_llm.submit([3, 4], params(grammar, seed, temperature=20.0)).result()
        assert out.text in {"alpha", "beta", "gamma delta"}
        assert out.finish_reason == "stop"
        assert tiny_llm.tokenizer.decode(out.token_ids) == out.text  # no end token was sampled
        seen.add(out.text)
    assert len(seen) > 1  # sampling still chooses among the allowed


def test_end_of_generation_is_allowed_only_where_the_grammar_accepts(tiny_llm: LLM) -> None:
    eos = min(tiny_llm.tokenizer.eog_ids)
    x, y = (tiny_llm.tokenizer.encode(c, add_bos=False)[0] for c in "xy")
    constraint = tiny_llm.engine.grammars.start(Grammar.regex(r"x+y?", "r"))
    logits = torch.zeros(tiny_llm.model.config.vocab_size)
    logits[eos] = 100.0  # the model's favourite: ending now
    masked = constraint.mask(logits)
    assert masked[eos] == -math.inf and masked[x] == 0 and masked[y] == -math.inf
    constraint.advance(x)  # "x" matches: it may end, or go on
    masked = constraint.mask(logits)
    assert masked[eos] == 100.0 and masked[x] == 0 and masked[y] == 0
    allowed = [int(t) for t in torch.nonzero(masked != -math.inf)]
    ends = tiny_llm.tokenizer.eog_ids  # every end-of-generation token, <|im_end|> too
    assert ends <= set(allowed)
    texts = [tiny_llm.tokenizer.decode([t]) for t in allowed if t not in ends]
    assert all(re.fullmatch(r"x*y?", text) for text in texts), texts  # merged pieces too
    constraint.advance(y)  # "xy": nothing can follow
    assert constraint.finished


def test_lark_grammar_and_gbnf(tiny_llm: LLM) -> None:
    lark = Grammar.lark('start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,2}/', "grammar")
    gbnf = Grammar.lark('root ::= "<" [a-c]{2,4} ">"', "grammar")
    for seed in range(3):
        out = tiny_llm.submit([2], params(lark, seed, max_tokens=60)).result()
        assert re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})*\)", out.text), out.text
        out = tiny_llm.submit([2], params(gbnf, seed)).result()
        assert re.fullmatch(r"<[a-c]{2,4}>", out.text), out.text


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "strin"}, "strin"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "nsatisfiable"),
        ({"type": "object", "required": ["a"], "additionalProperties": False}, "nsatisfiable"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
        ({"$ref": "#/$defs/missing"}, "missing"),
    ],
)
def test_schemas_the_library_cannot_honour_are_refused_by_name(
    tiny_llm: LLM, schema: dict, says: str
) -> None:
    grammar = Grammar.json_schema(schema, "response_format.json_schema.schema")
    with pytest.raises(GrammarError, match=says) as caught:
        tiny_llm.submit([1], params(grammar, 0))
    assert str(caught.value).startswith("response_format.json_schema.schema")
    assert "\n" not in str(caught.value)


def test_compiled_grammars_are_cached_and_each_sequence_gets_its_own_state(
    tiny_llm: LLM,
) -> None:
    grammar = Grammar.json_schema(SCHEMA, "format")
    compiler = tiny_llm.engine.grammars
    assert compiler.compile(grammar) is compiler.compile(grammar)
    doc = '{"name": "a", "age": 1, "role": "user", "address": {"city": "b", "zip": 12345}}'
    a, b = compiler.start(grammar), compiler.start(grammar)
    for token in tiny_llm.tokenizer.encode(doc, add_bos=False):
        a.advance(token)
    assert a.finished and not b.finished  # b still starts from nothing
    with pytest.raises(RuntimeError, match="grammar"):
        b.advance(tiny_llm.tokenizer.encode("}", add_bos=False)[0])


def test_a_random_model_through_both_apis_validates_every_time(
    live: LiveServer, tool_model: Path
) -> None:
    ask = [{"role": "user", "content": "A person, please."}]
    local = ollama.Client(host=live.url, timeout=120)
    for seed in range(4):
        options = {"seed": seed, "temperature": 1.0, "num_predict": 400}
        reply = local.chat(str(tool_model), messages=ask, format=SCHEMA, options=options)
        assert reply.done_reason == "stop"
        jsonschema.validate(json.loads(reply.message.content), SCHEMA)
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        done = client.chat.completions.create(
            model=str(tool_model),
            messages=ask,  # type: ignore[arg-type]
            response_format=fmt,  # type: ignore[arg-type]
            seed=seed,
            temperature=1.0,
            max_tokens=400,
        )
        assert done.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(done.choices[0].message.content), SCHEMA)
