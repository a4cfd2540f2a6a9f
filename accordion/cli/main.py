"""The `accordion` command: Ollama's CLI (serve, run, ps, list, show, create, ...).

Every command but `serve` and `run` talks to the server at ACCORDION_HOST
(default 127.0.0.1:11434); `run` falls back to the engine in this process when no
server answers. Failures print `Error: <message>` on stderr and exit 1.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from accordion import __version__
from accordion.cli import batch, repl
from accordion.cli.client import Client, NoServerError, ServerError, base_url
from accordion.errors import AccordionError

err = Console(stderr=True, highlight=False)


class App(typer.Typer):
    """Typer with one place that turns failures into `Error: ...` and exit status 1."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except (ServerError, NoServerError, AccordionError, OSError, ValueError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as e:  # a bug: still one line unless asked for the traceback
            if os.environ.get("ACCORDION_DEBUG"):
                raise
            fail(f"{type(e).__name__}: {e}")


def fail(message: str) -> NoReturn:
    print(f"Error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


app = App(
    name="accordion",
    help="Large language model runner: Ollama's API and CLI, on the CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


app.add_typer(batch.app, name="batch")
app.command("probe")(batch.probe_command)


def client() -> Client:
    return Client(base_url())


# -- formatting --------------------------------------------------------------------------
def human_bytes(n: int) -> str:
    """Decimal units as Ollama prints sizes: '105 MB', '1.9 GB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            value = n / scale
            if value >= 10 or value == int(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
    return f"{n} B"


def human_duration(seconds: float) -> str:
    """Docker's go-units HumanDuration, which Ollama uses: '4 minutes', 'About an hour'."""
    s = int(seconds)
    minutes, hours = int(seconds / 60), round(seconds / 3600)
    if s < 1:
        return "Less than a second"
    if s < 60:
        return "1 second" if s == 1 else f"{s} seconds"
    if minutes < 60:
        return "About a minute" if minutes == 1 else f"{minutes} minutes"
    if hours < 48:
        return "About an hour" if hours == 1 else f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def human_time(text: str | None, never: str = "Never") -> str:
    """'3 minutes ago', '4 minutes from now'; far future (keep_alive < 0) is 'Forever'."""
    when = parse_time(text)
    if when is None:
        return never
    delta = (datetime.now(UTC) - when).total_seconds()
    if abs(delta) >= 50 * 365 * 86400:  # the server caps "forever" at 2100-01-01
        return "Forever"
    return f"{human_duration(-delta)} from now" if delta < 0 else f"{human_duration(delta)} ago"


def until(text: str | None) -> str:
    when = parse_time(text)
    if when is not None and when < datetime.now(UTC):
        return "Stopping..."  # expired; the server unloads it at its next sweep
    return human_time(text)


def processor(size: int, vram: int) -> str:
    if vram <= 0 or size <= 0:
        return "100% CPU"
    if vram >= size:
        return "100% GPU"
    cpu = round(100 * (size - vram) / size)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded like Go's tabwriter: plain text that scripts can split on spaces."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "".join(str(c).ljust(w + 4) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [headers, *rows]
    ]
    return "\n".join(lines)


def short_digest(digest: str | None) -> str:
    return (digest or "").removeprefix("sha256:")[:12]


def canonical(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


# -- commands ----------------------------------------------------------------------------
def show_version(value: bool) -> None:
    if not value:
        return
    c = client()
    if not c.is_up():
        print("Warning: could not connect to a running accordion instance")
        print(f"Warning: client version is {__version__}")
        raise typer.Exit()
    server = (c.get("/api/version") or {}).get("version", "unknown")
    print(f"accordion version is {server}")
    if server != __version__:
        print(f"Warning: client version is {__version__}")
    raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", "-v", callback=show_version, is_eager=True, help="Show version."),
    ] = False,
) -> None:
    """Large language model runner: Ollama's API and CLI, on the CPU."""


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="HOST:PORT to listen on (default: $ACCORDION_HOST).")
    ] = None,
    engine_process: Annotated[
        bool | None,
        typer.Option(
            "--engine-process/--no-engine-process",
            help="Step the engines in a process of their own, restarted if it dies (default;"
            " ACCORDION_ENGINE_PROCESS=0 turns it off).",
        ),
    ] = None,
) -> None:
    """Start the server."""
    from accordion.server.serve import serve as run_server

    run_server(host, engine_process=engine_process)  # exits with a message if it cannot bind


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="Model name (or a GGUF path).")],
    prompt: Annotated[list[str] | None, typer.Argument(help="Prompt; none: a chat.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show timings.")] = False,
    nowordwrap: Annotated[bool, typer.Option("--nowordwrap", help="No line wrapping.")] = False,
    keepalive: Annotated[
        str | None, typer.Option(help="How long the server keeps the model (e.g. 5m).")
    ] = None,
) -> None:
    """Run a model: one answer for PROMPT, else an interactive chat.

    Uses the server at $ACCORDION_HOST when one answers, else runs the model in
    this process. Piped stdin with no PROMPT is a REPL script when its first line
    is a /command (e.g. /set parameter temperature 0), else the prompt.
    """
    piped = not sys.stdin.isatty()
    text = sys.stdin.read() if piped else ""
    c = client()
    backend = repl.connect(c)
    if isinstance(backend, repl.LocalBackend) and err.is_terminal:
        err.print(f"[dim]no server at {c.url}; running {model} in this process[/dim]")
    session = repl.Session(
        model, backend, verbose=verbose, wordwrap=not nowordwrap, keep_alive=keepalive
    )
    if prompt:  # one answer: the request itself loads the model and reports its errors
        session.ask(" ".join(part for part in [text.strip(), *prompt] if part))
        return
    load(backend, model, keepalive)
    if piped and repl.is_script(text):
        repl.repl(session, repl.script_reader(text.splitlines()), interactive=False)
    elif piped:
        if text.strip():
            session.ask(text.strip())
    else:
        session.interactive = True
        repl.repl(session, repl.interactive_reader(), interactive=True)


