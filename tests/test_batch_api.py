"""OpenAI's Batch API on `accordion serve`, through the official client: files, batches,
failure by line, cancel with partial output, pages, and a server killed mid-batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from live_server import LiveServer

pytestmark = pytest.mark.slow

MODEL = "smollm2"


def lines(n: int, max_tokens: int = 2, start: int = 0) -> bytes:
    rows = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Count to {i}."}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        }
        for i in range(start, start + n)
    ]
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


def client_of(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=2, timeout=120)


def submit(client: openai.OpenAI, name: str, data: bytes) -> Any:
    """Upload `data` as a batch input and start a chat-completions batch on it."""
    upload = client.files.create(file=(name, data), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def wait(client: openai.OpenAI, batch_id: str, until: set[str], seconds: float = 300) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = client.batches.retrieve(batch_id)
        if found.status in until:
            return found
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} still {found.status}")


def output_ids(client: openai.OpenAI, file_id: str | None) -> list[str]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(row)["custom_id"] for row in text.splitlines() if row.strip()]


def error_codes(client: openai.OpenAI, file_id: str | None) -> dict[str, str]:
    """custom_id -> error code of each line of an error file (asserting each id once)."""
    rows = (
        [json.loads(r) for r in client.files.content(file_id).text.splitlines() if r]
        if file_id
        else []
    )
    assert len({r["custom_id"] for r in rows}) == len(rows)
    return {r["custom_id"]: r["error"]["code"] for r in rows}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batch-api")


def test_a_batch_of_200_completes_with_every_id(models: Path) -> None:
    server = LiveServer(models)
    try:
        client = client_of(server)
        upload = client.files.create(file=("in.jsonl", lines(200)), purpose="batch")
        assert upload.bytes > 0 and client.files.retrieve(upload.id).filename == "in.jsonl"
        created = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert created.status == "validating"
        done = wait(client, created.id, {"completed", "failed"})
        assert done.status == "completed", done
        assert done.request_counts.total == done.request_counts.completed == 200
        text = client.files.content(done.output_file_id).text
        rows = [json.loads(r) for r in text.splitlines()]
        assert sorted(r["custom_id"] for r in rows) == sorted(f"req-{i}" for i in range(200))
        body = rows[0]["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
        assert client.files.list(purpose="batch").data[0].id == upload.id
        # `accordion batch list` shows the server's batches beside its own jobs
        listed = subprocess.run(
            [str(Path(sys.executable).with_name("accordion")), "batch", "list"],
            env={
                **os.environ,
                "ACCORDION_MODELS": str(models),
                "ACCORDION_BATCHES": str(models / "jobs"),
            },  # fmt: skip
            capture_output=True,
            text=True,
            timeout=120,
        )
        row = next(line for line in listed.stdout.splitlines() if created.id in line)
        assert "finished" in row and "200/200" in row
    finally:
        server.stop()


def test_bad_lines_fail_the_batch_naming_them(models: Path) -> None:
    server = LiveServer(models)
    try:
        client = client_of(server)
        bad = lines(3) + b"{not json\n" + lines(1, start=0)  # line 4 broken, line 5 a repeat
        created = submit(client, "bad.jsonl", bad)
        failed = wait(client, created.id, {"failed", "completed"})
        assert failed.status == "failed"
        named = {e.line: e.message for e in failed.errors.data}
        assert 4 in named and 5 in named and "duplicate" in named[5]
        assert failed.output_file_id is None
        elsewhere = lines(2).replace(b"/v1/chat/completions", b"/v1/completions", 1)
        created = submit(client, "url.jsonl", elsewhere)
        failed = wait(client, created.id, {"failed", "completed"})
        assert failed.status == "failed" and failed.errors.data[0].line == 1
        assert "not the batch's endpoint" in failed.errors.data[0].message
    finally:
        server.stop()


def test_cancel_keeps_the_partial_output_and_list_pages(models: Path) -> None:
    server = LiveServer(models)
    try:
        client = client_of(server)
        created = submit(client, "long.jsonl", lines(400, max_tokens=24))
        deadline = time.monotonic() + 120
        while client.batches.retrieve(created.id).request_counts.completed < 5:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # a chat arriving mid-batch is admitted ahead of the batch's queued requests
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert chat.choices[0].message.content is not None
        running = client.batches.retrieve(created.id)
        assert running.status == "in_progress" and running.request_counts.completed < 400
        assert client.batches.cancel(created.id).status == "cancelling"
        cancelled = wait(client, created.id, {"cancelled", "completed"})
        assert cancelled.status == "cancelled"
        ids = output_ids(client, cancelled.output_file_id)
        assert 0 < len(ids) < 400 and len(set(ids)) == len(ids)
        never_ran = error_codes(client, cancelled.error_file_id)
        assert set(never_ran.values()) == {"batch_cancelled"}
        assert sorted([*ids, *never_ran]) == sorted(f"req-{i}" for i in range(400))
        assert cancelled.request_counts.failed == len(never_ran)
        submit(client, "one.jsonl", lines(1))
        page = client.batches.list(limit=1)
        assert len(page.data) == 1 and page.has_more
        rest = client.batches.list(limit=100, after=page.data[0].id)
        assert page.data[0].id not in {b.id for b in rest.data} and rest.data
    finally:
        server.stop()


def test_a_batch_past_its_window_expires_with_its_partial_output(models: Path) -> None:
    server = LiveServer(models, env={"ACCORDION_BATCH_WINDOW": "5s"})
    try:
        client = client_of(server)
        # far more work than 5 s holds on any machine we run on (~10^5 tokens)
        created = submit(client, "slow.jsonl", lines(2000, max_tokens=64))
        assert created.expires_at - created.created_at == 5
        expired = wait(client, created.id, {"expired", "completed"})
        assert expired.status == "expired" and expired.expired_at >= created.expires_at
        ids = output_ids(client, expired.output_file_id)
        never_ran = error_codes(client, expired.error_file_id)
        assert ids and never_ran and set(never_ran.values()) == {"batch_expired"}
        assert sorted([*ids, *never_ran]) == sorted(f"req-{i}" for i in range(2000))
        counts = expired.request_counts
        assert (counts.total, counts.completed, counts.failed) == (2000, len(ids), len(never_ran))
    finally:
        server.stop()


def test_a_server_killed_mid_batch_finishes_it_after_a_restart(models: Path) -> None:
    server = LiveServer(models)
    client = client_of(server)
    created = submit(client, "kill.jsonl", lines(300, max_tokens=12))
    deadline = time.monotonic() + 120
    while (now := client.batches.retrieve(created.id)).request_counts.completed < 20:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert now.status == "in_progress" and now.request_counts.completed < 300  # mid-batch
    server.proc.kill()  # kill -9: no shutdown, no flush
    server.proc.wait()
    again = LiveServer(models)
    try:
        client = client_of(again)
        done = wait(client, created.id, {"completed", "failed"})
        assert done.status == "completed"
        ids = output_ids(client, done.output_file_id)
        assert sorted(ids) == sorted(f"req-{i}" for i in range(300))  # each exactly once
    finally:
        again.stop()
