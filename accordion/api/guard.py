"""The door every HTTP request passes: its id, who may call, how much it may send,
and what happens when it ends, however it ends.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which re-wraps
streams and hides disconnects). In order: request id; Host name; browser
Origin (preflights answered here); API key; content type; body size, counted
as it arrives so a chunked body is cut off too. On the way out it adds the
request id, CORS headers for an allowed origin, and `Connection: close` after
a 413 or any 5xx (the connection may hold an unread body or a broken state).
Last, it runs the cleanups a route registered (`register_cleanup`): a
request counted in by the model manager is counted out here even when the
client vanished before its response began, which no generator's `finally`
can promise.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from accordion.api.security import Policy

log = logging.getLogger("accordion.api")
request_id: ContextVar[str] = ContextVar("request_id", default="-")
MAX_BODY = 32 << 20  # bytes, whatever the transfer encoding
CLEANUPS = "accordion.cleanups"
METHODS = "GET, POST, PUT, DELETE, OPTIONS, HEAD"


class BodyTooLargeError(HTTPException):
    """Raised from `receive` as the body passes MAX_BODY; FastAPI lets HTTPExceptions through."""

    def __init__(self) -> None:
        super().__init__(413, f"request body over {MAX_BODY} bytes")


def error_body(path: str, status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """Ollama's {"error": "..."} under /api, OpenAI's error object under /v1 (its `code`:
    model_not_found only for a model, not_found for a route: clients tell them apart)."""
    if path.startswith("/v1"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        code = code or {401: "invalid_api_key", 404: "not_found", 503: "server_busy"}.get(status)
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return {"error": message}


def register_cleanup(request: Request, fn: Callable[[], None]) -> None:
    """Run `fn` once the request is over: response sent, failed, or the client gone."""
    request.scope[CLEANUPS].append(fn)


def _json_type(content_type: str, has_origin: bool) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    if kind in ("", "application/json") or kind.endswith("+json"):
        return True
    # curl -d sends this type; a browser page can too, but it always sends an Origin
    return kind == "application/x-www-form-urlencoded" and not has_origin


class Guard:
    def __init__(self, app: ASGIApp, policy: Policy | None = None) -> None:
        self.app = app
        self.policy = policy or Policy.from_env()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = headers.get("x-request-id") or uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        origin = headers.get("origin")
        allow_origin = origin if origin and self.policy.origin_allowed(origin) else None
        started = False
        cleanups: list[Callable[[], None]] = []
        scope[CLEANUPS] = cleanups

        async def send_out(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [(b"x-request-id", rid.encode("latin-1", "replace"))]
                if allow_origin:
                    extra += [
                        (b"access-control-allow-origin", allow_origin.encode("latin-1")),
                        (b"access-control-expose-headers", b"X-Request-ID"),
                        (b"vary", b"Origin"),
                    ]
                if message["status"] >= 500 or message["status"] == 413:
                    extra.append((b"connection", b"close"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            refusal = self._refusal(scope, headers, origin, allow_origin)
            if refusal is not None:
                await _answer(scope, send_out, *refusal)
            elif scope["method"] == "OPTIONS" and origin:
                await _preflight(send_out, headers)
            else:
                upload = _is_upload(scope)  # a file: its own size limit, not JSON
                await self.app(
                    scope if upload else _as_json(scope),
                    receive if upload else _limited(receive),
                    send_out,
                )
        except Exception:
            log.exception("request_id=%s unhandled error", rid)
            if not started:
                message = f"internal server error (request id {rid})"
                await _answer(scope, send_out, 500, message)
        finally:
            for fn in cleanups:
                try:
                    fn()
                except Exception:
                    log.exception("request_id=%s cleanup failed", rid)
            request_id.reset(token)

    def _refusal(
        self, scope: Scope, headers: Headers, origin: str | None, allow_origin: str | None
    ) -> tuple[int, str, dict[str, str]] | None:
        """(status, message, headers) for a request we will not serve, else None."""
        if not self.policy.host_allowed(headers.get("host")):
            return 403, "host not allowed (set ACCORDION_HOSTS to add one)", {}
        if origin and not allow_origin:
            return 403, "origin not allowed (set ACCORDION_ORIGINS to add one)", {}
        if scope["method"] == "OPTIONS" and origin:
            return None  # a preflight carries no credentials
        if not self.policy.key_accepted(scope["path"], headers.get("authorization")):
            return 401, "missing or invalid API key", {"www-authenticate": "Bearer"}
        if scope["method"] in ("POST", "PUT", "DELETE", "PATCH") and not _is_upload(scope):
            if not _json_type(headers.get("content-type", ""), origin is not None):
                return 415, "request body must be JSON (Content-Type: application/json)", {}
            size = headers.get("content-length", "")
            if size.isdigit() and int(size) > MAX_BODY:
                return 413, f"request body over {MAX_BODY} bytes", {}
        return None


def _is_upload(scope: Scope) -> bool:
    """POST /api/blobs/<digest> uploads a GGUF (gigabytes of raw bytes, hashed as they
    arrive, kept only if the digest matches); POST /v1/files a batch input (multipart,
    up to the file store's limit)."""
    path = scope["path"]
    return scope["method"] == "POST" and (path.startswith("/api/blobs/") or path == "/v1/files")


def _as_json(scope: Scope) -> Scope:
    """Ollama reads every body as JSON whatever its content type says (curl -d's form
    type passed `_refusal`): FastAPI parses a body only when the type is JSON."""
    if scope["method"] not in ("POST", "PUT", "DELETE", "PATCH"):
        return scope
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


def _limited(receive: Receive) -> Receive:
    received = 0

    async def receive_counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > MAX_BODY:
                raise BodyTooLargeError()
        return message

    return receive_counted


async def _answer(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
) -> None:
    body = json.dumps(error_body(scope["path"], status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _preflight(send: Send, headers: Headers) -> None:
    """An allowed origin's CORS preflight (disallowed ones were refused with 403)."""
    asked = headers.get("access-control-request-headers", "")
    raw = [
        (b"access-control-allow-methods", METHODS.encode()),
        (b"access-control-allow-headers", asked.encode("latin-1") or b"*"),
        (b"access-control-max-age", b"600"),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": raw})
    await send({"type": "http.response.body", "body": b""})
