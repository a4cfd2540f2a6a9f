"""ChatTemplate must render byte-for-byte what transformers' apply_chat_template renders."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import share_transformers_gguf_metadata

from accordion.errors import AccordionError, InvalidRequestError, TemplateError
from accordion.loader.chat_template import FALLBACK_TEMPLATE, ChatTemplate

# Real templates, as shipped in the models' tokenizer_config.json / GGUF metadata.

# Qwen/Qwen2.5-7B-Instruct
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim template)

# meta-llama/Llama-3.2-3B-Instruct (uses strftime_now, tojson(indent=4), raise_exception)
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim template)

# google/gemma-3-4b-it (folds the system prompt into the first user turn, enforces alternation)
GEMMA3_IT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""  # noqa: E501 (verbatim template)

# name -> (template, bos_token, eos_token)
TEMPLATES = {
    "qwen2.5": (QWEN25_TEMPLATE, "", "<|im_end|>"),
    "llama3.2": (LLAMA32_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    "gemma3-it": (GEMMA3_IT_TEMPLATE, "<bos>", "<eos>"),
}

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single_user": [{"role": "user", "content": "Hello!"}],
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "  Answer in one word.  "},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?\n"},
    ],
    "multi_turn_no_system": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
    ],
    "unicode": [
        {"role": "system", "content": "Réponds en français — s'il te plaît."},
        {"role": "user", "content": "Привет 👋 日本語で「こんにちは」? ü ß ∑ \u200b"},
        {"role": "assistant", "content": "¡Hola! 🎉"},
        {"role": "user", "content": "emoji: 🧪🦀 and tab\there"},
    ],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather — in °C",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City, e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
]


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    from accordion.loader.bundled import resolve_model_path

    try:
        return Path(resolve_model_path("smollm2"))
    except AccordionError as e:
        pytest.skip(f"bundled smollm2 unavailable: {e}")


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    share_transformers_gguf_metadata()  # AutoTokenizer's config parse, shared across modules
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name
    )


@pytest.fixture(scope="module")
def smollm2_template(smollm2_path: Path, hf_tokenizer: Any) -> ChatTemplate:
    from accordion.loader.gguf_file import open_gguf

    gf = open_gguf(smollm2_path)
    return ChatTemplate.from_gguf(gf, hf_tokenizer.bos_token, hf_tokenizer.eos_token)


# --- equivalence with transformers -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_smollm2_matches_transformers(
    smollm2_template: ChatTemplate, hf_tokenizer: Any, conv: str, gen: bool
) -> None:
    msgs = CONVERSATIONS[conv]
    expected = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert smollm2_template.render(msgs, add_generation_prompt=gen) == expected


@pytest.mark.slow
def test_smollm2_template_properties(smollm2_template: ChatTemplate, hf_tokenizer: Any) -> None:
    assert smollm2_template.has_template
    assert not smollm2_template.supports_tools
    assert smollm2_template.source == hf_tokenizer.chat_template
    assert "<|im_start|>" in smollm2_template.source


@pytest.mark.slow
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_real_templates_match_transformers(
    hf_tokenizer: Any, name: str, conv: str, gen: bool
) -> None:
    source, bos, eos = TEMPLATES[name]
    msgs = CONVERSATIONS[conv]
    # A fixed date keeps Llama's strftime_now from racing midnight between the two renders.
    extra = {"date_string": "26 Jul 2024"}
    expected = hf_tokenizer.apply_chat_template(
        msgs,
        chat_template=source,
        tokenize=False,
        add_generation_prompt=gen,
        bos_token=bos,
        eos_token=eos,
        **extra,
    )
    got = ChatTemplate(source, bos, eos).render(msgs, add_generation_prompt=gen, **extra)
    assert got == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5", "llama3.2"])
def test_tools_match_transformers(hf_tokenizer: Any, name: str) -> None:
    source, bos, eos = TEMPLATES[name]
    template = ChatTemplate(source, bos, eos)
    assert template.supports_tools
    for msgs in (TOOL_CONVERSATION, CONVERSATIONS["system_user"]):
        expected = hf_tokenizer.apply_chat_template(
            msgs,
            chat_template=source,
            tools=[WEATHER_TOOL],
            tokenize=False,
            add_generation_prompt=True,
            bos_token=bos,
            eos_token=eos,
            date_string="1 Jan 2025",
        )
        got = template.render(msgs, tools=[WEATHER_TOOL], date_string="1 Jan 2025")
        assert got == expected
        assert "Zürich" in got  # tojson keeps non-ASCII as is


@pytest.mark.slow
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]])
def test_defined_variables_match_transformers(hf_tokenizer: Any, tools: Any) -> None:
    # transformers passes tools and documents even when None; templates may test `is defined`.
    source = "{{ tools is defined }}|{{ tools is none }}|{{ documents is defined }}|{{ x }}"
    msgs = CONVERSATIONS["single_user"]
    expected = hf_tokenizer.apply_chat_template(
        msgs, chat_template=source, tools=tools, tokenize=False, x="ü"
    )
    assert ChatTemplate(source).render(msgs, tools=tools, x="ü") == expected


# --- fallback for models without a template ---------------------------------------------


@pytest.mark.slow
def test_gemma3_base_uses_fallback() -> None:
    from accordion.loader.bundled import resolve_model_path
    from accordion.loader.gguf_file import open_gguf

    try:
        gf = open_gguf(resolve_model_path("gemma3"))
    except AccordionError as e:
        pytest.skip(f"bundled gemma3 unavailable: {e}")
    assert gf.metadata.get("tokenizer.chat_template") is None
    template = ChatTemplate.from_gguf(gf, "<bos>", "<eos>")
    assert not template.has_template
    assert not template.supports_tools
    assert template.source == FALLBACK_TEMPLATE
    out = template.render(CONVERSATIONS["multi_turn"])
    positions = [out.index(m["content"]) for m in CONVERSATIONS["multi_turn"]]
    assert positions == sorted(positions)
    assert out.endswith("Assistant:")


def test_fallback_transcript() -> None:
    template = ChatTemplate(None)
    msgs = CONVERSATIONS["multi_turn_no_system"]
    assert template.render(msgs[:3]) == (
        "User: Hi\n\nAssistant: Hello! How can I help?\n\nUser: Tell me a joke.\n\nAssistant:"
    )
    assert template.render(CONVERSATIONS["system_user"], add_generation_prompt=False) == (
        "You are terse.\n\nUser: What is 2+2?\n\n"
    )
    assert not ChatTemplate("   ").has_template  # blank metadata counts as no template


# --- errors and globals ------------------------------------------------------------------


def test_raise_exception_becomes_template_error() -> None:
    template = ChatTemplate(GEMMA3_IT_TEMPLATE, "<bos>")
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        template.render(two_users)


def test_syntax_error_is_template_error() -> None:
    with pytest.raises(TemplateError, match=r"does not compile.*line 2"):
        ChatTemplate("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% if add_generation_prompt %}never closed")


def test_runtime_error_is_template_error() -> None:
    template = ChatTemplate("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(
        TemplateError, match=r"failed to render: TypeError \(template line 1\)"
    ) as info:
        template.render([{"role": "user", "content": "x"}])
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_sandbox_blocks_escape() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateError):
        template.render([{"role": "user", "content": "x"}])


def test_strftime_now() -> None:
    template = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}")
    before = datetime.now().strftime("%Y-%m-%d")
    out = template.render([{"role": "user", "content": "x"}])
    assert out in {before, datetime.now().strftime("%Y-%m-%d")}


def test_llama_date_defaults_to_today() -> None:
    template = ChatTemplate(LLAMA32_TEMPLATE, "<|begin_of_text|>")
    before = datetime.now().strftime("%d %b %Y")
    out = template.render(CONVERSATIONS["single_user"])
    assert f"Today Date: {before}" in out or datetime.now().strftime("%d %b %Y") in out


def test_tojson_and_variables() -> None:
    template = ChatTemplate(
        "{{ bos_token }}{{ tools | tojson }}|{{ {'k': 'é<'} | tojson(indent=2) }}|{{ flavor }}"
        "|{{ tools is defined }}|{{ add_generation_prompt }}{{ eos_token }}",
        "<s>",
        "</s>",
    )
    assert template.supports_tools
    out = template.render([{"role": "user", "content": "x"}], flavor="mint")
    assert out == '<s>null|{\n  "k": "é<"\n}|mint|True|True</s>'


def test_loopcontrols_and_trim_blocks() -> None:
    source = (
        "{% for m in messages %}\n"
        "  {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
        "{{ m['content'] }}\n"
        "  {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "{% endfor %}"
    )
    msgs = [{"role": "system", "content": "s"}] + [
        {"role": "user", "content": str(i)} for i in "123"
    ]
    assert ChatTemplate(source).render(msgs) == "1\n2\n"


# --- message validation ------------------------------------------------------------------


def test_text_parts_are_flattened() -> None:
    template = ChatTemplate(QWEN25_TEMPLATE)
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    as_parts = template.render([{"role": "user", "content": parts}])
    assert as_parts == template.render([{"role": "user", "content": "first\nsecond"}])


def test_tool_call_message_may_omit_content() -> None:
    out = ChatTemplate(QWEN25_TEMPLATE).render(
        [TOOL_CONVERSATION[0], {k: v for k, v in TOOL_CONVERSATION[1].items() if k != "content"}]
    )
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}' in out


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ({"role": "user", "content": "x"}, "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "x"}], r"messages\[0\] needs a non-empty string 'role'"),
        ([{"role": 3, "content": "x"}], "role"),
        ([{"role": "user"}], r"messages\[0\] \(user\) has no 'content'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], r"messages\[1\]"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "image_url"),
        ([{"role": "user", "content": [{"type": "text"}]}], "string 'text'"),
        ([{"role": "user", "content": ["raw"]}], "only text parts"),
    ],
)
def test_malformed_messages(messages: Any, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match) as info:
        ChatTemplate(QWEN25_TEMPLATE).render(messages)
    assert isinstance(info.value, ValueError)