def load(backend: repl.Backend, model: str, keep_alive: str | None) -> None:
    """Load before the first question, so a bad name fails before the prompt shows."""
    with err.status("loading model", spinner="dots") if err.is_terminal else nullcontext():
        backend.load(model, keep_alive)


@app.command("ps")
def ps(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Add KV cache columns.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh the -v table in place.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes (--watch).")] = 1.0,
    count: Annotated[int, typer.Option(help="Stop after this many refreshes (0: never).")] = 0,
) -> None:
    """List running models."""
    c = client()
    if not watch:
        print(_ps_table(c, verbose))
        return
    from accordion.cli.watch import watch_ps

    watch_ps(lambda: _ps_table(c, True, sparkline=True), interval, count)


def _ps_table(c: Client, verbose: bool, sparkline: bool = False) -> str:
    models = c.get("/api/ps").get("models") or []
    headers = ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    if verbose:
        headers += ["ALLOCATED", "USED", "CACHED", "ACTIVE", "RAM"]
    rows = [_ps_row(m, verbose) for m in models]
    if sparkline:  # KV allocated over the last minute, from the server's own samples
        from accordion.cli.watch import spark

        samples = c.get("/api/stats/history?seconds=60").get("samples") or []
        headers.append("KV LAST MINUTE")
        for m, row in zip(models, rows, strict=True):
            series = [
                s["models"][m["name"]]["kv"]["allocated_tokens"]
                for s in samples
                if m["name"] in s["models"]
            ]
            row.append(spark(series))
    return table(headers, rows)


def _ps_row(m: dict[str, Any], verbose: bool) -> list[str]:
    size = int(m.get("size", 0))
    ctx = m.get("context") or {}
    row = [
        m.get("name", ""),
        short_digest(m.get("digest")),
        human_bytes(size),
        processor(size, int(m.get("size_vram", 0))),
        str(ctx.get("max", m.get("context_length", ""))),
        until(m.get("expires_at")),
    ]
    if verbose:
        kv = (m.get("kv_bytes") or {}).get("allocated")
        row += [str(ctx.get(k, "")) for k in ("allocated", "used", "cached")]
        row += [str(m.get("active", "")), human_bytes(int(kv)) if kv is not None else ""]
    return row


