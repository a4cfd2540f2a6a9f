"""`accordion batch run|resume|status|list|cancel`: jobs of many requests (accordion.batch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from accordion import batch

app = typer.Typer(
    help="Run a JSONL file of chat requests through one model, exactly once across crashes.",
    no_args_is_help=True,
)
err = Console(stderr=True, highlight=False)

Input = Annotated[Path, typer.Argument(help="OpenAI Batch JSONL, or the short form.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output JSONL (completion order).")]
JobDir = Annotated[Path, typer.Argument(help="The job's directory.")]
Endpoint = Annotated[
    str | None, typer.Option(help="A running server's URL (default: the engine in this process).")
]
Api = Annotated[str | None, typer.Option(help="The endpoint's dialect: openai or ollama.")]
MaxInflight = Annotated[int | None, typer.Option(help="Cap on requests in flight.")]
KvBudget = Annotated[int | None, typer.Option(help="KV cache budget in bytes (embedded).")]
Retries = Annotated[int | None, typer.Option(help="Retries of a request the target refused.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


@app.command("run")
def run(
    input: Input,
    out: Out,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model of every line.")] = None,
    errors: Annotated[
        Path | None, typer.Option(help="Error JSONL (default: OUT's name + .errors).")
    ] = None,
    job_dir: Annotated[
        Path | None, typer.Option(help="Job directory (default: under ~/.accordion/batches).")
    ] = None,
    system: Annotated[
        Path | None, typer.Option(help="File whose text is the short lines' system message.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Default temperature.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Default top_p.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Default top_k.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Default max_tokens.")] = None,
    seed: Annotated[int | None, typer.Option(help="Default seed.")] = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Default stop string (repeatable).")
    ] = None,
    truncate: Annotated[
        bool, typer.Option(help="Shorten prompts over the context (reported in the body).")
    ] = False,
    mode: Annotated[str, typer.Option(help="independent (conversation: not built yet).")] = (
        "independent"
    ),
    on_bad_line: Annotated[
        str, typer.Option(help="fail: nothing runs; skip: bad lines become error lines.")
    ] = "fail",
    endpoint: Endpoint = None,
    api: Api = None,
    max_inflight: MaxInflight = None,
    kv_budget: KvBudget = None,
    retries: Retries = None,
    quiet: Quiet = False,
) -> None:
    """Run a job (the same INPUT and OUT again resume it)."""
    sampling = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_tokens": max_tokens,
        "seed": seed,
        "stop": stop or None,
    }
    how = _how(endpoint, api, max_inflight, kv_budget, retries)
    with _bar(quiet) as show:
        progress = batch.run(
            input,
            out,
            model=model,
            errors=errors,
            job_dir=job_dir,
            system=system.read_text() if system else None,
            sampling={k: v for k, v in sampling.items() if v is not None},
            truncate=truncate,
            mode=mode,
            on_bad_line=on_bad_line,
            on_progress=show,
            **how,
        )
    _summary(progress)


@app.command("resume")
def resume(
    job_dir: JobDir,
    endpoint: Endpoint = None,
    api: Api = None,
    max_inflight: MaxInflight = None,
    kv_budget: KvBudget = None,
    retries: Retries = None,
    quiet: Quiet = False,
) -> None:
    """Continue a job: finished requests are never run again."""
    with _bar(quiet) as show:
        progress = batch.resume(
            job_dir, show, **_how(endpoint, api, max_inflight, kv_budget, retries)
        )
    _summary(progress)


@app.command("status")
def status(
    job_dir: JobDir,
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False,
) -> None:
    """A job's state and counts."""
    doc = batch.status(job_dir)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    width = max(len(k) for k in doc)
    for key, value in doc.items():
        print(f"{key:<{width}}  {value}")


@app.command("list")
def list_() -> None:
    """Every job under ~/.accordion/batches ($ACCORDION_BATCHES)."""
    rows = [
        [d["job_dir"], d["state"], f"{d['done']}/{d['total']}", str(d["failed"]), d["model"]]
        for d in batch.jobs()
    ]
    headers = ["JOB", "STATE", "DONE", "FAILED", "MODEL"]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("    ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@app.command("cancel")
def cancel(job_dir: JobDir) -> None:
    """Stop a running job (what is done stays done; resume continues it)."""
    running = batch.cancel(job_dir)
    print("cancelling: the job stops after its next commit" if running else "cancelled")


def _how(
    endpoint: str | None,
    api: str | None,
    max_inflight: int | None,
    kv_budget: int | None,
    retries: int | None,
) -> dict[str, Any]:
    given = {
        "endpoint": endpoint,
        "api": api,
        "max_inflight": max_inflight,
        "kv_budget": kv_budget,
        "retries": retries,
    }
    return {k: v for k, v in given.items() if v is not None}


class _bar:
    """A rich progress bar fed by the runner's progress (from its thread)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet or not sys.stderr.isatty()
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[line]}"),
            console=err,
        )
        self.task: Any = None

    def __enter__(self) -> Any:
        if not self.quiet:
            self.bar.start()
        return self.show

    def show(self, p: batch.Progress) -> None:
        if self.quiet:
            return
        if self.task is None:
            self.task = self.bar.add_task("batch", total=p.total, line="")
        requests, tokens = p.rates()
        kv = f" · KV {p.kv_used_bytes / 2**20:.0f} MiB" if p.kv_used_bytes is not None else ""
        line = (
            f"failed {p.failed} · {requests:.1f} req/s · {tokens:.0f} tok/s · cache"
            f" {100 * p.hit_rate:.0f}% · in flight {p.inflight}/{p.limit}{kv}"
        )
        self.bar.update(self.task, completed=p.done, line=line)

    def __exit__(self, *exc: object) -> None:
        if not self.quiet:
            self.bar.stop()


def _summary(p: batch.Progress) -> None:
    requests, tokens = p.rates()
    err.print(
        f"{p.state}: {p.done}/{p.total} done, {p.failed} failed; this run {p.finished_here}"
        f" requests at {requests:.2f} req/s, {tokens:.0f} tok/s; prompt cache hits"
        f" {100 * p.hit_rate:.1f}%; in flight planned {p.planned}, lowest {p.lowest_limit},"
        f" final {p.limit}, peak {p.peak_inflight}; preemptions {p.preemptions}"
    )
    if p.state != "finished":
        sys.exit(3 if p.state == "interrupted" else 0)
