"""Loaded models: load on first use, keep for keep_alive, evict, drive their engines.

One engine per loaded model. `num_ctx` is a per-request limit, never a reason
to reload. All torch work runs in `drive` on the process's main thread: engine
steps, and loads and embeddings handed over with `on_main`. HTTP handlers run
on uvicorn's thread and only submit requests and await results. (torch's CPU
OpenMP kernels are 2-4x slower from other threads, and once any other thread
has run one, libgomp throttles its spinning for the whole process: a model
loaded on a worker thread halved decode speed, 60 -> 33 tok/s.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from accordion import heap
from accordion.engine.engine import Engine, EngineConfig
from accordion.errors import AccordionError
from accordion.loader.chat_template import ChatTemplate
from accordion.loader.model import LoadedModel, load_model
from accordion.process.link import Link
from accordion.server.durations import parse_keep_alive
from accordion.server.stats import Stats
from accordion.server.store import ModelEntry, ModelStore

log = logging.getLogger("accordion.server")
_engine_ids = itertools.count(1)


class ServerBusyError(AccordionError):
    """The request queue is full; try again later (HTTP 503)."""


class OutOfMemoryBudgetError(AccordionError):
    """No room for this model even after unloading every idle one."""


@dataclass
class Loaded:
    name: str
    entry: ModelEntry
    model: LoadedModel
    engine: Engine  # or a RemoteEngine (process/remote.py): the same surface
    engine_id: int
    keep_alive: float  # seconds; < 0 = forever
    expires_at: float = 0.0  # wall clock; refreshed when a request ends
    active: int = 0  # requests in flight
    last_used: float = field(default_factory=time.monotonic)
    idle_since: float | None = None
    weight_bytes: int = 0

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.expires_at = float("inf") if self.keep_alive < 0 else time.time() + self.keep_alive


class ModelManager:
    def __init__(
        self,
        store: ModelStore,
        memory_budget: int | None = None,
        default_keep_alive: float | None = None,
        max_queue: int | None = None,
        engine_config: EngineConfig | None = None,
        engine_process: bool = False,
    ) -> None:
        self.store = store
        # the engines in a process of their own (process/link.py), or stepped by `drive`
        self.link: Link | None = Link() if engine_process else None
        env_cap = os.environ.get("ACCORDION_MEMORY_LIMIT")
        self.memory_budget = memory_budget or (
            int(env_cap) if env_cap else int(psutil.virtual_memory().available * 0.8)
        )
        self.default_keep_alive = (
            default_keep_alive
            if default_keep_alive is not None
            else parse_keep_alive(os.environ.get("ACCORDION_KEEP_ALIVE", "5m"))
        )
        self.max_queue = max_queue or int(os.environ.get("ACCORDION_MAX_QUEUE", "512"))
        self.engine_config = engine_config or EngineConfig()
        self.loaded: dict[str, Loaded] = {}
        # called with (model name, RequestOutput) when a request ends: metrics, logs
        self.observers: list[Callable[[str, Any], None]] = []
        self.stats = Stats()  # samples for /api/stats and the dashboard, taken in `drive`
        self.observers.append(self.stats.observe)
        self._loading: dict[str, asyncio.Future[Loaded]] = {}
        self._calls: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.draining: list[Engine] = []  # unloaded while busy: stepped until their requests end
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False

    # -- loading ---------------------------------------------------------------------
    async def get(self, name: str, keep_alive: float | None = None) -> tuple[Loaded, float]:
        """The loaded model (loading it once however many ask); returns (entry, load seconds)."""
        model_entry = self.store.get(name)  # ModelNotFoundError for unknown names
        name = model_entry.name
        entry = self.loaded.get(name)
        if entry is not None:
            if keep_alive is not None:
                entry.keep_alive = keep_alive
            return entry, 0.0
        pending = self._loading.get(name)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[name] = pending
            start = time.perf_counter()
            try:
                # joining a chunked file is I/O-bound and slow: a thread, not the engines' one
                await asyncio.to_thread(self.store.ensure_file, model_entry)
                entry = await self.on_main(self._load, model_entry, keep_alive)
                pending.set_result(entry)
            except BaseException as e:  # a cancelled or failed load leaves nothing behind
                pending.set_exception(e)
                pending.exception()  # mark retrieved
                raise
            finally:
                self._loading.pop(name, None)
            return entry, time.perf_counter() - start
        entry = await asyncio.shield(pending)
        return entry, 0.0

    def _load(self, model_entry: ModelEntry, keep_alive: float | None) -> Loaded:
        name, link = model_entry.name, self.link
        # the front keeps the tokenizer and templates; the weights live where engines step
        model = load_model(str(model_entry.path), decoder=link is None)
        model.name = name
        if model_entry.template:  # a created model's own chat template
            tok = model.tokenizer
            model.template = ChatTemplate(model_entry.template, tok.bos_token, tok.eos_token)
        if link is None:
            assert model.decoder is not None
            weight_bytes = model.decoder.nbytes()
        else:
            weight_bytes, model.load_seconds = link.load(name, str(model_entry.path))
        try:
            self._make_room(weight_bytes)
        except OutOfMemoryBudgetError:
            if link is not None:
                link.release(name)
            raise
        budget = max(self.memory_budget - self.committed_bytes() - weight_bytes, 1 << 24)
        if self.engine_config.kv_budget_bytes:  # an explicit KV budget caps what memory allows
            budget = min(budget, self.engine_config.kv_budget_bytes)
        config = EngineConfig(**{**self.engine_config.__dict__, "kv_budget_bytes": budget})
        engine = Engine(model, config) if link is None else link.start(name, model, config)
        ka = self.default_keep_alive if keep_alive is None else keep_alive
        entry = Loaded(
            name, model_entry, model, engine, next(_engine_ids), ka, weight_bytes=weight_bytes
        )
        entry.touch()
        with self._lock:
            self.loaded[name] = entry
        heap.freeze()
        log.info(
            "loaded model=%s engine=%d seconds=%.2f", name, entry.engine_id, model.load_seconds
        )
        self.stats.event("load", name)
        return entry

    def committed_bytes(self) -> int:
        return sum(e.weight_bytes + e.engine.kv.allocated_bytes for e in self.loaded.values())

    def _make_room(self, need: int) -> None:
        """Unload idle models, least recently used first, until `need` bytes fit."""
        while self.committed_bytes() + need > self.memory_budget:
            idle = [e for e in self.loaded.values() if e.active == 0]
            if not idle:
                raise OutOfMemoryBudgetError(
                    f"model needs {need >> 20} MiB but the memory budget"
                    f" ({self.memory_budget >> 20} MiB) is held by models in use"
                )
            self.unload(min(idle, key=lambda e: e.last_used).name)

    def unload(self, name: str) -> bool:
        with self._lock:
            entry = self.loaded.pop(name, None)
        if entry is None:
            return False
        busy = entry.engine.cancel_all()
        if entry.engine.remote:  # the process ends its requests, then drops the engine
            entry.engine.stop()
        elif busy or entry.engine.has_work():
            self.draining.append(entry.engine)  # its requests still get their final event
        self._wake.set()
        log.info("unloaded model=%s engine=%d", name, entry.engine_id)
        self.stats.event("unload", name)
        return True

    # -- requests --------------------------------------------------------------------
    def begin(self, entry: Loaded) -> None:
        queued = sum(e.active for e in self.loaded.values())
        if queued >= self.max_queue:
            raise ServerBusyError(f"server busy: {queued} requests queued (ACCORDION_MAX_QUEUE)")
        entry.active += 1
        entry.idle_since = None
        self._wake.set()

    def end(self, entry: Loaded) -> None:
        entry.active -= 1
        entry.touch()
        if entry.active == 0:
            entry.idle_since = time.monotonic()
            if entry.keep_alive == 0:
                self.unload(entry.name)

    def wake(self) -> None:
        self._wake.set()

    async def compute(self, entry: Loaded, method: str, *args: Any) -> Any:
        """An engine's own heavy call (`score`, `embed`): on the main thread between
        steps, or in the engine process."""
        if entry.engine.remote:
            return await entry.engine.call(method, *args)
        return await self.on_main(getattr(entry.engine, method), *args)

    # -- the main-thread loop ----------------------------------------------------------
    async def on_main(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the driving (main) thread between steps; await its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((fn, args, loop, future))
        self._wake.set()
        return await future

    def _run_calls(self) -> None:
        while True:
            try:
                fn, args, loop, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                result, error = fn(*args), None
            except Exception as e:  # handed to the awaiting request, which reports it
                result, error = None, e
            loop.call_soon_threadsafe(_settle, future, result, error)

    def drive(self, until: Callable[[], bool] | None = None) -> None:
        """Step every engine with work; expire and shrink idle ones; until `stop` (or until
        `until()` holds: a Ray worker drives between its calls, see batch/worker.py)."""
        while not self._stopping and not (until is not None and until()):
            self._run_calls()
            self.stats.tick(list(self.loaded.values()), self.link)
            busy = False
            for entry in list(self.loaded.values()):
                engine = entry.engine
                if engine.has_work():
                    busy = True
                    try:
                        engine.step()
                    except Exception as e:
                        log.exception("engine step failed model=%s", entry.name)
                        engine.fail_all(e)
            for engine in list(self.draining):
                if engine.has_work():
                    busy = True
                    engine.step()
                else:
                    self.draining.remove(engine)
            if not busy and self._calls.empty():
                self._housekeeping()
                self._wake.wait(timeout=0.25)
                self._wake.clear()

    def _housekeeping(self) -> None:
        now_wall, now = time.time(), time.monotonic()
        for entry in list(self.loaded.values()):
            # keep_alive 0 unloads in `end`, after a request: not between load and request
            if entry.active == 0 and entry.keep_alive != 0 and entry.expires_at <= now_wall:
                self.unload(entry.name)
            elif entry.idle_since is not None and now - entry.idle_since > 2.0:
                entry.engine.kv.shrink()
                heap.trim()  # and the requests' temporaries
                entry.idle_since = None

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self.link is not None:
            self.link.stop()


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.cancelled():
        return  # the caller went away; a load still counts as loaded
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
