"""Batch jobs: a JSONL file of requests through one model, exactly once across crashes.

    from accordion import batch
    progress = batch.run("in.jsonl", "out.jsonl", model="smollm2", system="You are ...")
    batch.resume(job_dir)            # after a crash, Ctrl-C or `batch cancel`
    batch.status(job_dir)            # counts and state, from the job store alone

Embedded (no endpoint), the server's own app runs in this process: the engine on
the calling thread (the main thread, where torch is fastest), the job's loop on a
second one talking to the app through ASGI. With an endpoint, the job's loop runs
here and the requests go over HTTP; with `ray`, over worker actors (cluster.py).
Ctrl-C stops cleanly: in-flight requests are not recorded and resume redoes them; a
second Ctrl-C stops at once. Status, the list of jobs and cancel: manage.py.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from accordion.batch.job import (
    Job,
    RefusedError,
    Scan,
    Settings,
    default_dir,
    errors_path,
)
from accordion.batch.lines import Defaults
from accordion.batch.manage import abandon, cancel, existing, jobs, status
from accordion.batch.runner import Progress, Runner
from accordion.batch.target import Target, local_server

__all__ = ["Progress", "RefusedError", "abandon", "cancel", "jobs", "resume", "run", "status"]
RUN_OPTIONS = (
    "endpoint",
    "api",
    "max_inflight",
    "kv_budget",
    "retries",
    "ray",
    "workers",
    "cpus_per_worker",
)


def run(
    input: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    errors: str | Path | None = None,
    job_dir: str | Path | None = None,
    system: str | None = None,
    sampling: dict[str, Any] | None = None,
    truncate: bool = False,
    mode: str = "independent",
    on_bad_line: str = "fail",
    on_progress: Callable[[Progress], None] | None = None,
    **how: Any,
) -> Progress:
    """Run (or, for the same input and output, resume) a job; returns its final progress.

    `how` takes the run options: endpoint, api, max_inflight (per engine), kv_budget,
    retries, and for Ray: ray ("auto", "local" or an address), workers, cpus_per_worker."""
    if mode not in ("independent", "conversation"):
        raise ValueError(f"mode must be independent or conversation, got {mode!r}")
    if on_bad_line not in ("fail", "skip"):
        raise ValueError(f"on_bad_line must be fail or skip, got {on_bad_line!r}")
    input_path, out_path = Path(input).resolve(), Path(out).resolve()
    if not input_path.is_file():
        raise FileNotFoundError(f"no input file {input}")
    settings = Settings(
        str(input_path),
        str(out_path),
        str(Path(errors).resolve() if errors else errors_path(out_path)),
        Defaults(model, system, dict(sampling or {}), truncate),
        mode,
        on_bad_line,
        **_run_options(how),
    )
    directory = Path(job_dir) if job_dir else default_dir(input_path, out_path)
    return execute(directory, settings, on_progress)


def resume(
    job_dir: str | Path, on_progress: Callable[[Progress], None] | None = None, **how: Any
) -> Progress:
    """Continue a job from its directory; `how` may change how it runs (see run)."""
    job = existing(Path(job_dir))
    settings = job.settings
    job.close()
    assert settings is not None
    return execute(Path(job_dir), replace(settings, **_run_options(how)), on_progress)


def _run_options(how: dict[str, Any]) -> dict[str, Any]:
    """The run options given (None: not given, the default or the job's own stays)."""
    unknown = sorted(set(how) - set(RUN_OPTIONS))
    if unknown:
        raise TypeError(f"unknown options {unknown}")
    return {k: v for k, v in how.items() if v is not None}


def execute(
    directory: Path, settings: Settings, on_progress: Callable[[Progress], None] | None
) -> Progress:
    _check_spread(settings)
    job = Job(directory)
    try:
        job.lock()
        scan = job.prepare(settings)
        if settings.ray:
            from accordion.batch.cluster import Cluster

            runner = Runner(job, settings, scan, Cluster.start(settings, scan.model), on_progress)
            with _stop_on_interrupt(runner):
                return asyncio.run(runner.run())
        if settings.endpoint:
            target = Target.endpoint(settings.endpoint, settings.api, settings.retries)
            runner = Runner(job, settings, scan, target, on_progress)
            with _stop_on_interrupt(runner):
                return asyncio.run(runner.run())
        return _embedded(job, settings, scan, on_progress)
    finally:
        job.close()


def _check_spread(settings: Settings) -> None:
    if settings.ray is None:
        if settings.endpoint and "," in settings.endpoint:
            raise RefusedError("several endpoints need --ray: each Ray worker talks to one")
        return
    if settings.mode == "conversation":
        raise RefusedError("conversation mode is one chat at a time: it does not spread over Ray")
    if settings.workers is not None and settings.workers < 1:
        raise RefusedError(f"workers must be at least 1, got {settings.workers}")


def _embedded(
    job: Job, settings: Settings, scan: Scan, on_progress: Callable[[Progress], None] | None
) -> Progress:
    manager, app = local_server(settings.kv_budget, settings.max_inflight)
    runner = Runner(job, settings, scan, Target.embedded(app))
    runner.on_progress = on_progress or runner.on_progress
    outcome: dict[str, Any] = {}

    def loop() -> None:
        try:
            outcome["progress"] = asyncio.run(runner.run())
        except BaseException as e:  # handed to the caller's thread below
            outcome["error"] = e
        finally:
            manager.stop()

    thread = threading.Thread(target=loop, name="accordion-batch", daemon=True)
    with _stop_on_interrupt(runner):
        thread.start()
        try:
            manager.drive()  # until the job's loop ends and stops it
        finally:
            thread.join()
            for entry in list(manager.loaded.values()):
                entry.engine.stop()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["progress"]


class _stop_on_interrupt:
    """The first Ctrl-C asks the runner to stop; a second one interrupts at once."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.previous: Any = None

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(*_: object) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.runner.request_stop()

        self.previous = signal.signal(signal.SIGINT, handler)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
