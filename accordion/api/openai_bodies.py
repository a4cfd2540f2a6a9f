"""OpenAI request bodies and the checks a route makes before it loads a model.

The bodies are pydantic models, strict where a silent coercion would change meaning
("hot" or true for a number is a 400). The checks here are shared by the /v1 routes
and the batch runner's first pass, so a batch line that passes is one the route accepts.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from accordion.api import choices, constraints, prompts, tools
from accordion.api.options import with_params
from accordion.errors import InvalidRequestError
from accordion.sampling_params import MAX_LOGPROBS
from accordion.structured import Grammar

# Strict so that "hot" or true is a 400 rather than silently coerced; ints still pass as floats.
Num = Annotated[float, Field(strict=True)]
Count = Annotated[int, Field(strict=True, ge=0)]
Int = Annotated[int, Field(strict=True)]
Flag = Annotated[bool, Field(strict=True)]

MAX_CHOICES = 16  # n: each choice is a request of its own in the queue
ROLES = {"system", "developer", "user", "assistant", "tool"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Flag = False


class GenerationBody(BaseModel):
    # Unknown OpenAI fields (user, metadata, store, ...) are accepted and ignored.
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: Num | None = None
    top_p: Num | None = None
    max_tokens: Count | None = None
    stop: str | list[str] | None = None
    seed: Int | None = None
    presence_penalty: Num | None = None
    frequency_penalty: Num | None = None
    n: Int | None = None
    stream: Flag = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None  # on completions too, as vLLM has it
    structured_outputs: dict[str, Any] | None = None  # vLLM's extension
    # accordion extras
    num_ctx: Int | None = None
    truncate: Flag = True
    top_k: Int | None = None
    min_p: Num | None = None
    repeat_penalty: Num | None = None
    ignore_eos: Flag = False  # vLLM's and llama.cpp's, which benchmark tools send
    options: dict[str, Any] | None = None

    def num_predict(self) -> int | None:
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return None


class ChatBody(GenerationBody):
    messages: list[dict[str, Any]]
    max_completion_tokens: Count | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: Flag | None = None
    logprobs: Flag | None = None
    top_logprobs: Count | None = None

    def num_predict(self) -> int | None:
        if self.max_completion_tokens is not None:  # max_tokens is deprecated for chat
            return self.max_completion_tokens
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionBody(GenerationBody):
    prompt: Any = None  # checked by hand: token-id prompts deserve a clearer 400
    echo: Flag = False
    suffix: str | None = None
    best_of: Int | None = None
    logprobs: Count | None = None  # legacy: how many alternatives, 0 for the chosen alone

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: Any = None
    encoding_format: str = "float"
    dimensions: Int | None = None
    truncate: Flag = True


def check_unsupported(body: GenerationBody) -> None:
    if body.n is not None and not 1 <= body.n <= MAX_CHOICES:
        raise InvalidRequestError(f"n must be in [1, {MAX_CHOICES}], got {body.n}")
    if isinstance(body, ChatBody):
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs: true")
        tools.check_tools(body.tools)
        tools.forced_name(body.tool_choice, body.tools)
    top = body.top_logprobs_count()
    if top is not None and top > MAX_LOGPROBS:
        field = "top_logprobs" if isinstance(body, ChatBody) else "logprobs"
        raise InvalidRequestError(f"{field} must be at most {MAX_LOGPROBS}, got {top}")
    if isinstance(body, CompletionBody):
        if body.suffix:
            raise InvalidRequestError(
                f"model '{body.model}' does not support insert (suffix): its template has"
                " no fill-in-the-middle"
            )
        if body.best_of not in (None, 1, body.n):
            raise InvalidRequestError("best_of other than n is not supported")
    logit_bias(body)


def logit_bias(body: GenerationBody) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids as strings; values are checked with the rest
    of the sampling parameters."""
    out: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequestError(f"logit_bias[{key!r}] must be a number, got {value!r}")
        out[int(key)] = float(value)
    return out


def refine(body: GenerationBody, prepared: prompts.Prepared) -> None:
    """The sampling fields Ollama's options do not carry, set on the prepared request."""
    prepared.options.params = with_params(
        prepared.options.params,
        logit_bias=logit_bias(body),
        logprobs=body.top_logprobs_count(),
        ignore_eos=body.ignore_eos,
    )


def shape_of(
    body: GenerationBody, chat: bool, plan: tools.ToolPlan | None = None, echo: str = ""
) -> choices.Shape:
    """`echo`: the prompt's text, for completions that echo it."""
    return choices.Shape(chat, n=body.n or 1, top=body.top_logprobs_count(), echo=echo, tools=plan)


def request_grammar(body: GenerationBody) -> Grammar | None:
    """The output constraint the body asks for (checked, not yet compiled)."""
    return constraints.one_of(
        ("response_format", constraints.from_response_format(body.response_format)),
        ("structured_outputs", constraints.from_structured_outputs(body.structured_outputs)),
    )


def ollama_options(body: GenerationBody) -> dict[str, Any]:
    """The request's Ollama options: its `options` dict, then OpenAI's fields on top."""
    explicit = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repeat_penalty": body.repeat_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop": body.stop,
        "num_ctx": body.num_ctx,
        "num_predict": body.num_predict(),
    }
    return {**(body.options or {}), **{k: v for k, v in explicit.items() if v is not None}}


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as templates expect them; content itself is checked by prepare_chat."""
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}, got {role!r}"
            )
        message = {**message, "role": "system" if role == "developer" else role}
        if message.get("tool_calls"):  # OpenAI sends arguments as JSON text; templates want dicts
            message["tool_calls"] = [_parsed_call(c) for c in message["tool_calls"]]
        out.append(message)
    return out


def _parsed_call(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            return {**call, "function": {**fn, "arguments": json.loads(fn["arguments"])}}
        except json.JSONDecodeError:
            pass  # leave it as text; the template decides what to do with it
    return call


def completion_prompt(value: Any) -> str | list[int]:
    """One prompt: text, or token ids (as LangChain and harnesses send), alone or in a
    list of one."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str) or _token_ids(value):
        return value
    raise InvalidRequestError(
        "prompt must be a string or a list of token ids (or a list of exactly one of them)"
    )


def embedding_texts(value: Any) -> list[str | list[int]]:
    """Texts or token-id lists: a string, a list of ids, or a list of either."""
    if isinstance(value, str) or _token_ids(value):
        return [value]
    each = isinstance(value, list) and all(isinstance(t, str) or _token_ids(t) for t in value)
    if each and value:
        return value
    raise InvalidRequestError(
        "input must be a string, a list of token ids, or a non-empty list of either"
    )


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )
