"""`accordion batch run|resume|status|list|cancel`: jobs of many requests (accordion.batch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

if TYPE_CHECKING:  # each command imports it: it brings torch, which `accordion list` need not load
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
    str | None,
    typer.Option(
        help="A running server's URL (default: the engine in this process); with --ray,"
        " several, comma-separated."
    ),
]
Api = Annotated[str | None, typer.Option(help="The endpoint's dialect: openai or ollama.")]
MaxInflight = Annotated[
    int | None, typer.Option(help="Cap on requests in flight per engine (default 128).")
]
KvBudget = Annotated[int | None, typer.Option(help="KV cache budget in bytes (embedded).")]
Retries = Annotated[int | None, typer.Option(help="Retries of a request the target refused.")]
Ray = Annotated[
    str | None,
    typer.Option(
        help="Spread the job over Ray: auto (the cluster running here), local (start one)"
        " or the cluster's address. Needs accordion[ray]."
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(help="Ray workers, each an engine (default: one per node) or a client."),
]
CpusPerWorker = Annotated[
    float | None, typer.Option(help="CPUs each Ray worker takes (default: an even share).")
]
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
    mode: Annotated[
        str, typer.Option(help="independent, or conversation (one chat, cut in chunks).")
    ] = "independent",
    on_bad_line: Annotated[
        str, typer.Option(help="fail: nothing runs; skip: bad lines become error lines.")
    ] = "fail",
    endpoint: Endpoint = None,
    api: Api = None,
    max_inflight: MaxInflight = None,
    kv_budget: KvBudget = None,
    retries: Retries = None,
    ray: Ray = None,
    workers: Workers = None,
    cpus_per_worker: CpusPerWorker = None,
    quiet: Quiet = False,
) -> None:
    """Run a job (the same INPUT and OUT again resume it)."""
    from accordion import batch

    sampling = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_tokens": max_tokens,
        "seed": seed,
        "stop": stop or None,
    }
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
            endpoint=endpoint,  # run options left None keep their defaults
            api=api,
            max_inflight=max_inflight,
            kv_budget=kv_budget,
            retries=retries,
            ray=ray,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
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
    ray: Ray = None,
    workers: Workers = None,
    cpus_per_worker: CpusPerWorker = None,
    quiet: Quiet = False,
) -> None:
    """Continue a job: finished requests are never run again."""
    from accordion import batch

    with _bar(quiet) as show:
        progress = batch.resume(
            job_dir,
            show,
            endpoint=endpoint,
            api=api,
            max_inflight=max_inflight,
            kv_budget=kv_budget,
            retries=retries,
            ray=ray,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
        )
    _summary(progress)


@app.command("status")
def status(
    job_dir: JobDir,
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False,
) -> None:
    """A job's state and counts."""
    from accordion import batch

    doc = batch.status(job_dir)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    width = max(len(k) for k in doc)
    for key, value in doc.items():
        print(f"{key:<{width}}  {value}")


@app.command("list")
def list_() -> None:
    """Every job under ~/.accordion/batches ($ACCORDION_BATCHES), and the server's batches."""
    from accordion import batch

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
    from accordion import batch

    running = batch.cancel(job_dir)
    print("cancelling: the job stops after its next commit" if running else "cancelled")


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
        self.planned = False

    def __enter__(self) -> Any:
        if not self.quiet:
            self.bar.start()
        return self.show

    def show(self, p: batch.Progress) -> None:
        if self.quiet:
            return
        if self.task is None:
            self.task = self.bar.add_task("batch", total=p.total, line="")
        if p.plan and not self.planned:  # conversation mode says how it cuts chunks
            self.planned = True
            self.bar.console.print(p.plan)
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
    if p.plan:
        err.print(f"{p.plan}; {p.chunks} chunk(s)")
    err.print(
        f"{p.state}: {p.done}/{p.total} done, {p.failed} failed; this run {p.finished_here}"
        f" requests at {requests:.2f} req/s, {tokens:.0f} tok/s; prompt cache hits"
        f" {100 * p.hit_rate:.1f}%; in flight planned {p.planned}, lowest {p.lowest_limit},"
        f" final {p.limit}, peak {p.peak_inflight}; preemptions {p.preemptions}"
        + (f"; Ray workers {p.workers}, requeued {p.requeued}" if p.workers > 1 else "")
    )
    if p.state != "finished":
        sys.exit(3 if p.state == "interrupted" else 0)


