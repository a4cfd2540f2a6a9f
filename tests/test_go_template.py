"""Ollama's Go templates: the language, and real-world template shapes rendered for known
conversations (expected texts written from Go's and Ollama's documented semantics)."""

from __future__ import annotations

import pytest

from accordion.errors import TemplateError
from accordion.loader.chat_template import ChatTemplate
from accordion.loader.go_template import GoTemplate, is_go_template

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Weather?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def run(source: str, **data: object) -> str:
    return GoTemplate(source).execute(dict(data), 1 << 20)


@pytest.mark.parametrize(
    ("source", "data", "expected"),
    [
        ("a {{ .X }} b", {"X": 1}, "a 1 b"),
        ("a  {{- .X -}}  b", {"X": "x"}, "axb"),
        ("{{/* a comment */}}x{{- /* trimmed */ -}} y", {}, "xy"),
        ("{{ if .A }}a{{ else if .B }}b{{ else }}c{{ end }}", {"A": 0, "B": "x"}, "b"),
        ("{{ if and .A .B }}y{{ else }}n{{ end }}", {"A": 1, "B": []}, "n"),
        ('{{ or .A .B "z" }}', {"A": "", "B": None}, "z"),
        ("{{ if not .A }}empty{{ end }}", {"A": {}}, "empty"),
        ('{{ if eq .R "a" "b" }}yes{{ end }}', {"R": "b"}, "yes"),
        ("{{ range $i, $x := .L }}{{ $i }}={{ $x }};{{ end }}", {"L": ["a", "b"]}, "0=a;1=b;"),
        ("{{ range .L }}{{ . }}{{ else }}none{{ end }}", {"L": []}, "none"),
        (
            "{{ range .L }}{{ if eq . 2 }}{{ break }}{{ end }}{{ . }}{{ end }}",
            {"L": [1, 2, 3]},
            "1",
        ),
        (
            "{{ range .L }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ . }}{{ end }}",
            {"L": [1, 2, 3]},
            "13",
        ),  # fmt: skip
        ("{{ range $k, $v := .M }}{{ $k }}{{ $v }}{{ end }}", {"M": {"b": 2, "a": 1}}, "a1b2"),
        ("{{ with .A }}{{ .B }}{{ end }}", {"A": {"B": "in"}}, "in"),
        ("{{ $x := 1 }}{{ range .L }}{{ $x = . }}{{ end }}{{ $x }}", {"L": [5, 6]}, "6"),
        ("{{ range .L }}{{ $.Top }}{{ end }}", {"L": [1, 2], "Top": "t"}, "tt"),
        ("{{ len .L }} {{ index .L 1 }} {{ slice .L 1 }}", {"L": ["a", "b", "c"]}, '3 b ["b","c"]'),
        ("{{ len (slice .L 1) }}", {"L": [1, 2, 3]}, "2"),
        ("{{ .V | json }}", {"V": {"a": "<b>"}}, '{"a":"\\u003cb\\u003e"}'),
        ('{{ printf "%s-%d" .A .B }}', {"A": "x", "B": 3}, "x-3"),
        ("{{ .Msg.ToolCalls }}", {"Msg": {"tool_calls": [1]}}, "[1]"),
        ("{{ .Missing }}", {}, ""),
        ("{{ `raw \\n` }}", {}, "raw \\n"),
    ],
)
def test_the_language(source: str, data: dict, expected: str) -> None:
    assert run(source, **data) == expected


@pytest.mark.parametrize(
    "source",
    ["{{ if .A }}x", "{{ .A", "{{ end }}", "{{ nosuch .A }}", '{{ template "x" }}'],
)
def test_broken_templates_are_template_errors(source: str) -> None:
    with pytest.raises(TemplateError):
        run(source, A=1)


def test_go_syntax_is_told_from_jinja() -> None:
    assert is_go_template("{{ .Prompt }}") and is_go_template("{{- range .Messages }}{{ end }}")
    assert not is_go_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not is_go_template("{{ bos_token }}{{ messages[0]['content'] }}")


# Real-world shapes, written in the style of Ollama's library templates.
CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_end|>
<|im_start|>assistant
{{ end }}
{{- end }}
{{- end }}"""

LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if $last }}{{ if ne .Role "assistant" }}<|eot_id|><|start_header_id|>assistant<|end_header_id|>

{{ end }}{{ else }}<|eot_id|>{{ end }}
{{- end }}
{{- end }}"""

MISTRAL = """{{- range $index, $_ := .Messages }}
{{- if eq .Role "user" }}[INST] {{ if and $.System (eq (len (slice $.Messages $index)) 1) }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}"""

GEMMA = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and (eq $i 1) $.System }}{{ $.System }}

{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""

QWEN_TOOLS = """{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

Return calls as <tool_call>{"name": <name>, "arguments": <args>}</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""

LEGACY = """{{ if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}{{ if .Prompt }}<|user|>
{{ .Prompt }}<|end|>
{{ end }}<|assistant|>
{{ .Response }}<|end|>
"""

EXPECTED = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWeather?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral": "[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\nWeather?[/INST]",
    "gemma": (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!"
        "<end_of_turn>\n<start_of_turn>user\nWeather?<end_of_turn>\n<start_of_turn>model\n"
    ),
    "legacy": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\nWeather?<|end|>\n<|assistant|>\n"
    ),
}


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("chatml", CHATML),
        ("llama3", LLAMA3),
        ("mistral", MISTRAL),
        ("gemma", GEMMA),
        ("legacy", LEGACY),
    ],  # fmt: skip
)
def test_real_world_shapes_render_as_ollama_would(name: str, source: str) -> None:
    template = ChatTemplate(source)
    assert template.render(CHAT) == EXPECTED[name]


def test_qwen_with_tools_calls_and_results() -> None:
    template = ChatTemplate(QWEN_TOOLS)
    assert template.supports_tools
    chat = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18C"},
    ]
    function = (
        '{"name":"get_weather","description":"Weather in a city",'
        '"parameters":{"type":"object","properties":{"city":{"type":"string"}}}}'
    )
    assert template.render(chat, tools=TOOLS) == (
        "<|im_start|>system\n\n# Tools\n\n<tools>\n"
        f'{{"type": "function", "function": {function}}}\n</tools>\n\n'
        'Return calls as <tool_call>{"name": <name>, "arguments": <args>}</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_legacy_template_prefills_a_last_assistant_turn() -> None:
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    assert ChatTemplate(LEGACY).render(chat) == "<|user|>\nHi<|end|>\n<|assistant|>\nHel"
