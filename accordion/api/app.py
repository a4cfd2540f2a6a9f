"""The HTTP app: Ollama's API under /api, OpenAI's under /v1, errors as clients expect."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from accordion import __version__
from accordion.api.guard import Guard, error_body, request_id
from accordion.api.metrics import Metrics
from accordion.api.security import Policy
from accordion.batch.files import FileStore
from accordion.errors import (
    AccordionError,
    EngineRestartedError,
    ForbiddenError,
    InvalidModelFileError,
    InvalidRequestError,
    ModelBrokenError,
    ModelNotFoundError,
    RequestTooLargeError,
    ResumeError,
    TemplateError,
)
from accordion.server.manager import ModelManager, OutOfMemoryBudgetError, ServerBusyError
from accordion.server.store import ModelStore

log = logging.getLogger("accordion.api")

STATUS = {
    ModelNotFoundError: 404,
    ForbiddenError: 403,
    InvalidRequestError: 400,
    TemplateError: 400,
    RequestTooLargeError: 400,
    ServerBusyError: 503,
    OutOfMemoryBudgetError: 507,
    ModelBrokenError: 500,
    ResumeError: 500,
    EngineRestartedError: 503,
}


class ErrorReply(BaseModel):
    """Ollama's {"error": "..."}; under /v1, OpenAI's error object."""

    error: str | dict[str, Any]


# Documented on every route (/openapi.json), so API fuzzers and clients know the real codes.
ERROR_REPLIES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorReply, "description": what}
    for status, what in {
        400: "invalid request: a bad field, a prompt over the context limit",
        401: "missing or invalid API key (ACCORDION_API_KEY)",
        403: "Host name, browser origin or model file path not allowed",
        404: "unknown model or route",
        405: "method not allowed on this route",
        413: "request body too large",
        415: "request body is not JSON",
        503: "server busy: the request queue is full (ACCORDION_MAX_QUEUE)",
        507: "not enough memory to load the model",
    }.items()
}


def streamed(media_type: str) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route whose 200 may also be a stream of `media_type`."""
    return {200: {"content": {media_type: {}}}}


def status_of(error: Exception) -> int:
    for kind, status in STATUS.items():
        if isinstance(error, kind):
            return status
    return 400 if isinstance(error, ValueError | AccordionError) else 500


def error_response(
    request: Request, status: int, message: str, code: str | None = None
) -> JSONResponse:
    body = error_body(request.url.path, status, message, code)
    return JSONResponse(body, status_code=status)


def create_app(manager: ModelManager, store: ModelStore, policy: Policy | None = None) -> FastAPI:
    app = FastAPI(
        title="accordion",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        responses=ERROR_REPLIES,
    )
    app.state.manager = manager
    app.state.store = store
    app.state.files = FileStore(store.root / "files")
    app.state.batches = None  # accordion serve sets it: it knows the server's own address

    app.add_middleware(Guard, policy=policy)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)  # a route's own model_validate: 400, not 500
    async def invalid(
        request: Request, exc: RequestValidationError | ValidationError
    ) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message = "invalid JSON in request body"
        else:
            message = (
                f"{where}: {first.get('msg', 'invalid value')}" if where else "invalid request"
            )
        return error_response(request, 400, message)

    @app.exception_handler(AccordionError)
    async def accordion_error(request: Request, exc: AccordionError) -> JSONResponse:
        status = status_of(exc)
        log.info("request_id=%s status=%d error=%s", request_id.get(), status, exc)
        if isinstance(exc, InvalidModelFileError):  # the path is the server's business
            return error_response(request, status, f"invalid model file: {exc.reason}")
        code = "model_not_found" if isinstance(exc, ModelNotFoundError) else None
        return error_response(request, status, str(exc), code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes and wrong methods answer in the API's error shape, not FastAPI's
        response = error_response(request, exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(json.JSONDecodeError)
    async def bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(request, 400, f"invalid JSON: {exc.msg}")

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return error_response(request, 400, "request nested too deeply")

    @app.get("/", response_class=PlainTextResponse)
    async def root() -> PlainTextResponse:
        return PlainTextResponse("Ollama is running")

    @app.head("/", response_class=Response)
    async def root_head() -> Response:
        return Response(status_code=200)

    metrics = Metrics(manager)
    manager.observers.append(metrics.observe)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/api/version")
    async def version() -> dict:
        return {"version": __version__}

    from accordion.api import (
        batches,
        blobs,
        ollama,
        openai,
        responses,
        stats_routes,
        store_routes,
    )

    app.include_router(ollama.router)
    app.include_router(batches.router)
    app.include_router(blobs.router)
    app.include_router(store_routes.router)
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(stats_routes.router)
    stats_routes.mount_dashboard(app)
    return app
