"""Structured outputs through a real server and the official `ollama` and `openai` clients."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import ollama
import openai
import pytest
from live_server import LiveServer
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

MODEL = "smollm2"
ASK = [{"role": "user", "content": "Invent a person: their name, age and favourite colour."}]


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=130)
    colour: Literal["red", "green", "blue"]


def test_ollama_chat_format_schema_parses_into_the_model(ollama_client: ollama.Client) -> None:
    for seed in range(3):
        reply = ollama_client.chat(
            MODEL,
            messages=ASK,
            format=Person.model_json_schema(),
            options={"seed": seed, "temperature": 0.7, "num_predict": 200},
        )
        person = Person.model_validate_json(reply.message.content)
        assert 0 <= person.age <= 130
        assert reply.done_reason == "stop"


def test_ollama_streamed_generate_in_json_mode(ollama_client: ollama.Client) -> None:
    chunks = list(
        ollama_client.generate(
            MODEL,
            prompt='Name one fruit as a JSON object with the key "fruit".',
            format="json",
            stream=True,
            options={"temperature": 0, "num_predict": 200},
        )
    )
    doc = json.loads("".join(c.response for c in chunks))
    assert isinstance(doc, dict)
    assert chunks[-1].done and chunks[-1].done_reason == "stop"


def test_openai_parse_returns_a_parsed_object(openai_client: openai.OpenAI) -> None:
    done = openai_client.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Person, temperature=0, max_tokens=200
    )
    parsed = done.choices[0].message.parsed
    assert isinstance(parsed, Person)
    assert done.choices[0].finish_reason == "stop"


def test_openai_json_schema_strict_streamed(openai_client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "facts": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
        },
        "required": ["city", "facts"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}}
    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about Paris."}],
        response_format=fmt,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=300,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_vllm_structured_outputs_on_completions(openai_client: openai.OpenAI) -> None:
    done = openai_client.completions.create(
        model=MODEL,
        prompt="Is the sky blue? Answer:",
        max_tokens=10,
        temperature=0,
        extra_body={"structured_outputs": {"choice": [" yes", " no"]}},
    )
    assert done.choices[0].text in (" yes", " no")
    done = openai_client.completions.create(
        model=MODEL,
        prompt="A US phone number:",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"regex": r" \([0-9]{3}\) [0-9]{3}-[0-9]{4}"}},
    )
    assert len(done.choices[0].text) == len(" (555) 123-4567")


@pytest.mark.parametrize(
    ("route", "extra", "says"),
    [
        ("/api/chat", {"format": "yaml"}, 'format must be "json" or a JSON schema'),
        ("/api/chat", {"format": {"type": "strin"}}, "format is not supported: Invalid type"),
        ("/api/generate", {"format": {"enum": []}}, "format"),
        (
            "/api/generate",
            {"format": {"type": "integer", "minimum": 3, "maximum": 1}},
            "nsatisfiable",
        ),
    ],
)
def test_ollama_bad_formats_are_400s_naming_format(
    server: LiveServer, route: str, extra: dict, says: str
) -> None:
    body = {"model": MODEL, "stream": False, **extra}
    body |= {"messages": ASK} if route == "/api/chat" else {"prompt": "hi"}
    r = httpx.post(server.url + route, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "'schema'"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {}}}}},
            "response_format.json_schema.schema is not supported: Unimplemented keys",
        ),
        (
            {
                "response_format": {"type": "json_object"},
                "structured_outputs": {"regex": "a+"},
            },
            "response_format and structured_outputs both",
        ),
        ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "exactly one"),
        ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"xml": "<a/>"}}, "does not support xml"),
    ],
)
def test_openai_bad_constraints_are_400s_naming_the_field(
    server: LiveServer, body: dict, says: str
) -> None:
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, **body},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
