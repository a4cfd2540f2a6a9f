"""A job's store: one SQLite database (WAL) that is the truth of what is done.

A result counts once its transaction commits: it holds the exact output line, so
the output and error files are copies that can always be brought up to date. They
are appended only after a commit, in commit order, so each file is a prefix of the
committed results of its kind; `Sink.open` cuts a torn last line (a crash during
a write) and appends whatever the file lacks. A killed job therefore loses only
results that were never committed, and resuming redoes exactly those.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY,
    line INTEGER NOT NULL UNIQUE,
    custom_id TEXT,
    ok INTEGER NOT NULL,
    record TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    chunk INTEGER  -- conversation mode: the chat it was part of
);
"""


@dataclass
class Result:
    line: int
    custom_id: str | None
    ok: bool
    record: str  # the output line, JSON
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    chunk: int | None = None


@dataclass
class Counts:
    ok: int
    failed: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    @property
    def done(self) -> int:
        return self.ok + self.failed


class JobStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        # the runner's one thread owns the connection; status readers open their own
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a killed process
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- settings and state ------------------------------------------------------------
    def get(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, **values: Any) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(k, json.dumps(v)) for k, v in values.items()],
            )

    # -- results -----------------------------------------------------------------------
    def commit(self, results: list[Result]) -> None:
        """Record results in one transaction: after it, they count, and only then."""
        if not results:
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO results (line, custom_id, ok, record, prompt_tokens, cached_tokens,"
                " completion_tokens, chunk) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.line,
                        r.custom_id,
                        int(r.ok),
                        r.record,
                        r.prompt_tokens,
                        r.cached_tokens,
                        r.completion_tokens,
                        r.chunk,
                    )
                    for r in results
                ],
            )

    def done_lines(self, lines: int) -> bytearray:
        """done[n] == 1 for each input line n that has a committed result."""
        done = bytearray(lines + 1)
        for (n,) in self.db.execute("SELECT line FROM results"):
            if n <= lines:
                done[n] = 1
        return done

    def counts(self) -> Counts:
        row = self.db.execute(
            "SELECT COALESCE(SUM(ok), 0), COUNT(*) - COALESCE(SUM(ok), 0),"
            " COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(cached_tokens), 0),"
            " COALESCE(SUM(completion_tokens), 0) FROM results"
        ).fetchone()
        return Counts(*row)

    def last_chunk(self) -> tuple[int, list[tuple[int, str]]] | None:
        """Conversation mode: the newest chunk and its answered (line, record)s in order."""
        row = self.db.execute("SELECT MAX(chunk) FROM results").fetchone()
        if row is None or row[0] is None:
            return None
        rows = self.db.execute(
            "SELECT line, record FROM results WHERE chunk = ? AND ok = 1 ORDER BY seq", (row[0],)
        ).fetchall()
        return row[0], rows

    def records(self, ok: bool, skip: int) -> Iterator[str]:
        """The committed output lines of one kind, in commit order, after the first `skip`."""
        cursor = self.db.execute(
            "SELECT record FROM results WHERE ok = ? ORDER BY seq LIMIT -1 OFFSET ?",
            (int(ok), skip),
        )
        for (record,) in cursor:
            yield record


class Sink:
    """An output file kept equal to a prefix of the committed results of its kind."""

    def __init__(self, path: Path, ok: bool) -> None:
        self.path, self.ok = path, ok
        self.file: Any = None

    def open(self, store: JobStore) -> None:
        """Cut a torn last line, then append every committed line the file lacks."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+b")  # noqa: SIM115 (appended to until close)
        lines = _cut_torn_tail(self.file)
        counts = store.counts()
        committed = counts.ok if self.ok else counts.failed
        if lines > committed:
            raise ValueError(
                f"{self.path} has {lines} lines but the job committed {committed}: it was"
                " changed outside the job; move it away and resume to rebuild it"
            )
        self.write(list(store.records(self.ok, lines)))

    def write(self, records: list[str]) -> None:
        if records:
            self.file.write("".join(r + "\n" for r in records).encode())
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _cut_torn_tail(f: Any) -> int:
    """Truncate `f` after its last newline; return how many whole lines it holds."""
    size = f.seek(0, os.SEEK_END)
    end, lines, pos = 0, 0, 0
    f.seek(0)
    while chunk := f.read(1 << 20):
        count = chunk.count(b"\n")
        if count:
            lines += count
            end = pos + chunk.rfind(b"\n") + 1
        pos += len(chunk)
    if end != size:
        f.truncate(end)
    f.seek(0, os.SEEK_END)
    return lines
