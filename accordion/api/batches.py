"""OpenAI's Files and Batch routes: /v1/files and /v1/batches, shaped as OpenAI's.

Uploads are multipart (`file`, `purpose`), streamed to disk; the batch runner is
`accordion.batch.service` (it runs only under `accordion serve`, which knows its own
address; an app without it answers 503 for batches).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from accordion.batch.files import FileStore, NoSuchFile
from accordion.batch.service import Batches, NoSuchBatch
from accordion.errors import InvalidRequestError

router = APIRouter()


def files_of(request: Request) -> FileStore:
    return request.app.state.files


def batches_of(request: Request) -> Batches:
    batches = getattr(request.app.state, "batches", None)
    if batches is None:
        raise HTTPException(503, "batches run only under accordion serve")
    return batches


@contextmanager
def found(kind: str, name: str) -> Iterator[None]:
    """A file or batch that is not stored is a 404 naming it (OpenAI's not_found)."""
    try:
        yield
    except (NoSuchFile, NoSuchBatch):
        raise HTTPException(404, f"no {kind} {name!r}") from None


@router.post("/v1/files")
async def upload(request: Request) -> dict[str, Any]:
    form = await request.form(max_part_size=1 << 30)
    upload, purpose = form.get("file"), form.get("purpose")
    if upload is None or isinstance(upload, str):
        raise InvalidRequestError("file is required (multipart, a file part named 'file')")
    if not isinstance(purpose, str):
        raise InvalidRequestError("purpose is required")

    def chunks() -> Iterator[bytes]:
        while block := upload.file.read(1 << 20):
            yield block

    return await asyncio.to_thread(files_of(request).add, chunks(), upload.filename or "", purpose)


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None) -> dict[str, Any]:
    return {"object": "list", "data": files_of(request).list(purpose), "has_more": False}


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request) -> dict[str, Any]:
    with found("file", file_id):
        return files_of(request).get(file_id)


@router.get("/v1/files/{file_id}/content", response_class=FileResponse)
async def file_content(file_id: str, request: Request) -> FileResponse:
    with found("file", file_id):
        return FileResponse(files_of(request).path(file_id), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    with found("file", file_id):
        files_of(request).delete(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


@router.post("/v1/batches")
async def create_batch(body: BatchBody, request: Request) -> dict[str, Any]:
    with found("file", body.input_file_id):
        return batches_of(request).create(
            body.input_file_id, body.endpoint, body.completion_window, body.metadata
        )


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request) -> dict[str, Any]:
    with found("batch", batch_id):
        return batches_of(request).get(batch_id)


@router.get("/v1/batches")
async def list_batches(
    request: Request, after: str | None = None, limit: int = Query(default=20, ge=1, le=100)
) -> dict[str, Any]:
    with found("batch", after or ""):
        data, more = batches_of(request).list(after, limit)
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
    with found("batch", batch_id):
        return batches_of(request).cancel(batch_id)
