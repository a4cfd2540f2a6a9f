"""Requests to token ids: options, the context limit, the chat template, truncation.

Context limit of a request = its num_ctx, else the Modelfile's, else
ACCORDION_CONTEXT_LENGTH, else the model's trained length; never above the
trained length. A prompt that does not fit is either refused (truncate=false:
400 naming the counts) or shortened by whole messages after the system prompt
(generate: tokens after num_keep), and the response reports it.

Rendering and tokenizing take time in proportion to the request, so the
routes run them on a small worker pool (`in_worker`), never on the HTTP thread.
Truncation renders the whole conversation once, then only conversations that
nearly fit: it grows the kept tail 1, 2, 4, ... messages and bisects, so its
cost follows the context limit, not the length of the history.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from accordion.api.options import RequestOptions, merge, to_request_options
from accordion.errors import InvalidRequestError
from accordion.loader.chat_template import MAX_RENDER_CHARS, ChatTemplate, normalize_messages
from accordion.loader.ollama_template import REPLY
from accordion.server.manager import Loaded

log = logging.getLogger("accordion.api")
MAX_MESSAGES = 100_000
_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="accordion-prompt")


@dataclass
class Prepared:
    ids: list[int]
    options: RequestOptions
    limit: int
    truncated: dict[str, int] | None = None


async def in_worker(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` (rendering, tokenizing) on the worker pool, off the HTTP thread."""
    return await asyncio.get_running_loop().run_in_executor(_pool, fn, *args)


def request_options(loaded: Loaded, options: dict[str, Any] | None) -> RequestOptions:
    if options is not None and not isinstance(options, dict):
        raise InvalidRequestError("options must be an object")
    return to_request_options(merge(loaded.entry.parameters, options))


def context_limit(loaded: Loaded, opts: RequestOptions) -> int:
    trained = loaded.model.config.context_length
    env = os.environ.get("ACCORDION_CONTEXT_LENGTH")
    limit = opts.num_ctx or (int(env) if env else None) or trained
    return min(limit, trained)


def _too_long(n: int, limit: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"prompt is {n} tokens but the context limit is {limit} tokens"
        " (raise num_ctx or allow truncation)"
    )


def _report(request_id: str, original: int, kept: int) -> dict[str, int]:
    report = {"original": original, "kept": kept, "removed": original - kept}
    log.warning("request_id=%s truncated prompt %s", request_id, report)
    return report


def encode_text(loaded: Loaded, text: str) -> list[int]:
    if len(text) > MAX_RENDER_CHARS:
        raise InvalidRequestError(
            f"prompt is {len(text)} characters; a request may send at most {MAX_RENDER_CHARS}"
        )
    return loaded.model.tokenizer.encode(text)


def prepare_chat(
    loaded: Loaded,
    messages: list[dict],
    options: dict[str, Any] | None,
    truncate: bool = True,
    tools: list | None = None,
    request_id: str = "-",
) -> Prepared:
    opts = request_options(loaded, options)
    limit = context_limit(loaded, opts)
    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
        raise InvalidRequestError(f"{len(messages)} messages; a request may send {MAX_MESSAGES}")
    messages = normalize_messages(messages)
    if loaded.entry.system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": loaded.entry.system}, *messages]
    ids = loaded.model.encode_chat(messages, tools)
    if len(ids) < limit:
        return Prepared(ids, opts, limit)
    if not truncate:
        raise _too_long(len(ids), limit)
    head = messages[:1] if messages[0]["role"] == "system" else []
    history = messages[len(head) :]
    kept = _longest_tail(
        lambda n: loaded.model.encode_chat([*head, *history[-n:]], tools), len(history), limit
    )
    return Prepared(kept, opts, limit, _report(request_id, len(ids), len(kept)))


def _longest_tail(encode: Callable[[int], list[int]], total: int, limit: int) -> list[int]:
    """The ids of the most recent messages that fit below `limit` (all `total` do not)."""
    best = encode(1)  # the newest message always stays (total == 1: the whole, too long)
    if len(best) >= limit:
        raise _too_long(len(best), limit)
    fits, misses = 1, total
    while fits * 2 < misses:  # gallop out from the newest message ...
        ids = encode(fits * 2)
        if len(ids) >= limit:
            misses = fits * 2
            break
        fits, best = fits * 2, ids
    while misses - fits > 1:  # ... then bisect between the longest fit and the first miss
        middle = (fits + misses) // 2
        ids = encode(middle)
        if len(ids) < limit:
            fits, best = middle, ids
        else:
            misses = middle
    return best


def token_ids(loaded: Loaded, ids: list[int], field: str) -> list[int]:
    vocab = loaded.model.config.vocab_size
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise InvalidRequestError(f"{field} must be token ids in [0, {vocab})")
    return list(ids)


def request_template(loaded: Loaded, source: str | None) -> ChatTemplate | None:
    """A request's own template, compiled once per text (clients resend the same one)."""
    if not source:
        return None
    tok = loaded.model.tokenizer
    return _compiled(source, tok.bos_token, tok.eos_token)


@functools.lru_cache(maxsize=32)
def _compiled(source: str, bos: str, eos: str) -> ChatTemplate:
    return ChatTemplate(source, bos, eos)


def next_turn(
    loaded: Loaded, prompt: str, raw: bool, template: ChatTemplate | None = None
) -> list[int]:
    """The ids that follow a conversation's last reply for one more user turn: what the
    template writes after a reply's text (its closing tag), the turn, and the next
    reply's opening. Found by rendering a stand-in conversation around a marked reply,
    so a template's default system prompt is not written again mid-way."""
    model = loaded.model
    template = template or model.template
    if raw or not template.has_template:
        return model.tokenizer.encode(prompt, add_bos=False)
    stand_in = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": REPLY},
        {"role": "user", "content": prompt},
    ]
    text = template.render(stand_in).split(REPLY, 1)[-1]
    return model.tokenizer.encode(text, add_bos=False)


def prepare_generate(
    loaded: Loaded,
    prompt: str | list[int],
    options: dict[str, Any] | None,
    system: str | None = None,
    raw: bool = False,
    truncate: bool = True,
    request_id: str = "-",
    context: list[int] | None = None,
    template: str | None = None,
) -> Prepared:
    """`context` (Ollama's): the token ids of the conversation so far, as a previous
    answer returned them; this turn follows them, without the system prompt again.
    `template`: the request's own (Go or Jinja), in place of the model's."""
    opts = request_options(loaded, options)
    limit = context_limit(loaded, opts)
    model = loaded.model
    system = system if system is not None else loaded.entry.system
    if isinstance(prompt, list):  # token ids, taken as they are
        ids = token_ids(loaded, prompt, "prompt")
    elif context:
        turn = next_turn(loaded, prompt, raw, request_template(loaded, template))
        ids = token_ids(loaded, context, "context") + turn
    elif raw or not (template or model.template.has_template):
        ids = encode_text(loaded, prompt if raw or not system else f"{system}\n\n{prompt}")
    else:
        messages = [{"role": "user", "content": prompt}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        ids = model.encode_chat(messages, template=request_template(loaded, template))
    if len(ids) < limit:
        return Prepared(ids, opts, limit)
    if not truncate:
        raise _too_long(len(ids), limit)
    keep = min(opts.num_keep, limit - 2)
    original = len(ids)
    ids = ids[:keep] + ids[original - (limit - 1 - keep) :]  # drop the oldest after num_keep
    return Prepared(ids, opts, limit, _report(request_id, original, len(ids)))
