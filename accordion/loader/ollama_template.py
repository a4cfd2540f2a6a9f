"""A chat as Ollama feeds it to a Go template: `.System`, `.Messages`, `.Tools`, and
for older templates `.Prompt` and `.Response`, one exchange at a time."""

from __future__ import annotations

from accordion.loader.go_template import GoTemplate

REPLY = "\x00accordion-reply\x00"  # stands for the reply being written, then cut off


def render_ollama(
    template: GoTemplate, messages: list[dict], tools: list[dict] | None, limit: int
) -> str:
    """The prompt as Ollama renders it. Every system message's content joins `.System`
    and consecutive messages of one role (but tool results) merge. A template that
    reads `.Messages` runs once over them; an older one runs per exchange with `.System`,
    `.Prompt` and `.Response`, the last run cut right after its `.Response`."""
    system, collated = collate(messages)
    base = {"System": system, "Tools": tools or [], "Think": False, "Suffix": ""}
    if ".Messages" in template.source:
        return template.execute({**base, "Messages": collated, "Prompt": "", "Response": ""}, limit)
    out, turn = [], {"System": "", "Prompt": "", "Response": ""}

    def run(values: dict[str, str]) -> None:
        out.append(template.execute({**base, **values}, limit))

    for m in collated:
        role, content = m["role"], m.get("content") or ""
        if role == "system":
            if turn["Prompt"] or turn["Response"]:
                run(turn)
                turn = {"System": "", "Prompt": "", "Response": ""}
            turn["System"] = content
        elif role == "assistant":
            turn["Response"] = content
        else:
            if turn["Response"]:
                run(turn)
                turn = {"System": "", "Prompt": "", "Response": ""}
            turn["Prompt"] = content
    last = template.execute({**base, **turn, "Response": turn["Response"] + REPLY}, limit)
    out.append(last.split(REPLY, 1)[0])
    return "".join(out)


def collate(messages: list[dict]) -> tuple[str, list[dict]]:
    system = [m.get("content") or "" for m in messages if m["role"] == "system"]
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["role"] == m["role"] != "tool":
            merged = f"{collated[-1].get('content') or ''}\n\n{m.get('content') or ''}"
            collated[-1] = {**collated[-1], "content": merged}
        else:
            collated.append(dict(m))
    return "\n\n".join(system), collated
