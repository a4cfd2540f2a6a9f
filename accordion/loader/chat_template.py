"""Render a model's chat template the way transformers' `apply_chat_template` does.

GGUF files carry the Hugging Face Jinja template as `tokenizer.chat_template`. We
build the same sandboxed Jinja environment transformers builds (same options,
filters and globals), so a prompt rendered here is byte-identical to the one the
model was trained and evaluated with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import cache, lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from accordion.errors import InvalidRequestError, TemplateError
from accordion.loader.gguf_file import GGUFFile
from accordion.loader.go_template import GoTemplate, is_go_template
from accordion.loader.ollama_template import render_ollama

GGUF_TEMPLATE_KEY = "tokenizer.chat_template"

# Base models have no template: a plain "Role: text" transcript ending in an "Assistant:" cue
# is what a base model continues most naturally, and it stays readable in logs.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] or '' }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# A rendered prompt longer than this is refused: tokenizing 8 MiB takes seconds already,
# and a template (a created model's own) must not be able to build gigabytes.
MAX_RENDER_CHARS = 8 << 20

# Names a message's reasoning travels under; transformers copies it to the two templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template rejected the conversation: {message}")


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes '<' '>' '&', which would corrupt prompts.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_SIZED = (str, list, tuple)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus a bound on what `*`, `+` and `**` may build in one operation
    (the sandbox already bounds `range`); the output is bounded in `render`."""

    intercepted_binops = frozenset(["*", "+", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "+":  # templates concatenate in every loop: keep this path short
            if isinstance(left, _SIZED) and isinstance(right, _SIZED):
                built = len(left) + len(right)
            else:
                built = 0
        elif operator == "*":
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            built = len(sized) * count if isinstance(sized, _SIZED) and _ints(count) else 0
        else:  # **: the bits of the result
            built = abs(right) * max(abs(left), 2).bit_length() if _ints(left, right) else 0
        if built > MAX_RENDER_CHARS:
            raise SecurityError(f"template expression too large ({operator})")
        return self.binop_table[operator](left, right)


def _ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    # Templates come from downloaded files, so they run sandboxed and cannot mutate inputs.
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _template_line(exc: BaseException) -> int | None:
    """The template line an error came from; Jinja maps template frames to '<template>'."""
    line = getattr(exc, "lineno", None)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _describe(exc: BaseException) -> str:
    line = _template_line(exc)
    where = f" (template line {line})" if line else ""
    return f"{type(exc).__name__}{where}: {exc}"


@lru_cache(maxsize=32)
def _compile(source: str) -> tuple[jinja2.Template, frozenset[str]]:
    env = _environment()
    try:
        variables = frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))
        return env.from_string(source), variables
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template does not compile: {_describe(e)}") from None


def _flatten_content(index: int, content: Any) -> str:
    """OpenAI clients may send content as [{'type': 'text', 'text': ...}, ...]."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"messages[{index}].content must be a string or a list of text parts,"
            f" got {type(content).__name__}"
        )
    texts = []
    for part in content:
        if not (isinstance(part, Mapping) and part.get("type") == "text"):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequestError(
                f"messages[{index}].content: only text parts are supported, got {kind!r}"
            )
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(
                f"messages[{index}].content: a text part needs a string 'text'"
            )
        texts.append(part["text"])
    # Joined with newlines, as llama.cpp and vLLM do for templates that expect plain strings.
    return "\n".join(texts)


def _normalize_message(index: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise InvalidRequestError(
            f"messages[{index}] must be an object with 'role' and 'content',"
            f" got {type(message).__name__}"
        )
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidRequestError(f"messages[{index}] needs a non-empty string 'role'")
    out = dict(message)
    content = message.get("content")
    # OpenAI lets an assistant message that only calls tools omit its content.
    if not (content is None and message.get("tool_calls")):
        if "content" not in message:
            raise InvalidRequestError(f"messages[{index}] ({role}) has no 'content'")
        out["content"] = _flatten_content(index, content)
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and flatten list content; raise InvalidRequestError if malformed."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects")
    return [_normalize_message(i, m) for i, m in enumerate(messages)]


class ChatTemplate:
    """A model's chat template, compiled once; `render` turns messages into a prompt."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self._has_template = bool(source and source.strip())
        self._source = source if self._has_template else FALLBACK_TEMPLATE
        self.bos_token = bos_token
        self.eos_token = eos_token
        # Compiling up front turns a broken template into an error at load time, not mid-request.
        self._go = GoTemplate(self._source) if is_go_template(self._source) else None
        if self._go is not None:  # an Ollama Modelfile's TEMPLATE
            self._variables = frozenset({"tools"} if ".Tools" in self._source else ())
        else:
            self._template, self._variables = _compile(self._source)

    @classmethod
    def from_gguf(cls, gf: GGUFFile, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        source = gf.metadata.get(GGUF_TEMPLATE_KEY)
        return cls(source if isinstance(source, str) else None, bos_token, eos_token)

    @property
    def has_template(self) -> bool:
        return self._has_template

    @property
    def supports_tools(self) -> bool:
        return "tools" in self._variables

    @property
    def source(self) -> str:
        return self._source

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **extra: Any,
    ) -> str:
        context: dict[str, Any] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            # transformers always passes `documents` (None unless given), so we do too.
            "documents": None,
            **extra,
            "messages": normalize_messages(messages),
            "add_generation_prompt": add_generation_prompt,
            # Passed even when None, as transformers does: `tools is defined` must agree.
            "tools": tools,
        }
        try:
            if self._go is not None:
                return render_ollama(self._go, context["messages"], tools, MAX_RENDER_CHARS)
            return self._bounded(context)
        except (TemplateError, InvalidRequestError):
            raise
        except Exception as e:  # any failure inside template code is the template's fault
            raise TemplateError(f"chat template failed to render: {_describe(e)}") from None

    def _bounded(self, context: dict[str, Any]) -> str:
        pieces, size = [], 0
        for piece in self._template.generate(**context):
            size += len(piece)
            if size > MAX_RENDER_CHARS:
                raise InvalidRequestError(
                    f"the rendered prompt is over {MAX_RENDER_CHARS} characters"
                )
            pieces.append(piece)
        return "".join(pieces)

    def __repr__(self) -> str:
        kind = "fallback" if not self._has_template else "go" if self._go else "template"
        return f"ChatTemplate({kind}, {len(self._source)} chars, tools={self.supports_tools})"
