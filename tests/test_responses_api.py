"""OpenAI's Responses API through the official openai_client: text, streaming, conversations by
previous_response_id, structured text, function calls, errors."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from live_server import LiveServer

pytestmark = pytest.mark.slow

MODEL = "smollm2"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def test_create_answers_with_text_and_usage(openai_client: openai.OpenAI) -> None:
    done = openai_client.responses.create(
        model=MODEL,
        instructions="Answer in one short sentence.",
        input="What is the capital of France?",
        temperature=0,
        max_output_tokens=24,
    )
    assert done.object == "response" and done.id.startswith("resp_")
    assert "Paris" in done.output_text
    assert done.output[0].type == "message" and done.output[0].role == "assistant"
    u = done.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= 24
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert openai_client.responses.retrieve(done.id).output_text == done.output_text


def test_streaming_events_assemble_the_same_text(openai_client: openai.OpenAI) -> None:
    args = {"model": MODEL, "input": "Say hello.", "temperature": 0, "max_output_tokens": 12}
    whole = openai_client.responses.create(**args)
    events = list(openai_client.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with openai_client.responses.stream(**args) as stream:
        assert stream.get_final_response().output_text == whole.output_text


def test_previous_response_id_continues_the_conversation(openai_client: openai.OpenAI) -> None:
    first = openai_client.responses.create(
        model=MODEL, input="My name is Ada.", temperature=0, max_output_tokens=8
    )
    second = openai_client.responses.create(
        model=MODEL,
        input="What is my name?",
        previous_response_id=first.id,
        temperature=0,
        max_output_tokens=8,
    )
    alone = openai_client.responses.create(
        model=MODEL, input="What is my name?", temperature=0, max_output_tokens=8
    )
    # the first turn and its answer are in the second's prompt
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id
    unstored = openai_client.responses.create(
        model=MODEL, input="Hi", store=False, max_output_tokens=2
    )
    with pytest.raises(openai.BadRequestError, match="not stored"):
        openai_client.responses.create(model=MODEL, input="x", previous_response_id=unstored.id)


def test_text_format_json_schema(openai_client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    done = openai_client.responses.create(
        model=MODEL,
        input="Name a city and its country.",
        text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
        temperature=0,
        max_output_tokens=60,
    )
    assert set(json.loads(done.output_text)) == {"city", "country"}


def test_function_calls_and_their_outputs(live: LiveServer, tool_model: Path) -> None:
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
    done = client.responses.create(
        model=str(tool_model),
        input="Weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=200,
    )
    (call,) = [item for item in done.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    follow = client.responses.create(
        model=str(tool_model),
        previous_response_id=done.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18C"}],
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=4,
    )
    assert follow.usage.input_tokens > done.usage.input_tokens
    events = list(
        client.responses.create(
            model=str(tool_model),
            input="Weather?",
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "name": "get_weather"},
            stream=True,
            max_output_tokens=200,
        )
    )
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [i.type for i in added] == ["function_call"]
    assert events[-1].response.output[0].name == "get_weather"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input_image"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "web_search"),
        ({"input": "x", "previous_response_id": "resp_nope"}, "not stored"),
    ],
)
def test_bad_requests_are_400s(server: LiveServer, body: dict, says: str) -> None:
    r = httpx.post(server.url + "/v1/responses", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/responses/resp_nope", timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
