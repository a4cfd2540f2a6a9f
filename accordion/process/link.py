"""The front's end of the engine process: start it, talk to it, restart it when it dies.

One engine process serves every model (host.py). A reader thread takes its messages
and hands each request's events to its RemoteEngine (remote.py), which delivers them
to the request's handle as an in-process engine would. A watcher thread waits on
the process. When it dies (a crash in native code, the kernel's OOM killer, kill -9),
the watcher starts a new one with backoff, loads the models again, and sends every
request that is still wanted again. Each request replays from its start and its
stream goes on past what it had sent: nothing is lost or sent twice (see
RemoteEngine.deliver). A model whose load kills the process is marked broken, with
the reason, instead of crash-looping, and the others keep serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from dataclasses import asdict, replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from accordion.engine.engine import EngineConfig
from accordion.errors import EngineRestartedError, ModelBrokenError
from accordion.process import host

if TYPE_CHECKING:
    from accordion.loader.model import LoadedModel
    from accordion.process.remote import RemoteEngine

log = logging.getLogger("accordion.server")
BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)  # between restarts in a row; then 5 s each


class Link:
    def __init__(self, log_level: str = "info") -> None:
        self.log_level = log_level
        self._ctx = multiprocessing.get_context("spawn")  # a clean process: no forked threads
        self.lock = threading.RLock()  # the connection and whether it is up; held to resend
        self.engines: dict[str, RemoteEngine] = {}  # loaded in the process, by model
        self.by_rid: dict[int, RemoteEngine] = {}
        self.broken: dict[str, str] = {}  # model -> why
        self.restarts = 0
        self.pid: int | None = None
        self._up = False
        self._stopping = False
        self._ended = threading.Event()  # set by the watcher when a stopped process ends
        self._queued: list[tuple] = []  # sent while it restarts
        self._waits: dict[tuple[str, Any], concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._loading: str | None = None
        self._start()
        self._up = True
        threading.Thread(target=self._watch, name="accordion-engine-watch", daemon=True).start()

    # -- talking to it -------------------------------------------------------------------
    def send(self, message: tuple) -> None:
        """Any thread; while it restarts, messages wait (submits are resent instead)."""
        with self.lock:
            if not self._up:
                if message[0] != "submit":
                    self._queued.append(message)
                return
            with contextlib.suppress(OSError):  # it just died: the watcher resends requests
                self.conn.send(message)

    def load(self, name: str, path: str) -> tuple[int, float]:
        """Load a model's weights there (blocking); its weight bytes and load seconds."""
        if name in self.broken:
            raise ModelBrokenError(self.broken[name])
        self._loading = name
        try:
            reply = self._ask(("loaded", name), ("load", name, path))
        finally:
            self._loading = None
        weight_bytes, detail = reply
        if weight_bytes is None:
            raise detail  # the load failed there with an error, not a crash
        return weight_bytes, detail

    def start(self, name: str, model: LoadedModel, config: EngineConfig) -> RemoteEngine:
        from accordion.process.remote import RemoteEngine

        (numbers,) = self._ask(("started", name), ("start", name, asdict(config)))
        engine = RemoteEngine(self, name, model, config, numbers)
        with self.lock:
            self.engines[name] = engine
        return engine

    def release(self, name: str) -> None:
        with self.lock:
            self.engines.pop(name, None)
        self.send(("unload", name))

    async def call(self, name: str, method: str, args: tuple) -> Any:
        cid = next(self._ids)
        future = self._expect(("result", cid))
        self.send(("call", cid, name, method, args))
        value, error = await asyncio.wrap_future(future)
        if error is not None:
            raise error
        return value

    def stop(self) -> None:
        """Ask the process to end (killed if it has not in 5 s), then close the pipe.
        Closing alone would not do: the reader thread's recv keeps the socket open."""
        self._stopping = True
        with self.lock, contextlib.suppress(OSError):
            self.conn.send(("exit",))
        if not self._ended.wait(timeout=5):  # only the watcher waits on the process
            self.proc.kill()
            self._ended.wait(timeout=5)
        self.conn.close()

    def _expect(self, key: tuple[str, Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._waits[key] = future
        return future

    def _ask(self, key: tuple[str, Any], message: tuple) -> Any:
        future = self._expect(key)
        self.send(message)
        return future.result()

    # -- the process ---------------------------------------------------------------------
    def _start(self) -> None:
        self._ooms = _oom_kills()
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=host.main, args=(child, self.log_level), name="accordion-engine", daemon=True
        )
        proc.start()
        child.close()
        self.conn, self.proc, self.pid = parent, proc, proc.pid
        threading.Thread(
            target=self._read, args=(parent,), name="accordion-engine-read", daemon=True
        ).start()
        log.info("engine process pid=%d started", proc.pid)

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError, TypeError):  # TypeError: closed under us by `stop`
                return  # it died or was stopped: the watcher takes it from here
            kind = message[0]
            if kind == "events":
                for rid, *event in message[1]:
                    engine = self.by_rid.get(rid)
                    if engine is not None:
                        engine.deliver(rid, *event)
            elif kind == "stats":
                for name, numbers in message[1].items():
                    engine = self.engines.get(name)
                    if engine is not None:
                        engine.numbers = numbers
            else:  # a reply: ("loaded", name, ...), ("result", cid, ...)
                future = self._waits.pop((kind, message[1]), None)
                if future is not None:
                    future.set_result(message[2:])

    def _watch(self) -> None:
        deaths = 0
        while True:
            self.proc.join()
            if self._stopping:
                self._ended.set()
                return
            code, was = self.proc.exitcode, self.pid
            with self.lock:
                self._up = False
                self.pid = None  # /api/ps shows no process until the next one starts
            self.restarts += 1
            loading, why = self._loading, f"engine process died ({code})"
            if loading is not None:  # its load killed the process: never again
                why = f"the engine process crashed (exit code {code}) loading model '{loading}'"
                self.broken[loading] = why
                log.error("model=%s marked broken: %s", loading, why)
                with self.lock:
                    engine = self.engines.pop(loading, None)
                if engine is not None:
                    engine.fail_all(ModelBrokenError(why))
            for key in list(self._waits):  # calls waiting on it: a clear error, not a hang
                broke = key == ("loaded", loading)
                self._waits.pop(key).set_exception(
                    ModelBrokenError(why) if broke else EngineRestartedError(why)
                )
            log.warning(
                "engine process pid=%s died (exit code %s); restarting (restart %d)",
                was,
                code,
                self.restarts,
            )
            ooms = _oom_kills()
            if code == -9 and ooms is not None and self._ooms is not None and ooms > self._ooms:
                self._smaller_budgets()
            time.sleep(BACKOFF_S[min(deaths, len(BACKOFF_S) - 1)])
            deaths += 1
            if self._revive():
                deaths = 0

    def _smaller_budgets(self) -> None:
        """Killed for memory (the kernel counted an OOM kill): come back with half the KV
        budget; requests wait or are preempted in less room, none is lost."""
        for name, engine in list(self.engines.items()):
            was = engine.config.kv_budget_bytes or 0
            now = max(was // 2, 16 << 20)
            engine.config = replace(engine.config, kv_budget_bytes=now)
            log.warning(
                "engine process was killed for memory: model=%s KV budget %d MiB (was %d MiB)",
                name,
                now >> 20,
                was >> 20,
            )

    def _revive(self) -> bool:
        """A new process with every model loaded again and every live request resent;
        False when it died again on the way (the watcher tries again)."""
        with self.lock:
            self._start()
            conn = self.conn
            engines = dict(self.engines)
        for name, engine in engines.items():
            self._loading = name  # left set if it dies now: the watcher marks it broken
            if self._await(conn, ("load", name, str(engine.model.path)), ("loaded", name)) is None:
                return False
            self._loading = None
            started = self._await(conn, ("start", name, asdict(engine.config)), ("started", name))
            if started is None:
                return False
            (engine.numbers,) = started
        with self.lock:
            try:
                for engine in engines.values():
                    engine.resend()
                for message in self._queued:
                    conn.send(message)
            except OSError:
                return False
            self._queued.clear()
            self._up = True
        log.info("engine process pid=%s serving %d model(s) again", self.pid, len(engines))
        return True

    def _await(self, conn: Connection, message: tuple, key: tuple[str, Any]) -> tuple | None:
        """Send and wait for the reply; None if the process dies first."""
        future = self._expect(key)
        try:
            conn.send(message)
        except OSError:
            return None
        while True:
            try:
                return future.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                if self.proc.is_alive():
                    continue
            try:
                return future.result(timeout=0.5)  # a reply it sent just before it died
            except concurrent.futures.TimeoutError:
                self._waits.pop(key, None)
                return None

    def resubmit(self, message: tuple) -> None:
        """Sent during `_revive` (the lock is held, the connection new)."""
        self.conn.send(message)


def _oom_kills() -> int | None:
    """The kernel's count of OOM kills since boot (Linux), or None where it has none."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
