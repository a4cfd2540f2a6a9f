"""Where a job's requests go: the server's own app in this process, or a URL.

Both are the same HTTP client: embedded, it talks to the app through httpx's ASGI
transport (no socket, the very routes `accordion serve` runs), so a body in and a
body out are exactly the server's. An endpoint is any accordion, Ollama or
OpenAI-compatible server; `api="ollama"` speaks /api/chat, /api/generate and
/api/embed and turns the answers into OpenAI bodies.

Connection errors and 5xx and 429 answers are retried with backoff. When the
retries run out on a connection error, 429 or 502/503/504, the job stops
(`Unreachable`) rather than record a failure that is not the request's: resuming
finishes it. A 500 that persists, and any other status, is the request's answer.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from accordion.batch.lines import CHAT, EMBEDDINGS

RETRY_STATUS = {429, 502, 503, 504}


def local_server(
    kv_budget: int | None, max_inflight: int, keep_alive: float | None = None
) -> tuple[Any, Any]:
    """The server's own model manager and app in this process, sized for a job: its
    in-flight requests are never a 503 (the caller drives the manager)."""
    from accordion.api.app import create_app
    from accordion.api.security import Policy
    from accordion.engine.engine import EngineConfig
    from accordion.server.manager import ModelManager
    from accordion.server.store import ModelStore, allowed_paths, default_root

    root = default_root()
    store = ModelStore(root, allowed_paths(root))
    manager = ModelManager(
        store,
        default_keep_alive=keep_alive,
        max_queue=max(512, 2 * max_inflight),
        engine_config=EngineConfig(kv_budget_bytes=kv_budget),
    )
    return manager, create_app(manager, store, Policy())


class Unreachable(ConnectionError):
    """The target did not answer through every retry."""


@dataclass
class Reply:
    status: int
    body: Any
    request_id: str


class Target:
    workers = 1  # engines behind it (a Ray cluster has several) ...
    requeued = 0  # ... and what they lost and ran again

    def __init__(
        self, client: httpx.AsyncClient, api: str = "openai", retries: int = 6, backoff: float = 0.5
    ) -> None:
        if api not in ("openai", "ollama"):
            raise ValueError(f"api must be openai or ollama, got {api!r}")
        self.client, self.api, self.retries, self.backoff = client, api, retries, backoff

    @classmethod
    def embedded(cls, app: Any) -> Target:
        transport = httpx.ASGITransport(app=app)
        client = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=None)
        return cls(client)

    @classmethod
    def endpoint(cls, url: str, api: str = "openai", retries: int = 6) -> Target:
        headers = {}
        key = os.environ.get("ACCORDION_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        timeout = httpx.Timeout(None, connect=10.0)  # a long answer is not a dead server
        client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        return cls(client, api, retries)

    async def close(self) -> None:
        await self.client.aclose()

    async def post(self, url: str, body: dict[str, Any]) -> Reply:
        request_id = f"batch_req_{uuid.uuid4().hex}"
        path, sent = (url, body) if self.api == "openai" else to_ollama(url, body)
        # background: a server running it admits interactive requests first
        headers = {"X-Request-ID": request_id, "X-Accordion-Priority": "background"}
        for attempt in range(self.retries + 1):
            try:
                response = await self.client.post(path, json=sent, headers=headers)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                status = response.status_code
                if status not in RETRY_STATUS and (status != 500 or attempt == self.retries):
                    return Reply(status, _json(response), request_id)
                problem = f"HTTP {status}"
            if attempt < self.retries:
                await asyncio.sleep(self.backoff * 2**attempt)
        raise Unreachable(f"{self.client.base_url}{path}: {problem} after {self.retries} retries")

    def answer(self, url: str, reply: Reply) -> Any:
        """The reply's body as the OpenAI route would have returned it."""
        if self.api == "openai" or reply.status != 200:
            return reply.body
        return from_ollama(url, reply.body)

    async def get(self, path: str) -> Any | None:
        """A JSON document, or None when the target has no such route."""
        try:
            response = await self.client.get(path)
        except httpx.TransportError:
            return None
        return _json(response) if response.status_code == 200 else None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"error": {"message": response.text[:1000], "type": "server_error"}}


# -- Ollama's dialect ---------------------------------------------------------------------
OPTIONS = {  # OpenAI body field -> Ollama option
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty",
    "num_ctx": "num_ctx",
    "max_tokens": "num_predict",
    "max_completion_tokens": "num_predict",
}


def to_ollama(url: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if url == EMBEDDINGS:
        return "/api/embed", {"model": body["model"], "input": body.get("input")}
    options = dict(body.get("options") or {})
    for field, option in OPTIONS.items():
        if body.get(field) is not None:
            options[option] = body[field]
    doc: dict[str, Any] = {"model": body["model"], "stream": False, "options": options}
    if "truncate" in body:
        doc["truncate"] = body["truncate"]
    if url == CHAT:
        return "/api/chat", {**doc, "messages": body["messages"]}
    prompt = body.get("prompt")
    return "/api/generate", {**doc, "prompt": prompt[0] if isinstance(prompt, list) else prompt}


def from_ollama(url: str, doc: dict[str, Any]) -> dict[str, Any]:
    if url == EMBEDDINGS:
        vectors = doc.get("embeddings") or []
        count = doc.get("prompt_eval_count", 0)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
            ],
            "model": doc.get("model"),
            "usage": {"prompt_tokens": count, "total_tokens": count},
        }
    prompt, completion = doc.get("prompt_eval_count", 0), doc.get("eval_count", 0)
    choice: dict[str, Any] = {
        "index": 0,
        "logprobs": None,
        "finish_reason": "length" if doc.get("done_reason") == "length" else "stop",
    }
    if url == CHAT:
        message = doc.get("message") or {}
        choice["message"] = {"role": "assistant", "content": message.get("content", "")}
    else:
        choice["text"] = doc.get("response", "")
    return {
        "id": f"{'chatcmpl' if url == CHAT else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if url == CHAT else "text_completion",
        "created": int(time.time()),
        "model": doc.get("model"),
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
