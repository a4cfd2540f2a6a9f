"""A job seen from outside while it runs or after: its status, every job on this
machine, cancelling one, and giving its unrun requests error lines (the Batch API's
cancelled and expired batches). All of it reads or writes the job store alone."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from accordion.batch.job import Job, RefusedError, batches_root
from accordion.batch.lines import read
from accordion.batch.store import Result, Sink


def status(job_dir: str | Path) -> dict[str, Any]:
    """A job's state and counts, read from its store (safe while it runs)."""
    job = existing(Path(job_dir))
    try:
        settings, scan, counts = job.settings, job.store.get("scan"), job.store.counts()
        assert settings is not None
        state, pid = job.store.get("state"), job.running_pid()
        if state == "running" and pid is None:
            state = "interrupted"  # its process died without saying so
        return {
            "job_dir": str(job.dir),
            "state": state,
            "pid": pid,
            "input": settings.input,
            "out": settings.out,
            "errors": settings.errors,
            "model": (job.store.get("model") or {}).get("name") or scan["model"],
            "total": scan["requests"],
            "done": counts.done,
            "ok": counts.ok,
            "failed": counts.failed,
            "pending": scan["requests"] - counts.done,
            "prompt_tokens": counts.prompt_tokens,
            "cached_tokens": counts.cached_tokens,
            "completion_tokens": counts.completion_tokens,
        }
    finally:
        job.close()


def jobs(root: Path | None = None) -> list[dict[str, Any]]:
    """The status of every job under the default jobs folder (or `root`), and of the
    batches `accordion serve` runs for the Batch API (in its store's `batches/`); each
    with a `name` (the folder, or the batch id) and a `kind` ("job" or "batch")."""
    from accordion.server.store import default_root

    root = root or batches_root()
    found = [(p.parent, "job") for p in sorted(root.glob("*/job.db"))] if root.is_dir() else []
    served = default_root() / "batches"
    found += [(p.parent, "batch") for p in sorted(served.glob("batch_*/job/job.db"))]
    out = []
    for directory, kind in found:
        name = directory.parent.name if kind == "batch" else directory.name
        try:
            doc = status(directory)
        except RefusedError:  # its input had bad lines: it holds nothing to show
            doc = {
                "job_dir": str(directory),
                "state": "not started",
                "done": 0,
                "total": 0,
                "failed": 0,
                "model": "",
            }
        out.append({"name": name, "kind": kind, **doc})
    return out


def cancel(job_dir: str | Path) -> bool:
    """Ask a running job to stop (it commits what is done); True if one was running."""
    job = existing(Path(job_dir))
    try:
        running = job.running_pid() is not None
        job.store.put(state="cancelling" if running else "cancelled")
        return running
    finally:
        job.close()


def abandon(job_dir: str | Path, code: str, message: str) -> int:
    """Give every request without a result an error line instead (`code`, e.g. the Batch
    API's batch_expired): committed like any result, so once however often it runs.
    Returns how many. The job must not be running."""
    job = existing(Path(job_dir))
    try:
        job.lock()
        settings = job.settings
        assert settings is not None
        scan = job.store.get("scan")
        done = job.store.done_lines(scan["last_line"])
        sink = Sink(Path(settings.errors), ok=False)
        sink.open(job.store)
        error = {"code": code, "message": message}
        pending = []
        for number, raw in read(Path(settings.input)):
            if not done[number]:
                custom_id = _custom_id(raw)
                record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id}
                text = json.dumps({**record, "response": None, "error": error})
                pending.append(Result(number, custom_id, False, text))
        for start in range(0, len(pending), 1000):
            chunk = pending[start : start + 1000]
            job.store.commit(chunk)
            sink.write([r.record for r in chunk])
        sink.close()
        return len(pending)
    finally:
        job.close()


def _custom_id(raw: bytes) -> str | None:
    try:
        return str(json.loads(raw)["custom_id"])
    except (ValueError, KeyError, TypeError):
        return None


def existing(directory: Path) -> Job:
    """The job at `directory`, which must have started (RefusedError otherwise)."""
    if not (directory / "job.db").is_file():
        raise RefusedError(f"no batch job at {directory}")
    job = Job(directory)
    if job.settings is None:
        job.close()
        raise RefusedError(f"the job at {directory} never started (its input had bad lines)")
    return job
