"""A job: its directory, its settings, its fingerprint, and the first pass over its input.

The directory holds `job.db` (the store) and nothing else the job needs: a job
resumes from it alone. Its fingerprint is what decides the results: the input's
sha256, the model and its digest, the defaults, the mode and the bad-line policy.
A job whose input, model or settings changed refuses to resume and says what
changed; how it runs (target, in-flight cap, retries) may change between runs.

The first pass streams the whole input once: it hashes it, checks every line as
the route would, and finds duplicate custom_ids from 64-bit hashes (a second
look at the few lines whose hashes collide names them), so a 10^6-line input
costs megabytes, not its size.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from accordion.batch.lines import BadLine, Defaults, parse, read
from accordion.batch.store import JobStore, Result

SHOWN_BAD = 20  # bad lines named in the message when a job refuses to start
BAD_BATCH = 1000  # error lines committed together during the first pass


def batches_root() -> Path:
    return Path(os.environ.get("ACCORDION_BATCHES", Path.home() / ".accordion" / "batches"))


@dataclass
class Settings:
    input: str
    out: str
    errors: str
    defaults: Defaults = field(default_factory=Defaults)
    mode: str = "independent"
    on_bad_line: str = "fail"
    # how it runs: free to change on resume
    endpoint: str | None = None
    api: str = "openai"
    max_inflight: int = 128  # large decode batches pay; preemptions lower it as memory needs
    kv_budget: int | None = None
    retries: int = 6
    ray: str | None = None  # spread over a Ray cluster: "auto", "local" or its address
    workers: int | None = None  # Ray workers (default: one per node, or per endpoint)
    cpus_per_worker: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Settings:
        return cls(**{**doc, "defaults": Defaults(**doc["defaults"])})

    def decisive(self) -> dict[str, Any]:
        """The settings that decide the results (part of the fingerprint)."""
        return {
            "defaults": self.defaults.as_dict(),
            "mode": self.mode,
            "on_bad_line": self.on_bad_line,
        }


def errors_path(out: Path) -> Path:
    """out.jsonl -> out.errors.jsonl"""
    return out.with_name(f"{out.stem}.errors{out.suffix or '.jsonl'}")


def default_dir(input_path: Path, out: Path) -> Path:
    """The same input and output always name the same job, so re-running resumes."""
    key = f"{input_path.resolve()}\0{out.resolve()}".encode()
    return batches_root() / f"{input_path.stem}-{hashlib.sha1(key).hexdigest()[:10]}"


@dataclass
class Scan:
    sha256: str
    requests: int  # lines that are requests (bad ones included)
    last_line: int  # the last line number of the file
    bad: int
    model: str | None
    shown: list[str]  # the first bad lines' messages


class RefusedError(ValueError):
    """The job cannot start or resume as asked; the message says why."""


class Job:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(directory / "job.db")
        self._lock_file: Any = None

    @property
    def settings(self) -> Settings | None:
        doc = self.store.get("settings")
        return None if doc is None else Settings.from_dict(doc)

    def lock(self) -> None:
        """One process runs a job at a time."""
        self._lock_file = open(self.dir / "lock", "w")  # noqa: SIM115 (held while it runs)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RefusedError(f"job {self.dir} is already running in another process") from None
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    def running_pid(self) -> int | None:
        """The pid of the process running this job, if one holds its lock."""
        path = self.dir / "lock"
        if not path.exists():
            return None
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = f.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(f, fcntl.LOCK_UN)
        return None

    def close(self) -> None:
        self.store.close()
        if self._lock_file is not None:
            self._lock_file.close()

    # -- starting and resuming ---------------------------------------------------------
    def prepare(self, settings: Settings) -> Scan:
        """Check the input (first run) or that nothing decisive changed (resume)."""
        known = self.settings
        if known is None:
            scan = first_pass(settings, self.store)
            if scan.bad and settings.on_bad_line == "fail":
                shown = "\n  ".join(scan.shown)
                hidden = scan.bad - len(scan.shown)
                more = f"\n  ... and {hidden} more" if hidden else ""
                raise RefusedError(
                    f"{scan.bad} bad line(s) in {settings.input}; nothing ran"
                    f" (--on-bad-line skip turns them into error lines):\n  {shown}{more}"
                )
            self.store.put(settings=settings.to_dict(), scan=asdict(scan), state="ready")
            return scan
        before, now = _flat(known.decisive()), _flat(settings.decisive())
        changed = [
            f"{k} {before.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(before | now)
            if before.get(k) != now.get(k)
        ]
        if changed:
            raise RefusedError(
                f"job {self.dir} was started with other settings ({'; '.join(changed)});"
                " give it another --job-dir (or output) to start a new job"
            )
        scan = Scan(**self.store.get("scan"))
        if file_sha256(Path(settings.input)) != scan.sha256:
            raise RefusedError(f"{settings.input} changed since job {self.dir} started")
        self.store.put(settings=settings.to_dict())  # how it runs may change
        return scan

    def check_model(self, model: str, digest: str | None) -> None:
        """The first run records the model; a resume must find the same one."""
        known = self.store.get("model")
        if known is None:
            self.store.put(model={"name": model, "digest": digest})
        elif known != {"name": model, "digest": digest}:
            raise RefusedError(
                f"job {self.dir} ran model {known['name']} (digest {known['digest']});"
                f" the target now has {model} (digest {digest})"
            )


def _flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"defaults": {"model": "m"}} -> {"defaults.model": "m"}, so a refusal names the field."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def first_pass(settings: Settings, store: JobStore) -> Scan:
    """Hash and check every line; under `skip` bad lines become committed error lines."""
    path, defaults = Path(settings.input), settings.defaults
    digest = hashlib.sha256()
    hashes, numbers = array("q"), array("q")
    model, requests, last, bad, shown = defaults.model, 0, 0, 0, []
    pending: list[Result] = []

    def reject(error: BadLine) -> None:
        nonlocal bad
        bad += 1
        if len(shown) < SHOWN_BAD:
            shown.append(str(error))
        if settings.on_bad_line == "skip":
            pending.append(bad_result(error))
            if len(pending) >= BAD_BATCH:
                store.commit(pending)
                pending.clear()

    for number, raw in read(path, digest):
        requests, last = requests + 1, number
        try:
            line = parse(number, raw, defaults)
            name = line.body["model"]
            if model is None:
                model = name
            elif name != model:
                raise BadLine(number, f"model {name!r} is not the job's model {model!r}")
        except BadLine as error:
            reject(error)
            continue
        hashes.append(hash(line.custom_id))
        numbers.append(number)
    for number, custom_id, first in duplicates(path, hashes, numbers):
        reject(BadLine(number, f"duplicate custom_id {custom_id!r} (first on line {first})"))
    store.commit(pending)
    return Scan(digest.hexdigest(), requests, last, bad, model, shown)


def duplicates(path: Path, hashes: array, numbers: array) -> list[tuple[int, str, int]]:
    """(line, custom_id, its first line) for each repeat of an id among the good lines."""
    h = np.frombuffer(hashes, dtype=np.int64)
    if len(h) < 2:
        return []
    sorted_h = np.sort(h)
    clash = set(sorted_h[1:][sorted_h[1:] == sorted_h[:-1]].tolist())
    if not clash:
        return []
    wanted = set(np.frombuffer(numbers, dtype=np.int64)[np.isin(h, list(clash))].tolist())
    first: dict[str, int] = {}
    repeats = []
    for number, raw in read(path):
        if number in wanted:
            custom_id = _custom_id(raw)
            if custom_id in first:
                repeats.append((number, custom_id, first[custom_id]))
            else:
                first[custom_id] = number
    return repeats


def _custom_id(raw: bytes) -> str:
    return json.loads(raw)["custom_id"]


def bad_result(error: BadLine) -> Result:
    record = {
        "id": f"batch_req_line_{error.number}",
        "custom_id": error.custom_id,
        "response": None,
        "error": {"code": "invalid_line", "message": str(error)},
    }
    return Result(error.number, error.custom_id, False, json.dumps(record, ensure_ascii=False))
