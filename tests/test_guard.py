"""The guard middleware on its own, over a tiny ASGI app: what every route gets."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from accordion.api.guard import Guard, register_cleanup
from accordion.api.security import Policy
from accordion.loader import bundled

cleaned: list[str] = []


async def boom(request: Request) -> JSONResponse:
    register_cleanup(request, lambda: cleaned.append("boom"))
    raise RuntimeError("a bug")


async def echo(request: Request) -> JSONResponse:
    register_cleanup(request, lambda: cleaned.append("echo"))
    return JSONResponse({"bytes": len(await request.body())})


def client(policy: Policy | None = None) -> httpx.AsyncClient:
    app = Starlette(  # placed as create_app places it: inside Starlette's error middleware
        routes=[Route("/boom", boom), Route("/echo", echo, methods=["POST"])],
        middleware=[Middleware(Guard, policy=policy or Policy())],
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1")


@pytest.mark.anyio
async def test_an_unhandled_error_is_a_json_500_that_closes_and_cleans_up() -> None:
    cleaned.clear()
    async with client() as c:
        r = await c.get("/boom", headers={"x-request-id": "abc"})
    assert r.status_code == 500 and r.headers["connection"] == "close"
    assert r.json() == {"error": "internal server error (request id abc)"}
    assert r.headers["x-request-id"] == "abc" and cleaned == ["boom"]


@pytest.mark.anyio
async def test_cleanups_run_and_request_ids_are_echoed() -> None:
    cleaned.clear()
    async with client() as c:
        r = await c.post("/echo", json={"a": 1})
    assert r.status_code == 200 and r.headers["x-request-id"] and cleaned == ["echo"]


@pytest.mark.anyio
async def test_a_chunked_body_over_the_limit_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("accordion.api.guard.MAX_BODY", 1000)

    async def chunks():  # no Content-Length: only counting what arrives can stop it
        for _ in range(100):
            yield b" " * 100

    async with client() as c:
        r = await c.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.headers["connection"] == "close"


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:8080", True),
        ("http://[::1]:3", True),
        ("https://127.0.0.1", True),
        ("vscode-webview://abc", True),
        ("http://localhost.evil.com", False),
        ("http://evil.example.com", False),
        ("https://app.example.com", True),
        ("https://x.example.org", True),
    ],
)
def test_origins(origin: str, allowed: bool) -> None:
    policy = Policy(origins=["https://app.example.com", "https://*.example.org"])
    assert policy.origin_allowed(origin) is allowed


def test_hosts_when_bound_publicly_or_listed() -> None:
    assert not Policy().host_allowed("evil.example.com")
    assert Policy(loopback_only=False).host_allowed("evil.example.com")
    assert Policy(hosts=["llm.example.com"]).host_allowed("llm.example.com:11434")
    assert Policy.from_env("0.0.0.0").loopback_only is False
    assert Policy.from_env("127.0.0.1").loopback_only is True


def test_api_key_spares_only_the_health_routes() -> None:
    policy = Policy(api_key="k")
    assert policy.key_accepted("/", None) and policy.key_accepted("/api/version", None)
    assert not policy.key_accepted("/api/tags", None)
    assert not policy.key_accepted("/api/tags", "Bearer wrong")
    assert policy.key_accepted("/api/tags", "Bearer k")


def test_a_join_killed_midway_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACCORDION_CACHE", str(tmp_path))
    model = bundled.BUNDLED["gemma3"]
    target = bundled.joined_path(model)
    target.parent.mkdir(parents=True)
    dead = target.with_suffix(".tmp999999999")  # no such process
    dead.write_bytes(b"half a model")
    alive = target.with_suffix(f".tmp{os.getppid()}")  # another live process is joining
    alive.write_bytes(b"in progress")
    bundled._remove_stale(target)
    assert not dead.exists() and alive.exists()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