@app.command("list")
def list_() -> None:
    """List models."""
    models = client().get("/api/tags").get("models") or []
    rows = [
        [
            m.get("name", ""),
            short_digest(m.get("digest")),
            human_bytes(int(m.get("size", 0))),
            human_time(m.get("modified_at")),
        ]
        for m in models
    ]
    print(table(["NAME", "ID", "SIZE", "MODIFIED"], rows))


@app.command()
def show(
    model: str,
    modelfile: Annotated[bool, typer.Option("--modelfile", help="Show the Modelfile.")] = False,
    parameters: Annotated[bool, typer.Option("--parameters", help="Show parameters.")] = False,
    template: Annotated[bool, typer.Option("--template", help="Show the template.")] = False,
    system: Annotated[bool, typer.Option("--system", help="Show the system message.")] = False,
) -> None:
    """Show information for a model."""
    flags = {"modelfile": modelfile, "parameters": parameters, "template": template}
    flags["system"] = system
    chosen = [k for k, on in flags.items() if on]
    if len(chosen) > 1:
        fail("only one of --modelfile, --parameters, --template, --system can be given")
    doc = client().post("/api/show", {"model": model})
    print(doc.get(chosen[0], "") if chosen else repl.info_text(doc))


@app.command()
def create(
    name: str,
    file: Annotated[
        Path, typer.Option("--file", "-f", help="The Modelfile (default: ./Modelfile).")
    ] = Path("Modelfile"),
) -> None:
    """Create a model from a Modelfile."""
    if not file.is_file():
        fail(f"no Modelfile at {file}")
    text = resolve_from(file.read_text(), file.resolve().parent)
    for doc in client().stream("/api/create", {"model": name, "modelfile": text}):
        err.print(doc.get("status", ""))


def resolve_from(text: str, folder: Path) -> str:
    """FROM ./x.gguf is relative to the Modelfile, not to the server's working directory."""
    out, in_block = [], False
    for line in text.splitlines():
        if in_block:
            in_block = not line.rstrip().endswith('"""')
        else:
            command, _, rest = line.strip().partition(" ")
            rest = rest.strip()
            if command.upper() == "FROM" and rest:
                line = f"FROM {_local_path(rest, folder)}"
            in_block = rest.startswith('"""') and not (len(rest) > 3 and rest.endswith('"""'))
        out.append(line)
    return "\n".join(out) + "\n"


def _local_path(value: str, folder: Path) -> str:
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = folder / path
    # a model name ('smollm2', 'me/model:tag') stays a name unless such a file exists
    if candidate.is_file() or value.startswith(("./", "../")):
        return str(candidate.resolve())
    return value


@app.command()
def cp(source: str, destination: str) -> None:
    """Copy a model."""
    client().post("/api/copy", {"source": source, "destination": destination})
    print(f"copied '{source}' to '{destination}'")


@app.command()
def rm(names: Annotated[list[str], typer.Argument(help="Models to delete.")]) -> None:
    """Remove models."""
    c = client()
    for name in names:
        c.request("DELETE", "/api/delete", {"model": name})
        print(f"deleted '{name}'")


@app.command()
def stop(model: str) -> None:
    """Stop (unload) a running model."""
    c = client()
    running = {m.get("name") for m in c.get("/api/ps").get("models") or []}
    if model not in running and canonical(model) not in running:
        fail(f'couldn\'t find model "{model}" to stop')  # a generate would load it instead
    c.post("/api/generate", {"model": model, "prompt": "", "keep_alive": 0, "stream": False})


@app.command()
def pull(model: str) -> None:
    """Pull a model (here: make a bundled model ready; there is no network)."""
    for doc in client().stream("/api/pull", {"model": model}):
        status = doc.get("status", "")
        if doc.get("total"):
            status += f"  {human_bytes(int(doc.get('completed', 0)))}/{human_bytes(doc['total'])}"
        err.print(status)
