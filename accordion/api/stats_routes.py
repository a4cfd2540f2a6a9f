"""What the server sampled of itself (server/stats.py), and the page that draws it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from fastapi.staticfiles import StaticFiles

from accordion.api.app import streamed
from accordion.api.service import manager_of
from accordion.server.stats import HISTORY_S

router = APIRouter()
DASHBOARD = Path(__file__).resolve().parent.parent / "dashboard"


@router.get("/api/stats")
async def stats(request: Request) -> dict[str, Any]:
    """The newest sample: the process and every loaded model."""
    return manager_of(request).stats.latest() or {"t": None, "process": {}, "models": {}}


@router.get("/api/stats/history")
async def history(
    request: Request, seconds: float = Query(300, gt=0, le=HISTORY_S)
) -> dict[str, Any]:
    """Samples and load/unload events of the last `seconds`."""
    return manager_of(request).stats.history(seconds)


@router.get("/api/stats/stream", responses=streamed("text/event-stream"))
async def stream(request: Request) -> StreamingResponse:
    """Each new sample as a server-sent event, until the client goes away."""
    sampler = manager_of(request).stats

    async def events() -> AsyncIterator[bytes]:
        last = None
        while True:
            sample = sampler.latest()
            if sample is not None and sample is not last:
                last = sample
                yield f"data: {json.dumps(sample)}\n\n".encode()
            await asyncio.sleep(sampler.interval_s / 4)

    return StreamingResponse(events(), media_type="text/event-stream")


@router.get("/api/batches")
async def batches() -> dict[str, Any]:
    """Batch jobs on this machine (`accordion batch`, Ray jobs included, and this server's
    Batch API batches) with their counts; no paths: only names."""
    from accordion import batch

    shown = ("name", "kind", "state", "model", "done", "total", "failed")
    found = await asyncio.to_thread(batch.jobs)  # SQLite reads: off the event loop
    return {"batches": [{key: job.get(key) for key in shown} for job in found]}


def mount_dashboard(app: Any) -> None:
    """/dashboard/: static files from the package (no CDN: it works offline)."""
    app.mount("/dashboard", StaticFiles(directory=DASHBOARD, html=True), name="dashboard")
