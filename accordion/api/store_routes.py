"""Ollama's model routes: tags, show, create, copy, delete, pull."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from gguf import LlamaFileType
from pydantic import BaseModel, ConfigDict, StrictBool

from accordion.api.app import streamed
from accordion.api.blobs import blob_source
from accordion.api.service import manager_of
from accordion.errors import AccordionError, InvalidRequestError, ModelNotFoundError
from accordion.loader.bundled import BUNDLED, split_tag
from accordion.loader.gguf_file import GGUFFile, open_gguf
from accordion.loader.model import LoadedModel
from accordion.server.store import ModelEntry, ModelStore

router = APIRouter()
STREAMED = streamed("application/x-ndjson")


def store_of(request: Request) -> ModelStore:
    return request.app.state.store


def details(
    entry: ModelEntry, model: LoadedModel | None = None, gf: GGUFFile | None = None
) -> dict[str, Any]:
    gf = gf or (model.gguf if model is not None else open_gguf(entry.path))
    arch = gf.architecture
    try:
        quant = LlamaFileType(gf.get("general.file_type")).name.removeprefix("MOSTLY_")
    except ValueError:
        quant = "unknown"
    return {
        "parent_model": entry.source if not entry.bundled else "",
        "format": "gguf",
        "family": arch,
        "families": [arch],
        "parameter_size": str(gf.get("general.size_label", "")),
        "quantization_level": quant,
    }


def tag_of(store: ModelStore, entry: ModelEntry) -> dict[str, Any]:
    """One /api/tags row; a broken entry is listed with its problem, never breaks the list."""
    doc: dict[str, Any] = {
        "name": entry.name,
        "model": entry.name,
        "modified_at": entry.modified_at.isoformat().replace("+00:00", "Z"),
        "size": entry.size,
        "digest": entry.digest,
        "details": {},
    }
    try:
        store.ensure_file(entry)
        doc["details"] = details(entry)
        doc["size"] = entry.size
    except AccordionError as e:
        doc["error"] = entry.problem or getattr(e, "reason", None) or str(e)
    except OSError:
        doc["error"] = "its model file cannot be read"
    return doc


def progress(steps: list[dict[str, Any]]) -> StreamingResponse:
    """Ollama's NDJSON status stream for create and pull."""

    async def lines() -> AsyncIterator[bytes]:
        for step in steps:
            yield (json.dumps(step) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    store = store_of(request)  # files are read (and a bundled one joined) on a thread
    return {"models": await asyncio.to_thread(lambda: [tag_of(store, e) for e in store.list()])}


class NameBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None  # older clients send "name"
    verbose: StrictBool = False

    def target(self) -> str:
        value = self.model or self.name
        if not value:
            raise InvalidRequestError("model is required")
        return value


def modelfile(entry: ModelEntry, template: str) -> str:
    lines = [f"FROM {entry.path}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    if entry.system:
        lines.append(f'SYSTEM """{entry.system}"""')
    for key, value in entry.parameters.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {json.dumps(v) if isinstance(v, str) else v}")
    return "\n".join(lines) + "\n"


def show_parameters(parameters: dict[str, Any]) -> str:
    """As Ollama writes them: the name padded to 30, strings quoted, one line per stop."""
    lines = []
    for key, value in parameters.items():
        for v in value if isinstance(value, list) else [value]:
            shown = json.dumps(v) if isinstance(v, str | bool) else v  # Go's %q; true, false
            lines.append(f"{key:<30} {shown}")
    return "\n".join(lines)


@router.post("/api/show")
async def show(body: NameBody, request: Request) -> dict[str, Any]:
    store = store_of(request)
    entry = store.get(body.target())
    await asyncio.to_thread(store.ensure_file, entry)
    gf = await asyncio.to_thread(open_gguf, entry.path)
    template = entry.template or str(gf.get("tokenizer.chat_template") or "")
    info = {k: v for k, v in gf.metadata.items() if not isinstance(v, list) or len(v) < 64}
    if "tokenizer.chat_template" in info:
        del info["tokenizer.chat_template"]
    params = show_parameters(entry.parameters)
    capabilities = ["completion", "embedding"]  # /api/embed serves every model
    if "tools" in template:
        capabilities.append("tools")
    return {
        "modelfile": modelfile(entry, template),
        "parameters": params,
        "template": template,
        "system": entry.system or "",
        "details": details(entry, gf=gf),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": entry.modified_at.isoformat().replace("+00:00", "Z"),
    }


class CreateBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None
    from_: str | None = None
    modelfile: str | None = None
    parameters: dict[str, Any] | None = None
    system: str | None = None
    template: str | None = None
    files: dict[str, str] | None = None  # file name -> blob digest (POST /api/blobs first)
    adapters: dict[str, str] | None = None
    quantize: str | None = None
    stream: StrictBool = True


def parse_modelfile(text: str) -> dict[str, Any]:
    """FROM, PARAMETER, SYSTEM, TEMPLATE lines (triple-quoted values may span lines)."""
    out: dict[str, Any] = {"parameters": {}}
    lines = iter(text.splitlines())
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        command, _, rest = stripped.partition(" ")
        command, rest = command.upper(), rest.strip()
        if rest.startswith('"""'):
            value = rest[3:]
            while not value.endswith('"""'):
                try:
                    value += "\n" + next(lines)
                except StopIteration:
                    raise InvalidRequestError(f'unterminated """ in {command}') from None
            rest = value[:-3]
        if command == "FROM":
            out["from"] = rest
        elif command in ("SYSTEM", "TEMPLATE"):
            out[command.lower()] = rest
        elif command == "PARAMETER":
            key, _, value = rest.partition(" ")
            out["parameters"].setdefault(key, []).append(_parse_value(value.strip()))
        else:
            raise InvalidRequestError(f"unknown Modelfile command {command}")
    out["parameters"] = {k: v if k == "stop" else v[-1] for k, v in out["parameters"].items()}
    return out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@router.post("/api/create", responses=STREAMED)
async def create(request: Request) -> Any:
    try:
        raw = await request.json()
    except (ValueError, RecursionError):
        raise InvalidRequestError("invalid JSON in request body") from None
    if not isinstance(raw, dict):
        raise InvalidRequestError("request body must be an object")
    raw["from_"] = raw.pop("from", None)
    body = CreateBody.model_validate(raw)
    name = body.model or body.name
    if not name:
        raise InvalidRequestError("model is required")
    if body.adapters:
        raise InvalidRequestError("adapters (LoRA) are not supported: create from the base GGUF")
    if body.quantize:
        raise InvalidRequestError(
            f"quantize {body.quantize!r} is not supported: create from a GGUF already"
            " quantized (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16, F32)"
        )
    spec: dict[str, Any] = parse_modelfile(body.modelfile) if body.modelfile else {"parameters": {}}
    source = body.from_ or spec.get("from") or blob_source(store_of(request), body.files)
    if not source:
        raise InvalidRequestError("from is required (a model name or a GGUF path)")
    parameters = {**spec["parameters"], **(body.parameters or {})}
    from accordion.api.options import merge, to_request_options
    from accordion.loader.chat_template import ChatTemplate

    to_request_options(merge(parameters))  # wrong option types or ranges: a 400 now
    template = body.template or spec.get("template")
    if template:
        ChatTemplate(template)  # a template that does not compile: a 400 now, not at first use
    system = body.system or spec.get("system")
    # create reads the source file to check it is a model we can run: on a thread
    await asyncio.to_thread(store_of(request).create, name, source, parameters, system, template)
    steps = [{"status": "parsing modelfile"}, {"status": "writing manifest"}, {"status": "success"}]
    if not body.stream:
        return JSONResponse(steps[-1])

    return progress(steps)


class CopyBody(BaseModel):
    source: str
    destination: str


@router.post("/api/copy", response_class=Response)
async def copy(body: CopyBody, request: Request) -> Response:
    store_of(request).copy(body.source, body.destination)
    return Response(status_code=200)


@router.delete("/api/delete", response_class=Response)
async def delete(body: NameBody, request: Request) -> Response:
    name = body.target()
    store_of(request).delete(name)
    manager_of(request).unload(name)
    return Response(status_code=200)


@router.post("/api/pull", responses=STREAMED)
async def pull(body: NameBody, request: Request) -> Any:
    name = body.target()
    base, tag = split_tag(name)
    if base not in BUNDLED or tag != "latest":
        raise ModelNotFoundError(
            f"pull model '{name}': no network here; bundled models are {', '.join(BUNDLED)}"
        )
    store = store_of(request)
    entry = store.get(name)
    await asyncio.to_thread(store.ensure_file, entry)  # joins a chunked bundled model once
    steps = [
        {"status": "pulling manifest"},
        {
            "status": f"pulling {entry.digest[:12]}",
            "digest": f"sha256:{entry.digest}",
            "total": entry.size,
            "completed": entry.size,
        },
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]
    stream = (await request.json()).get("stream", True)
    if stream is False:
        return JSONResponse(steps[-1])

    return progress(steps)
