"""Batch jobs over Ray, on one local Ray instance (`ray.init(num_cpus=2)`) the tests share:
two workers give the local runner's outputs; a worker killed mid-job loses nothing and
writes nothing twice; the CLI joins a cluster by its address; workers as clients of a
server; and the Ray Data class on a dataset with a row that cannot run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import LiveServer
from test_batch import GREEDY, MODEL, SYSTEM, answers, questions, write_lines

from accordion import batch

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
N = 200


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The shared local instance; yields its address for other processes to join."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def jobs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCORDION_BATCHES", str(tmp_path / "batches"))  # workers get these too
    monkeypatch.setenv("ACCORDION_MODELS", str(tmp_path / "models"))


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The 200-request input and the local (embedded) runner's answers to it."""
    folder = tmp_path_factory.mktemp("ray-job")
    inp = write_lines(folder / "in.jsonl", questions(N))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ACCORDION_BATCHES", str(folder / "batches"))
        env.setenv("ACCORDION_MODELS", str(folder / "models"))
        local = folder / "local.jsonl"
        progress = batch.run(inp, local, model=MODEL, system=SYSTEM, sampling=GREEDY)
    assert progress.state == "finished" and progress.workers == 1
    return inp, answers(folder / "local.jsonl")


def run_on_ray(inp: Path, out: Path, **options: object) -> batch.Progress:
    return batch.run(inp, out, model=MODEL, system=SYSTEM, sampling=GREEDY, ray="auto", **options)


def worker_pids() -> list[int]:
    names = sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("accordion-worker-")
    )
    return [ray.get(ray.get_actor(name).identity.remote())["pid"] for name in names]


def test_two_workers_give_the_local_runners_outputs(
    cluster: str, job: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    inp, expected = job
    progress = run_on_ray(inp, tmp_path / "out.jsonl", workers=2)
    assert progress.state == "finished" and progress.done == N and progress.failed == 0
    assert progress.workers == 2 and progress.requeued == 0
    assert progress.planned > 128  # the cap is per engine: two engines, twice the room
    assert answers(tmp_path / "out.jsonl") == expected  # each id once, the same text
    errors = tmp_path / "out.errors.jsonl"
    assert not errors.exists() or errors.read_text() == ""


def test_a_worker_killed_mid_job_loses_nothing_and_writes_nothing_twice(
    cluster: str, job: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    inp, expected = job
    killed: list[int] = []
    started, halfway = threading.Event(), threading.Event()

    def watch(p: batch.Progress) -> None:
        started.set()
        if p.done >= N // 4:
            halfway.set()

    def kill_one() -> None:  # not on the job's loop: an actor answers between its pumps
        if started.wait(timeout=300):
            pid = worker_pids()[0]
            if halfway.wait(timeout=300):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    # 8 in flight per engine: the job lasts, and each worker holds a few when one dies
    progress = run_on_ray(inp, tmp_path / "out.jsonl", workers=2, max_inflight=8, on_progress=watch)
    killer.join(timeout=5)
    assert killed, "the job ended before a worker could be killed"
    assert progress.state == "finished" and progress.done == N and progress.failed == 0
    assert progress.requeued > 0  # the dead worker held requests: they ran again elsewhere
    assert answers(tmp_path / "out.jsonl") == expected


def test_the_cli_joins_a_cluster_by_its_address(cluster: str, tmp_path: Path) -> None:
    inp = write_lines(tmp_path / "in.jsonl", questions(12))
    out = tmp_path / "out.jsonl"
    args = ["run", str(inp), "-o", str(out), "-m", MODEL, "--max-tokens", "4", "--temperature"]
    done = subprocess.run(
        [sys.executable, "-m", "accordion", "batch", *args, "0"]
        + ["--ray", cluster, "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Ray workers 2, requeued 0" in done.stderr
    assert len(answers(out)) == 12
    refused = subprocess.run(
        [sys.executable, "-m", "accordion", "batch", *args, "0", "--mode", "conversation"]
        + ["--ray", cluster],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "does not spread over Ray" in refused.stderr


def test_workers_as_clients_of_a_server_give_the_same_outputs(
    cluster: str, job: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    inp, expected = job
    (tmp_path / "models").mkdir()
    server = LiveServer(tmp_path / "models")
    try:
        progress = run_on_ray(inp, tmp_path / "out.jsonl", endpoint=server.url, workers=2)
    finally:
        server.stop()
    assert progress.state == "finished" and progress.workers == 2
    assert answers(tmp_path / "out.jsonl") == expected


def test_ray_data_chat_answers_rows_and_isolates_a_bad_one(
    cluster: str, job: tuple[Path, dict[str, str]]
) -> None:
    from accordion.batch.ray_data import Chat

    _, expected = job
    rows = [{"id": q["custom_id"], "prompt": q["prompt"]} for q in questions(24)]
    rows.insert(5, {"id": "too-long", "prompt": "word " * 20_000})
    started = time.monotonic()
    found = (
        ray.data.from_items(rows)
        .map_batches(
            Chat,
            fn_constructor_kwargs={"model": MODEL, "system": SYSTEM, **GREEDY},
            concurrency=2,
            num_cpus=1,
            batch_size=8,
        )
        .take_all()
    )
    assert time.monotonic() - started < 300
    by_id = {row["id"]: row for row in found}
    assert len(found) == 25 and len(by_id) == 25
    bad = by_id.pop("too-long")
    assert "context" in bad["error"] and bad["generated_text"] == ""
    for key, row in by_id.items():
        assert row["error"] == "" and row["completion_tokens"] > 0
        assert row["generated_text"] == expected[key], key
