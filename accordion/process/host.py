"""The engine process: every loaded model's engine, stepped on this process's main thread.

With `accordion serve --engine-process`, the front process keeps HTTP, templates,
tokenization and the model manager's bookkeeping, and the engines run here. The
two talk through a pipe (link.py holds the front's end). Messages are tuples,
pickled by multiprocessing's Connection (both ends are ours):

  front -> here  ("load", name, path)             -> ("loaded", name, weight_bytes, seconds)
                 ("start", name, config)          -> ("started", name, numbers) once sized
                 ("unload", name)
                 ("submit", name, rid, ids, params, limit, background)
                 ("cancel", rid)
                 ("shrink", name)                   the front's idle housekeeping
                 ("call", cid, name, method, args) -> ("result", cid, value, error)
                 ("exit",)                          the server is stopping
  here -> front  ("events", [(rid, text, token, finished, logprobs, final), ...]) a step's
                 ("stats", {name: numbers})         at most every STATS_S while busy

Between steps the loop reads every message waiting; idle, it blocks on the pipe, so an
idle engine process costs nothing. A closed pipe (the front is gone) ends the process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
from multiprocessing.connection import Connection
from typing import Any

from accordion import heap
from accordion.engine.engine import Engine, EngineConfig
from accordion.engine.request import Event, RequestHandle
from accordion.loader.model import LoadedModel, load_model

log = logging.getLogger("accordion.engine")
STATS_S = 0.25


def main(conn: Connection, log_level: str = "info") -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s level=%(levelname)s %(name)s %(message)s"
    )
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):
        Host(conn).run()  # until the front closes its end: nothing is left to serve


class Host:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.models: dict[str, LoadedModel] = {}
        self.engines: dict[str, Engine] = {}
        self.rids: dict[int, int] = {}  # seq id -> the front's request id
        self.handles: dict[int, RequestHandle] = {}  # by request id
        self.sent_logprobs: dict[int, int] = {}
        self._stats_at = 0.0
        self._changed = False
        self.running = True

    def run(self) -> None:
        while self.running:
            busy = any(engine.has_work() for engine in self.engines.values())
            if self.conn.poll(0 if busy else 1.0):
                while True:
                    self.handle(self.conn.recv())
                    if not self.conn.poll(0):
                        break
            events: list[Event] = []
            for name, engine in list(self.engines.items()):
                if engine.has_work():
                    # a step changes the numbers even when it yields no event: a prefill
                    # chunk grows the KV cache long before the first token
                    self._changed = True
                    try:
                        events += engine.step()
                    except Exception as e:  # the model itself failed: its requests end
                        log.exception("engine step failed model=%s", name)
                        engine.fail_all(e)
            if events:
                self.conn.send(("events", [self._wire(event) for event in events]))
            self._send_stats()

    # -- messages ----------------------------------------------------------------------
    def handle(self, message: tuple) -> None:
        kind, *args = message
        if kind == "submit":
            self._submit(*args)
        elif kind == "cancel":
            self._cancel(*args)
        elif kind == "load":
            self._load(*args)
        elif kind == "start":
            name, config = args
            self.engines[name] = Engine(self.models[name], EngineConfig(**config))
            heap.freeze()
            self.conn.send(("started", name, self._numbers(self.engines[name])))
        elif kind == "unload":
            self._unload(*args)
        elif kind == "shrink":
            engine = self.engines.get(args[0])
            if engine is not None:
                engine.kv.shrink()
                heap.trim()
                self._changed = True
        elif kind == "call":
            self._call(*args)
        elif kind == "exit":  # the server is stopping
            self.running = False
        else:
            log.error("engine process: unknown message %r", kind)

    def _load(self, name: str, path: str) -> None:
        fault = os.environ.get("ACCORDION_ENGINE_FAULT", "")
        if fault == f"load:{name}":  # fault injection, for the crash tests: a hard crash
            os.abort()
        try:
            model = load_model(path)
        except Exception as e:
            self.conn.send(("loaded", name, None, _portable(e)))
            return
        self.models[name] = model
        assert model.decoder is not None
        self.conn.send(("loaded", name, model.decoder.nbytes(), model.load_seconds))

    def _unload(self, name: str) -> None:
        engine = self.engines.pop(name, None)
        self.models.pop(name, None)
        if engine is None:
            return
        engine.cancel_all()  # their final events go out before the engine goes
        events: list[Event] = []
        while engine.has_work():
            events += engine.step()
        if events:
            self.conn.send(("events", [self._wire(event) for event in events]))
        heap.trim(collect=True)

    def _submit(
        self, name: str, rid: int, ids: list[int], params: Any, limit: int, background: bool
    ) -> None:
        engine = self.engines.get(name)
        try:
            if engine is None:
                raise RuntimeError(f"model {name} is not loaded in the engine process")
            handle = engine.submit(ids, params, limit, background)
        except Exception as e:  # the front checked it: this is a bug, not the request's
            final = {"finish_reason": "error", "error": _portable(e)}
            self.conn.send(("events", [(rid, "", None, True, [], final)]))
            return
        self.rids[handle.seq.id], self.handles[rid] = rid, handle

    def _cancel(self, rid: int) -> None:
        handle = self.handles.get(rid)
        if handle is not None:
            handle.cancel()

    def _call(self, cid: int, name: str, method: str, args: tuple) -> None:
        try:
            value, error = getattr(self.engines[name], method)(*args), None
        except Exception as e:
            value, error = None, _portable(e)
        self.conn.send(("result", cid, value, error))

    # -- what goes back ------------------------------------------------------------------
    def _wire(self, event: Event) -> tuple:
        seq = event.seq
        rid = self.rids.get(seq.id)
        sent = self.sent_logprobs.get(seq.id, 0)
        logprobs = seq.logprobs[sent:]
        self.sent_logprobs[seq.id] = len(seq.logprobs)
        final = None
        if event.finished:
            self.rids.pop(seq.id, None)
            self.handles.pop(rid, None)  # type: ignore[arg-type]
            self.sent_logprobs.pop(seq.id, None)
            final = {
                "finish_reason": seq.finish_reason,
                "error": _portable(seq.error) if seq.error is not None else None,
                "cached_tokens": seq.cached_tokens,
                "evaluated_tokens": seq.evaluated_tokens,
                "preemptions": seq.preemptions,
                "first_scheduled": seq.first_scheduled,
                "first_token": seq.first_token,
                "finished_at": seq.finished_at,
            }
        return (rid, event.text, event.token_id, event.finished, logprobs, final)

    def _send_stats(self) -> None:
        now = time.monotonic()
        if not self._changed or now - self._stats_at < STATS_S:
            return
        self._stats_at, self._changed = now, False
        numbers = {name: self._numbers(engine) for name, engine in self.engines.items()}
        self.conn.send(("stats", numbers))

    def _numbers(self, engine: Engine) -> dict[str, Any]:
        return {
            "kv": engine.kv_stats(),
            "tokens_evaluated": engine.tokens_evaluated,
            "tokens_generated": engine.tokens_generated,
        }


def _portable(error: BaseException) -> BaseException:
    """The error itself when it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