# -- accordion probe ------------------------------------------------------------------------
UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text: str) -> int:
    """'2000000', '4G', '512MB', '1.5GiB' -> bytes (decimal units; KiB, MiB, GiB binary)."""
    value = text.strip().lower().removesuffix("b")
    binary = value.endswith("i")
    value = value.removesuffix("i")
    unit = value[-1] if value and value[-1] in UNITS else ""
    number = value[: len(value) - len(unit)]
    try:
        scale = 1024 ** "kmgt".index(unit) * 1024 if binary and unit else UNITS[unit]
        return int(float(number) * scale)
    except (ValueError, KeyError):
        raise typer.BadParameter(f"not a size: {text!r} (e.g. 4G, 512MiB, 2000000)") from None


def probe_command(
    model: Annotated[str, typer.Argument(help="Model name (or a GGUF path).")],
    budget: Annotated[
        str | None, typer.Option(help="KV memory budget (e.g. 4G); default: what serve gives.")
    ] = None,
    system_tokens: Annotated[int, typer.Option(help="Shared system prompt tokens.")] = 2400,
    message_tokens: Annotated[int, typer.Option(help="Tokens of each user message.")] = 600,
    answer_tokens: Annotated[int, typer.Option(help="Tokens of each answer.")] = 300,
    requests: Annotated[int, typer.Option(help="Requests in the job.")] = 170_000,
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False,
) -> None:
    """Measure a model's KV memory and speed, and plan a batch job's shape."""
    from rich.table import Table

    from accordion.batch.plan import Shape
    from accordion.batch.probe import probe

    shape = Shape(system_tokens, message_tokens, answer_tokens, requests)
    result = probe(model, parse_bytes(budget) if budget else None, shape)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    mib = 2**20
    plan = result.plan
    table = Table(title=f"{model}: measured", show_header=False)
    rows = [
        ("weights", f"{result.weights_bytes / mib:.0f} MiB"),
        ("KV budget", f"{result.budget_bytes / mib:.0f} MiB"),
        (
            "KV bytes per token",
            f"{result.bytes_per_token_config} (config), {result.bytes_per_token_measured:.0f}"
            f" (a prefilled sequence's blocks, block {result.block_size})",
        ),
        ("largest context", f"{result.max_context} of {result.trained_context} trained"),
        ("prefill", f"{result.prefill_tps:.0f} tok/s"),
        (
            "decode",
            f"{result.decode_tps_1:.1f} tok/s alone, {result.decode_tps_batch:.0f} at"
            f" {result.batch}",
        ),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out = Console(highlight=False)
    out.print(table)
    table = Table(
        title=f"plan: {requests} requests, {system_tokens} system + {message_tokens} message"
        f" + {answer_tokens} answer tokens",
        show_header=False,
    )
    rows = [
        (
            "in flight (independent)",
            str(plan.concurrency) if plan.concurrency else "none: one request does not fit",
        ),
        (
            "KV with the shared prefix",
            f"{plan.kv_tokens_shared} tokens, {plan.kv_bytes_shared / mib:.0f} MiB",
        ),
        (
            "KV without sharing",
            f"{plan.kv_tokens_unshared} tokens, {plan.kv_bytes_unshared / mib:.0f} MiB",
        ),
        ("conversation chunk", f"{plan.chunk_requests} requests ({plan.chunks} chunks)"),
        ("estimated time", f"{plan.estimated_s / 3600:.1f} h"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
