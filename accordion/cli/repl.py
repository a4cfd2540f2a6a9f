"""`accordion run`: a chat session against the server, or in this process when none runs.

Input rules (stdin):
- PROMPT given: one answer. Piped stdin, if any, goes before it (`cat notes | accordion
  run m "summarize"`), as in Ollama.
- no PROMPT, stdin a terminal: the interactive REPL.
- no PROMPT, stdin piped: if its first non-blank line starts with "/", it is a REPL script
  (each line as if typed at `>>> `, so `/set parameter temperature 0` then questions
  works); otherwise the whole input is one prompt.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from accordion.cli.client import Client, ServerError
from accordion.errors import AccordionError

HELP = '''Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /save <model>   Save your current session
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use """ to begin a multi-line message.
'''

HELP_SET = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
  /set wordwrap          Enable wordwrap
  /set nowordwrap        Disable wordwrap
"""

HELP_SHOW = """Available Commands:
  /show info         Show details for this model
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template
"""

HELP_SHORTCUTS = """Available keyboard shortcuts:
  Ctrl + d            Exit (on an empty line)
  Ctrl + c            Stop the answer being generated
  Up/Down             Previous/next input (with readline)
"""

HELP_PARAMETERS = """Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions
  /set parameter stop <string> <string> ...   Set the stop parameters
"""


# -- backends --------------------------------------------------------------------------
class Backend(Protocol):
    """Where answers come from; `last_stats` holds Ollama's timing fields of the last one."""

    last_stats: dict[str, Any]

    def load(self, model: str, keep_alive: str | None = None) -> None: ...
    def chat(
        self, model: str, messages: list[dict], options: dict[str, Any], keep_alive: str | None
    ) -> Iterator[str]: ...
    def show(self, model: str) -> dict[str, Any]: ...
    def save(
        self, name: str, source: str, parameters: dict[str, Any], system: str | None
    ) -> None: ...


class RemoteBackend:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.last_stats: dict[str, Any] = {}

    def load(self, model: str, keep_alive: str | None = None) -> None:
        # an empty prompt only loads: the model's errors show before the first question
        body = (
            {"model": model} if keep_alive is None else {"model": model, "keep_alive": keep_alive}
        )
        self.client.post("/api/generate", body)

    def chat(
        self, model: str, messages: list[dict], options: dict[str, Any], keep_alive: str | None
    ) -> Iterator[str]:
        body: dict[str, Any] = {"model": model, "messages": messages, "options": options}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        for doc in self.client.stream("/api/chat", body):
            if doc.get("done"):
                self.last_stats = doc
            text = (doc.get("message") or {}).get("content") or ""
            if text:
                yield text

    def show(self, model: str) -> dict[str, Any]:
        return self.client.post("/api/show", {"model": model})

    def save(self, name: str, source: str, parameters: dict[str, Any], system: str | None) -> None:
        body: dict[str, Any] = {"model": name, "from": source, "parameters": parameters}
        if system:
            body["system"] = system
        self.client.post("/api/create", {**body, "stream": False})


class LocalBackend:
    """The engine in this process (accordion.llm.LLM), with the server's prompt rules.

    Requests are prepared by the server's own code (options, Modelfile system prompt,
    context limit, truncation), so an answer matches what `serve` would give.
    """

    def __init__(self) -> None:
        from accordion.server.store import ModelStore

        self.store = ModelStore()
        self.loaded: dict[str, Any] = {}  # name -> server.manager.Loaded
        self.last_stats: dict[str, Any] = {}

    def load(self, model: str, keep_alive: str | None = None) -> None:
        self._get(model)

    def _get(self, model: str) -> tuple[Any, float]:
        """The loaded model and the seconds spent loading it now (0 when already loaded)."""
        from accordion.llm import LLM
        from accordion.loader.chat_template import ChatTemplate
        from accordion.server.manager import Loaded

        entry = self.store.get(model)
        if entry.name in self.loaded:
            return self.loaded[entry.name], 0.0
        start = time.perf_counter()
        llm = LLM(str(entry.path))
        if entry.template:  # a created model's own chat template, as the server does
            tok = llm.tokenizer
            llm.model.template = ChatTemplate(entry.template, tok.bos_token, tok.eos_token)
        loaded = Loaded(entry.name, entry, llm.model, llm.engine, 0, -1.0)
        self.loaded[entry.name] = loaded
        return loaded, time.perf_counter() - start

    def chat(
        self, model: str, messages: list[dict], options: dict[str, Any], keep_alive: str | None
    ) -> Iterator[str]:
        from accordion.api.ollama_respond import stats
        from accordion.api.prompts import prepare_chat
        from accordion.api.service import raise_for
        from accordion.engine.request import output_of

        start = time.perf_counter()
        loaded, load_s = self._get(model)
        prepared = prepare_chat(loaded, messages, options)
        handle = loaded.engine.submit(prepared.ids, prepared.options.params, prepared.limit)
        with _sigint_flag() as interrupted:
            for event in handle:
                if interrupted():
                    handle.cancel()  # finished at the next step, keeping the engine whole
                elif event.text:
                    yield event.text
        if interrupted():
            raise KeyboardInterrupt
        out = output_of(handle.seq)
        raise_for(out)
        self.last_stats = stats(out, load_s, start)

    def show(self, model: str) -> dict[str, Any]:
        from accordion.api.store_routes import details, modelfile
        from accordion.loader.gguf_file import open_gguf

        entry = self.store.get(model)
        gf = open_gguf(entry.path)
        template = entry.template or str(gf.get("tokenizer.chat_template") or "")
        info = {k: v for k, v in gf.metadata.items() if not isinstance(v, list)}
        return {
            "modelfile": modelfile(entry, template),
            "parameters": "\n".join(f"{k} {v}" for k, v in entry.parameters.items()),
            "template": template,
            "system": entry.system or "",
            "details": details(entry),
            "model_info": info,
            "capabilities": ["completion"],
        }

    def save(self, name: str, source: str, parameters: dict[str, Any], system: str | None) -> None:
        self.store.create(name, source, parameters, system)


@contextlib.contextmanager
def _sigint_flag() -> Iterator[Callable[[], bool]]:
    """Ctrl-C sets a flag instead of raising: a torch step cut in half would corrupt state."""
    hit = [False]

    def handler(*_: object) -> None:
        hit[0] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: hit[0]
    finally:
        signal.signal(signal.SIGINT, previous)


def connect(client: Client) -> Backend:
    """The server when one answers, else this process."""
    return RemoteBackend(client) if client.is_up() else LocalBackend()


# -- output ------------------------------------------------------------------------------
class WordWrap:
    """Streams text, breaking lines between words at the terminal's width."""

    def __init__(self, out: TextIO, width: int) -> None:
        self.out, self.width = out, max(width, 10)
        self.col, self.word = 0, ""

    def write(self, text: str) -> None:
        for ch in text:
            if ch == "\n":
                self._flush_word()
                self.out.write("\n")
                self.col = 0
            elif ch == " ":
                self._flush_word()
                if self.col >= self.width:
                    self.out.write("\n")
                    self.col = 0
                else:
                    self.out.write(" ")
                    self.col += 1
            else:
                self.word += ch
                if len(self.word) >= self.width:  # a word longer than the line: cut it
                    self._flush_word()
        self.out.flush()

    def _flush_word(self) -> None:
        if not self.word:
            return
        if self.col > 0 and self.col + len(self.word) > self.width:
            self.out.write("\n")
            self.col = 0
        self.out.write(self.word)
        self.col += len(self.word)
        self.word = ""

    def finish(self) -> None:
        self._flush_word()
        self.out.flush()


class Plain:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def finish(self) -> None:
        self.out.flush()


def go_duration(ns: int) -> str:
    """Nanoseconds as Go's time.Duration prints them ('1.5s', '12.3ms'), as Ollama shows."""
    if ns == 0:
        return "0s"
    sign, ns = ("-" if ns < 0 else ""), abs(int(ns))
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_decimal(ns, 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_decimal(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    head = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    return f"{sign}{head}{_decimal(rest, 1_000_000_000)}s"


def _decimal(value: int, unit: int) -> str:
    whole, part = divmod(value, unit)
    digits = str(part).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def _rate(count: int, ns: int) -> str:
    return f"{count / (ns / 1e9):.2f} tokens/s" if ns > 0 else "n/a"


def stats_text(doc: dict[str, Any]) -> str:
    """Ollama's --verbose summary, plus the tokens accordion served from its prompt cache."""
    pc, pd = doc.get("prompt_eval_count", 0), doc.get("prompt_eval_duration", 0)
    ec, ed = doc.get("eval_count", 0), doc.get("eval_duration", 0)
    lines = [
        f"total duration:       {go_duration(doc.get('total_duration', 0))}",
        f"load duration:        {go_duration(doc.get('load_duration', 0))}",
        f"prompt eval count:    {pc} token(s)",
        f"prompt eval duration: {go_duration(pd)}",
        f"prompt eval rate:     {_rate(pc, pd)}",
        f"prompt cache count:   {doc.get('prompt_cache_count', 0)} token(s)",
        f"eval count:           {ec} token(s)",
        f"eval duration:        {go_duration(ed)}",
        f"eval rate:            {_rate(ec, ed)}",
    ]
    return "\n".join(lines)


def info_text(show: dict[str, Any]) -> str:
    """`accordion show MODEL` / `/show info`: model facts, parameters, system prompt."""
    details, info = show.get("details") or {}, show.get("model_info") or {}
    arch = details.get("family") or info.get("general.architecture", "")
    facts = [
        ("architecture", arch),
        ("parameters", details.get("parameter_size", "")),
        ("context length", info.get(f"{arch}.context_length", "")),
        ("embedding length", info.get(f"{arch}.embedding_length", "")),
        ("quantization", details.get("quantization_level", "")),
    ]
    sections = [("Model", [(k, str(v)) for k, v in facts if v not in ("", None)])]
    sections.append(("Capabilities", [(c, "") for c in show.get("capabilities") or []]))
    params = [tuple(p.split(" ", 1)) for p in (show.get("parameters") or "").splitlines() if p]
    sections.append(("Parameters", [(p[0], p[1] if len(p) > 1 else "") for p in params]))
    if show.get("system"):
        sections.append(("System", [(line, "") for line in show["system"].splitlines()]))
    out = []
    for title, rows in sections:
        if not rows:
            continue
        width = max(len(k) for k, _ in rows) + 4
        out.append(f"  {title}")
        out.extend(f"    {k.ljust(width)}{v}".rstrip() for k, v in rows)
        out.append("")
    return "\n".join(out)


# -- the session -------------------------------------------------------------------------
@dataclass
class Session:
    model: str
    backend: Backend
    verbose: bool = False
    wordwrap: bool = True
    keep_alive: str | None = None
    interactive: bool = False  # a blank line after each answer, as Ollama's REPL prints
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def writer(self) -> WordWrap | Plain:
        if self.wordwrap and self.out.isatty():
            return WordWrap(self.out, shutil.get_terminal_size().columns - 1)
        return Plain(self.out)

    def ask(self, prompt: str) -> None:
        """One turn: stream the answer, remember it, print stats when verbose."""
        user = {"role": "user", "content": prompt}
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = [*system, *self.history, user]
        writer, answer = self.writer(), []
        try:
            for piece in self.backend.chat(self.model, messages, self.options, self.keep_alive):
                answer.append(piece)
                writer.write(piece)
        finally:
            writer.finish()
            if answer:  # an error before the first word leaves stdout clean
                self.out.write("\n\n" if self.interactive else "\n")
                self.out.flush()
        self.history += [user, {"role": "assistant", "content": "".join(answer)}]
        if self.verbose:
            print(stats_text(self.backend.last_stats), file=self.err, flush=True)


# -- commands ----------------------------------------------------------------------------
def _option_value(name: str, words: list[str]) -> Any:
    """A /set parameter value converted to the type the server expects (ValueError if not)."""
    from accordion.api.options import KNOWN

    kinds = KNOWN.get(name)
    if kinds is None:
        raise ValueError(f"unknown parameter '{name}'")
    if not words:
        raise ValueError(f"missing a value for '{name}'")
    if name == "stop":
        return words
    text = " ".join(words)
    if bool in kinds:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"'{name}' must be true or false")
        return text.lower() == "true"
    with contextlib.suppress(ValueError):
        return int(text)
    if float in kinds:
        return float(text)
    raise ValueError(f"'{name}' must be an integer")


def cmd_set(session: Session, args: list[str], rest: str) -> None:
    if not args:
        session.say(HELP_SET)
        return
    what = args[0]
    flags = {"verbose": ("verbose", True), "quiet": ("verbose", False)}
    flags |= {"wordwrap": ("wordwrap", True), "nowordwrap": ("wordwrap", False)}
    if what in flags:
        attr, value = flags[what]
        setattr(session, attr, value)
        session.say(f"Set '{what}' mode.")
    elif what == "parameter":
        if len(args) < 2:
            session.say(HELP_PARAMETERS)
            return
        try:
            session.options[args[1]] = _option_value(args[1], args[2:])
        except ValueError as e:
            session.say(f"Couldn't set parameter: {e}")
            return
        session.say(f"Set parameter '{args[1]}' to '{', '.join(args[2:])}'")
    elif what == "system":
        # the text keeps its own spacing and lines (a """ block), not re-joined words
        session.system = rest.split(None, 1)[1].strip() if len(args) > 1 else None
        session.say("Set system message." if session.system else "Cleared system message.")
    else:
        session.say(f"Unknown command '/set {what}'. Type /? for help")


def cmd_show(session: Session, args: list[str]) -> None:
    if not args:
        session.say(HELP_SHOW)
        return
    what = args[0]
    if what not in ("info", "modelfile", "parameters", "system", "template"):
        session.say(f"Unknown command '/show {what}'. Type /? for help")
        return
    show = session.backend.show(session.model)
    if what == "info":
        session.say(info_text(show))
    elif what == "modelfile":
        session.say(show.get("modelfile", ""))
    elif what == "parameters":
        session.say(_parameters_text(show, session.options))
    elif what == "system":
        session.say(session.system or show.get("system") or "No system message was specified.")
    else:
        session.say(show.get("template") or "No prompt template was specified.")


def _parameters_text(show: dict[str, Any], options: dict[str, Any]) -> str:
    model = show.get("parameters") or ""
    lines = ["Model defined parameters:", model or "No parameters were specified."]
    if options:
        lines += ["", "User defined parameters:"]
        lines += [f"{k:<16}{v}" for k, v in options.items()]
    return "\n".join(lines)


def cmd_help(session: Session, args: list[str]) -> None:
    topics = {"set": HELP_SET, "show": HELP_SHOW, "shortcuts": HELP_SHORTCUTS}
    topic = args[0].lstrip("/") if args else ""
    session.say(topics.get(topic, HELP))


def command(session: Session, line: str) -> bool:
    """Run one /command; False means the session ends."""
    name, *args = line.split()
    if name in ("/bye", "/exit"):
        return False
    if name == "/clear":
        session.history.clear()
        session.say("Cleared session context")
    elif name == "/set":
        cmd_set(session, args, line[len(name) :].strip())
    elif name == "/show":
        cmd_show(session, args)
    elif name in ("/?", "/help"):
        cmd_help(session, args)
    elif name == "/load" and args:
        session.say(f"Loading model '{args[0]}'")
        session.backend.load(args[0], session.keep_alive)
        session.model, session.history = args[0], []
    elif name == "/save" and args:
        session.backend.save(args[0], session.model, session.options, session.system)
        session.say(f"Created new model '{args[0]}'")
    else:
        session.say(f"Unknown command '{name}'. Type /? for help")
    return True


# -- input -------------------------------------------------------------------------------
def inputs(read: Callable[[str], str]) -> Iterator[str]:
    """Whole inputs from raw lines: a `\"\"\"` block (a message, or `/set system \"\"\"...`)
    becomes one input with its newlines."""
    while True:
        line = read(">>> ")
        if not _opens_block(line):
            yield line
            continue
        head, _, text = line.partition('"""')
        lines: list[str] = []
        while not text.rstrip().endswith('"""'):
            lines.append(text)
            text = read("... ")
        lines.append(text.rstrip()[:-3])
        yield head + "\n".join(lines).strip("\n")


def _opens_block(line: str) -> bool:
    text = line.lstrip()
    if text.startswith("/set"):
        words = text.split(None, 2)
        return words[:2] == ["/set", "system"] and len(words) > 2 and words[2].startswith('"""')
    return text.startswith('"""')


def script_reader(lines: Iterable[str]) -> Callable[[str], str]:
    """A `read(prompt)` over given lines (no prompt shown); EOFError at the end."""
    it = iter(lines)

    def read(_: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def is_script(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    return first.lstrip().startswith("/")


def repl(session: Session, read: Callable[[str], str], interactive: bool) -> None:
    """The `>>> ` loop: commands, questions; Ctrl-D (or the script's end) exits."""
    stream = inputs(read)
    while True:
        try:
            line = next(stream)
        except (EOFError, StopIteration):
            if interactive:
                session.say("")
            return
        except KeyboardInterrupt:
            session.say("\nUse Ctrl + d or /bye to exit.")
            stream = inputs(read)  # an interrupted """ block is dropped
            continue
        if not line.strip():
            continue
        try:
            if line.lstrip().startswith("/"):
                if not command(session, line.strip()):
                    return
            else:
                session.ask(line)
        except KeyboardInterrupt:
            pass  # the answer was cut short; back to the prompt
        except (ServerError, AccordionError) as e:
            if not interactive:  # a script stops at its first failure, with exit status 1
                raise
            print(f"Error: {e}", file=session.err, flush=True)


def interactive_reader() -> Callable[[str], str]:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    return input
