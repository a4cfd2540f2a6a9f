"""Ollama's blobs: a client uploads a model file by its digest, then creates from it.

`ollama.Client.create_blob(path)` asks HEAD /api/blobs/sha256:<hex> and, if the server
lacks it, POSTs the file's bytes; `create(files={"model.gguf": digest})` then makes a
model of it. Blobs live in the store (`<root>/blobs/sha256-<hex>`), inside the folders
models may load from.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from accordion.errors import InvalidRequestError
from accordion.server.store import ModelStore

router = APIRouter()
HEX = frozenset("0123456789abcdef")


def blob_source(store: ModelStore, files: dict[str, str] | None) -> str | None:
    """The GGUF among `files` (name -> sha256 digest of a blob already posted)."""
    if not files:
        return None
    ggufs = [(name, digest) for name, digest in files.items() if name.endswith(".gguf")]
    if len(ggufs) != 1:
        raise InvalidRequestError("files must hold exactly one .gguf (adapters are not supported)")
    name, digest = ggufs[0]
    path = blob_path(store, digest)
    if not path.is_file():
        raise InvalidRequestError(f"files[{name!r}]: blob {digest} was never uploaded")
    return str(path)


def blob_path(store: ModelStore, digest: str) -> Path:
    kind, _, hexdigest = digest.partition(":")
    if kind != "sha256" or len(hexdigest) != 64 or not all(c in HEX for c in hexdigest):
        raise InvalidRequestError(f"blob digest must be sha256:<64 hex digits>, got {digest!r}")
    return store.root / "blobs" / f"sha256-{hexdigest}.gguf"  # the store loads *.gguf


@router.head("/api/blobs/{digest}", response_class=Response)
async def has_blob(digest: str, request: Request) -> Response:
    return Response(
        status_code=200 if blob_path(request.app.state.store, digest).is_file() else 404
    )


@router.post("/api/blobs/{digest}", response_class=Response, status_code=201)
async def push_blob(digest: str, request: Request) -> Response:
    """Upload a file by its digest: streamed to disk, hashed on the way, kept only if the
    hash matches (the official client's create_blob)."""
    target = blob_path(request.app.state.store, digest)
    if target.is_file():
        return Response(status_code=200)
    target.parent.mkdir(parents=True, exist_ok=True)
    hasher, head = hashlib.sha256(), b""
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        try:
            async for chunk in request.stream():
                hasher.update(chunk)
                head = head if len(head) >= 4 else (head + chunk)[:4]
                await asyncio.to_thread(tmp.write, chunk)
        except BaseException:
            os.unlink(tmp.name)
            raise
    got = f"sha256:{hasher.hexdigest()}"
    problem = None if got == digest else f"blob digest mismatch: the body hashes to {got}"
    if problem is None and head != b"GGUF":
        problem = "blob is not a GGUF file: only model files can be created from here"
    if problem is not None:
        os.unlink(tmp.name)
        raise InvalidRequestError(problem)
    os.replace(tmp.name, target)
    return Response(status_code=201)
