"""Tool calls: parsing by the template's format, forcing by tool_choice, both official clients."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import ollama
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from live_server import LiveServer
from tiny_gguf import TOOLS_TEMPLATE as TEMPLATE

from accordion import LLM, SamplingParams
from accordion.loader.chat_template import ChatTemplate
from accordion.structured.tools import ToolParser, call_grammar, tool_format

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'


def parse_in_pieces(fmt: str, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, dict]]]:
    parser = ToolParser(fmt, ["get_weather", "get_time"])
    content, calls = "", []
    bounds = [0, *sorted(set(cuts)), len(text)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        piece, found = parser.feed(text[a:b])
        content, calls = content + piece, calls + found
    piece, found = parser.finish()
    return content + piece, [(c.name, c.arguments) for c in calls + found]


@pytest.mark.parametrize(
    ("fmt", "text", "content", "names"),
    [
        ("hermes", f"Let me check.\n<tool_call>\n{CALL}\n</tool_call>", "Let me check.\n", 1),
        ("hermes", f"<tool_call>{CALL}</tool_call>\n<tool_call>{CALL}</tool_call>", "\n", 2),
        ("hermes", f"<tool_call>\n{CALL}", "", 1),  # left open: still a call
        ("hermes", "<tool_call>not json</tool_call> ok", "<tool_call>not json</tool_call> ok", 0),
        ("hermes", CALL, "", 1),  # no tags: the whole output is the call
        ("hermes", '{"answer": 42}', '{"answer": 42}', 0),  # JSON, but not a call
        ("hermes", "Use <tool_ for that", "Use <tool_ for that", 0),
        ("mistral", f"[TOOL_CALLS][{CALL}, {CALL}]", "", 2),
        ("llama3", '<|python_tag|>{"name": "get_time", "parameters": {"zone": 2}}', "", 1),
        ("json", f"[{CALL}]", "", 1),
        (
            "json",
            '{"name": "unknown_tool", "arguments": {}}',
            '{"name": "unknown_tool", "arguments": {}}',
            0,
        ),  # fmt: skip
    ],
)
def test_parser_splits_content_and_calls(fmt: str, text: str, content: str, names: int) -> None:
    got, calls = parse_in_pieces(fmt, text, [])
    assert got == content and len(calls) == names
    for name, args in calls:
        jsonschema.validate(args, SCHEMAS[name])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=120), max_size=12))
def test_how_the_text_is_cut_changes_nothing(cuts: list[int]) -> None:
    text = f"Sure.\n<tool_call>\n{CALL}\n</tool_call>\nAnd <tool_call>bad</tool_call> done."
    assert parse_in_pieces("hermes", text, cuts) == parse_in_pieces("hermes", text, [])


def test_streamed_content_never_shows_a_tag_that_becomes_a_call() -> None:
    parser = ToolParser("hermes", ["get_weather"])
    shown = ""
    for ch in f"Hi <tool_call>{CALL}</tool_call>":
        shown += parser.feed(ch)[0]
        assert "<" not in shown
    assert shown == "Hi "


def test_formats_come_from_the_template() -> None:
    assert tool_format(TEMPLATE) == "hermes"
    assert tool_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert tool_format("{% if tools %}<|python_tag|>{% endif %}") == "llama3"
    assert tool_format("{% if tools %}{{ tools | tojson }}{% endif %}") == "json"


def test_required_and_named_calls_are_valid_even_from_a_random_model(tool_model: Path) -> None:
    llm = LLM(str(tool_model), "fp32", kv_budget_bytes=64 << 20)
    prompt = llm.model.encode_chat(ASK, tools=TOOLS)
    for name in (None, "get_time"):
        # one call: the random model would go on adding parallel calls up to their cap
        grammar = call_grammar("hermes", TOOLS, name, parallel=False, field="tool_choice")
        for seed in range(4):
            params = SamplingParams(temperature=1.0, seed=seed, max_tokens=300, grammar=grammar)
            out = llm.submit(prompt, params).result()
            assert out.finish_reason == "stop", out.text
            content, calls = parse_in_pieces("hermes", out.text, [])
            assert calls and content.strip() == ""
            for called, args in calls:
                assert name in (None, called)
                jsonschema.validate(args, SCHEMAS[called])
    llm.close()


@pytest.fixture(scope="module")
def oai(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)


def check_calls(calls: list, name: str | None = None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert name in (None, call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_openai_tool_choice_forces_a_valid_call(
    oai: openai.OpenAI, tool_model: Path, choice: object
) -> None:
    name = None if choice == "required" else "get_time"
    args = {
        "model": str(tool_model),
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": choice,
        "parallel_tool_calls": False,
    }
    done = oai.chat.completions.create(**args, seed=1, max_tokens=300)  # type: ignore[arg-type]
    assert done.choices[0].finish_reason == "tool_calls"
    check_calls(done.choices[0].message.tool_calls, name)
    with oai.chat.completions.stream(**args, seed=2, max_tokens=300) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    check_calls(final.choices[0].message.tool_calls, name)


def test_openai_auto_parses_what_the_model_writes(oai: openai.OpenAI, tool_model: Path) -> None:
    # the model is made to write exactly this (a grammar of one choice); auto parses it
    scripted = {"choice": [f"Checking.\n<tool_call>\n{CALL}\n</tool_call>"]}
    args = {"model": str(tool_model), "messages": ASK, "tools": TOOLS}
    done = oai.chat.completions.create(**args, extra_body={"structured_outputs": scripted})
    message = done.choices[0].message
    assert message.content == "Checking.\n" and done.choices[0].finish_reason == "tool_calls"
    check_calls(message.tool_calls, "get_weather")
    assert json.loads(message.tool_calls[0].function.arguments)["city"] == "Paris"
    chunks = list(
        oai.chat.completions.create(
            **args, stream=True, extra_body={"structured_outputs": scripted}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert text == "Checking.\n" and len(deltas) == 1 and deltas[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_ollama_parses_calls_and_streams_each_whole(live: LiveServer, tool_model: Path) -> None:
    client = ollama.Client(host=live.url, timeout=120)
    call_schema = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": SCHEMAS["get_weather"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    reply = client.chat(str(tool_model), messages=ASK, tools=TOOLS, format=call_schema)
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_weather" and not reply.message.content
    jsonschema.validate(dict(call.function.arguments), SCHEMAS["get_weather"])
    chunks = list(
        client.chat(str(tool_model), messages=ASK, tools=TOOLS, format=call_schema, stream=True)
    )
    with_calls = [c for c in chunks if c.message.tool_calls]
    assert len(with_calls) == 1 and len(with_calls[0].message.tool_calls) == 1
    assert "".join(c.message.content or "" for c in chunks) == ""
    # the call and its result go back through the template
    history = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "content": "18 degrees and sunny"},
    ]
    again = client.chat(str(tool_model), messages=history, tools=TOOLS, options={"num_predict": 4})
    assert again.done
    rendered = ChatTemplate(TEMPLATE).render(history, add_generation_prompt=True, tools=TOOLS)
    assert '"arguments": {"city": ' in rendered
    assert "<tool_response>\n18 degrees and sunny\n</tool_response>" in rendered


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
        ({"tool_choice": "sometimes"}, "tool_choice must be"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "both"),
        ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "name"),
    ],
)
def test_bad_tool_requests_are_400s(live: LiveServer, tool_model: Path, extra: dict, says: str):
    body = {"model": str(tool_model), "messages": ASK, "tools": TOOLS, **extra}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]
