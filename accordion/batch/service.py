"""OpenAI's Batch API on `accordion serve`: batches run as batch jobs against the server.

A batch is a folder `<root>/<batch id>/` holding its object (`batch.json`), its job
store (`job/`, the same one `accordion batch` keeps) and its output files while they
are written. One batch runs at a time, on a thread of its own that sends the requests
to this server over loopback HTTP, so the job's checkpointing and retries are the ones
`accordion batch --endpoint` has, and the engines stay on the main thread. A server
killed mid-batch resumes it when it starts again: exactly once, as any job resumes.

Statuses follow OpenAI's: validating (the first pass over the input), failed (bad
lines: `errors` names them; nothing ran), in_progress, finalizing (the outputs become
files), completed; cancelling then cancelled keep the partial output. A batch still
running at `expires_at` (24 hours after it was created; ACCORDION_BATCH_WINDOW shortens
the window on a busy server) stops there and ends expired, with its partial output.
Requests a cancelled or expired batch never ran get error lines (batch_cancelled,
batch_expired), so every custom_id is in one of its two files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from accordion import batch
from accordion.batch.files import FileStore
from accordion.batch.job import RefusedError
from accordion.errors import InvalidRequestError
from accordion.server.durations import parse_keep_alive

log = logging.getLogger("accordion.batch")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
WINDOW_S = parse_keep_alive(os.environ.get("ACCORDION_BATCH_WINDOW", "24h"))
SERVER_INFLIGHT = 32  # a batch leaves the server room for interactive requests
OPEN = ("validating", "in_progress", "finalizing", "cancelling")


class NoSuchBatch(KeyError):
    pass


class Batches:
    def __init__(self, root: Path, files: FileStore, url: str) -> None:
        self.root, self.files, self.url = root, files, url
        self._lock = threading.Lock()
        self._queue: deque[str] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the API's verbs ------------------------------------------------------------
    def create(
        self, input_file_id: str, endpoint: str, window: str, metadata: dict | None
    ) -> dict[str, Any]:
        if endpoint not in ENDPOINTS:
            raise InvalidRequestError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if window != "24h":
            raise InvalidRequestError("completion_window must be '24h'")
        self.files.path(input_file_id)  # NoSuchFile: a 404 from the route
        now = int(time.time())
        doc = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + int(WINDOW_S),
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata or {},
            "usage": None,
        }
        (self.root / doc["id"]).mkdir(parents=True)
        self._save(doc)
        self._enqueue(doc["id"])
        return doc

    def get(self, batch_id: str) -> dict[str, Any]:
        path = self._folder(batch_id) / "batch.json"
        if not path.is_file():
            raise NoSuchBatch(batch_id)
        doc = json.loads(path.read_text())
        if doc["status"] in ("in_progress", "cancelling"):  # live counts from the job
            self._count(doc)
        return doc

    def list(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; `after` is the last id of the previous page."""
        docs = sorted(
            (json.loads(p.read_text()) for p in self.root.glob("batch_*/batch.json")),
            key=lambda d: (d["created_at"], d["id"]),
            reverse=True,
        )
        if after is not None:
            ids = [d["id"] for d in docs]
            if after not in ids:
                raise NoSuchBatch(after)
            docs = docs[ids.index(after) + 1 :]
        return docs[:limit], len(docs) > limit

    def cancel(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            doc = self.get(batch_id)
            if doc["status"] not in OPEN:
                raise InvalidRequestError(f"batch {batch_id} is {doc['status']}: nothing to cancel")
            doc["status"], doc["cancelling_at"] = "cancelling", int(time.time())
            self._save(doc)
        job = self._folder(batch_id) / "job"
        if (job / "job.db").is_file():
            batch.cancel(job)  # the running job stops at its next checkpoint
        return doc

    def resume_all(self) -> None:
        """After a restart: every batch left open runs (on) again, oldest first."""
        docs = [json.loads(p.read_text()) for p in self.root.glob("batch_*/batch.json")]
        for doc in sorted(docs, key=lambda d: d["created_at"]):
            if doc["status"] in OPEN:
                log.info("batch=%s resuming (was %s)", doc["id"], doc["status"])
                self._enqueue(doc["id"])

    # -- running ----------------------------------------------------------------------
    def _enqueue(self, batch_id: str) -> None:
        with self._lock:
            self._queue.append(batch_id)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="accordion-batches", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _work(self) -> None:
        while True:
            with self._lock:
                batch_id = self._queue.popleft() if self._queue else None
            if batch_id is None:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self._run(batch_id)
            except Exception:  # a bug fails its batch, not the server
                log.exception("batch=%s failed", batch_id)
                self._update(batch_id, status="failed", failed_at=int(time.time()))

    def _run(self, batch_id: str) -> None:
        doc = self.get(batch_id)
        folder = self._folder(batch_id)
        ending = self._ending(folder)
        if ending is not None:  # the server stopped while it finalized: finish that
            self._finalize(doc, ending)
            return
        if doc["status"] == "cancelling" and not (folder / "job" / "job.db").is_file():
            self._finalize(doc, "cancelled")
            return
        if time.time() >= doc["expires_at"]:  # its window passed while it waited
            self._finalize(doc, "expired")
            return
        out, errors = folder / "output.jsonl", folder / "errors.jsonl"
        wrong = _other_urls(self.files.path(doc["input_file_id"]), doc["endpoint"])
        if wrong:  # OpenAI's rule: every line goes to the batch's endpoint
            errors_doc = {"object": "list", "data": [_error(n, m, "url") for n, m in wrong]}
            self._update(batch_id, status="failed", failed_at=int(time.time()), errors=errors_doc)
            return
        try:
            progress = batch.run(
                self.files.path(doc["input_file_id"]),
                out,
                errors=errors,
                job_dir=folder / "job",
                endpoint=self.url,
                max_inflight=SERVER_INFLIGHT,
                on_progress=lambda p: self._progress(batch_id, p),
            )
        except RefusedError as e:  # bad lines: nothing ran
            errors_doc = _errors(str(e))
            self._update(batch_id, status="failed", failed_at=int(time.time()), errors=errors_doc)
            return
        if progress.state == "interrupted":  # the server is stopping: resumed at its start
            return
        ended = "cancelled" if progress.state == "cancelled" else "completed"
        self._finalize(self.get(batch_id), self._ending(folder) or ended)

    def _progress(self, batch_id: str, progress: batch.Progress) -> None:
        with self._lock:
            doc = self.get(batch_id)
            if doc["status"] == "validating":  # the first report ends validation
                doc["status"], doc["in_progress_at"] = "in_progress", int(time.time())
                self._save(doc)
        folder = self._folder(batch_id)
        if time.time() >= doc["expires_at"] and self._ending(folder) is None:
            log.info("batch=%s expired: stopping it", batch_id)
            (folder / "ending").write_text("expired")
            batch.cancel(folder / "job")  # the job stops at its next checkpoint

    def _ending(self, folder: Path) -> str | None:
        """How a batch that is finalizing ends (its folder keeps it across a restart)."""
        path = folder / "ending"
        return path.read_text() if path.is_file() else None

    def _finalize(self, doc: dict[str, Any], status: str) -> None:
        folder = self._folder(doc["id"])
        (folder / "ending").write_text(status)
        self._update(doc["id"], status="finalizing", finalizing_at=int(time.time()))
        job = folder / "job"
        if status in ("cancelled", "expired") and (job / "job.db").is_file():
            why = "before the batch was cancelled" if status == "cancelled" else "in its window"
            with contextlib.suppress(RefusedError):  # refused at validation: nothing to run
                batch.abandon(job, f"batch_{status}", f"This request was not run {why}.")
        found = {}
        for name, key in (("output.jsonl", "output_file_id"), ("errors.jsonl", "error_file_id")):
            path = folder / name
            if path.is_file() and path.stat().st_size:
                found[key] = self.files.adopt(path, f"{doc['id']}_{name}", "batch_output")["id"]
        done = self.get(doc["id"])
        self._count(done)
        counted = {"request_counts": done["request_counts"], "usage": done["usage"]}
        stamp = {f"{status}_at": int(time.time())}
        self._update(doc["id"], status=status, **found, **counted, **stamp)
        (folder / "ending").unlink()

    def _count(self, doc: dict[str, Any]) -> None:
        job = self._folder(doc["id"]) / "job"
        if not (job / "job.db").is_file():
            return
        try:
            s = batch.status(job)
        except RefusedError:
            return
        doc["request_counts"] = {"total": s["total"], "completed": s["ok"], "failed": s["failed"]}
        doc["usage"] = {
            "input_tokens": s["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": s["cached_tokens"]},
            "output_tokens": s["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": s["prompt_tokens"] + s["completion_tokens"],
        }

    # -- storage ----------------------------------------------------------------------
    def _update(self, batch_id: str, **fields: Any) -> None:
        with self._lock:
            doc = json.loads((self._folder(batch_id) / "batch.json").read_text())
            doc.update(fields)
            self._save(doc)

    def _save(self, doc: dict[str, Any]) -> None:
        path = self._folder(doc["id"]) / "batch.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(path)  # a crash leaves the old object or the new one, never half

    def _folder(self, batch_id: str) -> Path:
        if not re.fullmatch(r"batch_[0-9a-f]{24}", batch_id):
            raise NoSuchBatch(batch_id)
        return self.root / batch_id


def _other_urls(path: Path, endpoint: str, shown: int = 20) -> list[tuple[int, str]]:
    """Lines whose `url` is not the batch's endpoint (unreadable lines are the job's
    first pass's to report)."""
    found = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                url = json.loads(raw).get("url", endpoint)
            except (ValueError, AttributeError):
                continue
            if url != endpoint:
                found.append((number, f"url {url!r} is not the batch's endpoint {endpoint!r}"))
                if len(found) >= shown:
                    break
    return found


def _errors(message: str) -> dict[str, Any]:
    """The refusal's named lines as OpenAI's batch errors."""
    data = []
    for line in message.splitlines()[1:]:
        found = re.match(r"\s*line (\d+): (.*)", line)
        if found:
            data.append(_error(int(found.group(1)), found.group(2)))
    return {"object": "list", "data": data or [_error(None, message)]}


def _error(line: int | None, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": "invalid_request", "line": line, "message": message, "param": param}
