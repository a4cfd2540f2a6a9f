"""The Responses API's items: input items to chat messages, and the output built as text
streams in: a message item with its text, function_call items for parsed tool calls,
and the event sequence a streaming client reads."""

from __future__ import annotations

import json
import uuid
from typing import Any

from accordion.engine.request import RequestOutput
from accordion.errors import InvalidRequestError
from accordion.structured.tools import ToolCall, ToolParser

TEXT_PARTS = ("input_text", "output_text", "text")


def chat_input(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`input` as chat messages: text is one user message; items are messages,
    function calls (an assistant's tool call) and their outputs (tool results)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            out.append({"role": role, "content": _text(item.get("content"), i)})
        elif kind == "function_call":
            args = item.get("arguments") or "{}"
            call = {"id": item.get("call_id"), "type": "function"}
            call["function"] = {"name": item.get("name"), "arguments": args}
            out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else json.dumps(output)
            out.append({"role": "tool", "content": text, "tool_call_id": item.get("call_id")})
        else:
            raise InvalidRequestError(f"input[{i}].type {kind!r} is not supported")
    return out


def _text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequestError(f"input[{index}].content: {kind!r} is not supported")
            parts.append(part.get("text", ""))
        return "".join(parts)
    raise InvalidRequestError(f"input[{index}].content must be text or a list of text parts")


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses tools are flat (`{"type": "function", "name", "parameters"}`)."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise InvalidRequestError(f"tools[{i}].type {tool.get('type')!r} is not supported")
        fn = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        out.append({"type": "function", "function": fn})
    return out


class Output:
    """The response's output items, grown from the text as it comes."""

    def __init__(self, parser: ToolParser | None) -> None:
        self.parser = parser
        self.text = ""
        self.calls: list[ToolCall] = []
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.opened = False  # the message item was announced
        self.sequence = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        doc = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(doc)}\n\n".encode()

    def feed(self, text: str, done: bool = False) -> list[bytes]:
        """Take output text; the events it makes (a stream sends them, a whole answer
        drops them)."""
        content, calls = self.parser.feed(text) if self.parser else (text, [])
        if done and self.parser:
            rest, more = self.parser.finish()
            content, calls = content + rest, calls + more
        events = []
        if content:
            if not self.opened:
                self.opened = True
                events.append(self._item("added", 0, self._message("in_progress")))
                events.append(self._text_event("content_part.added", part=_part("")))
            self.text += content
            events.append(self._text_event("output_text.delta", delta=content))
        for call in calls:
            index = int(self.opened) + len(self.calls)
            self.calls.append(call)
            item = _call_item(call)
            events.append(self._item("added", index, item))
            events.append(
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
            events.append(self._item("done", index, item))
        if done and self.opened:
            events.append(self._text_event("output_text.done", text=self.text))
            events.append(self._text_event("content_part.done", part=_part(self.text)))
            events.append(self._item("done", 0, self._message("completed")))
        return events

    def _item(self, state: str, index: int, item: dict[str, Any]) -> bytes:
        return self.event(f"response.output_item.{state}", output_index=index, item=item)

    def _text_event(self, kind: str, **fields: Any) -> bytes:
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        return self.event(f"response.{kind}", **where, **fields)

    def pending(self) -> dict[str, Any]:
        return {"status": "in_progress", "output": [], "usage": None, "incomplete_details": None}

    def final(self, out: RequestOutput) -> dict[str, Any]:
        items = [self._message("completed")] if self.text.strip() or not self.calls else []
        items += [_call_item(c) for c in self.calls]
        cut = out.finish_reason == "length"
        completion = len(out.token_ids)
        return {
            "status": "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "output": items,
            "usage": {
                "input_tokens": out.prompt_tokens,
                "input_tokens_details": {"cached_tokens": out.cached_tokens},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": out.prompt_tokens + completion,
            },
        }

    def as_messages(self) -> list[dict[str, Any]]:
        """The output as chat messages, for a later previous_response_id."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }  # fmt: skip
                for c in self.calls
            ]
        return [message]

    def _message(self, status: str) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [_part(self.text)] if status == "completed" else [],
        }


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _call_item(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{call.id.removeprefix('call_')}",
        "call_id": call.id,
        "name": call.name,
        "arguments": json.dumps(call.arguments),
        "status": "completed",
    }
