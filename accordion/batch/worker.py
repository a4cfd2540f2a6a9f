"""One worker of a job spread over Ray: an engine of its own, or a client of one server.

A worker lives in a Ray actor, a process of its own. Ray calls a synchronous actor's
methods on that process's main thread, which is where an engine must step (torch's
OpenMP kernels are slow off it): so the worker's HTTP side (the server's own app
through ASGI, or a connection to an endpoint) runs on an event loop on a second
thread, and `pump` drives the engine on the main thread while requests are in
flight. Each call takes new requests, runs until some finish (or a short wait ends)
and hands back the finished ones: the driver keeps a small, bounded set on each
worker, so a lost worker loses only what it held, and nothing here is kept that the
driver does not also hold.

No Ray import here: cluster.py wraps this class as an actor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any

from accordion.batch.target import Reply, Target, local_server

MIN_BATCH_S = 0.05  # a pump returns no sooner (unless all is done): fewer round trips

Item = tuple[int, str, dict[str, Any]]  # key, url, body
Done = tuple[int, int, Any, str]  # key, status, OpenAI body, request id


class Worker:
    def __init__(
        self,
        model: str | None,
        endpoint: str | None = None,
        api: str = "openai",
        kv_budget: int | None = None,
        max_inflight: int = 128,
        retries: int = 6,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="accordion-worker", daemon=True).start()
        self.manager: Any = None
        if endpoint:
            self.target = Target.endpoint(endpoint, api, retries)
        else:
            self.manager, app = local_server(kv_budget, max_inflight, keep_alive=-1)
            self.target = Target.embedded(app)
            if model:  # loaded now, once per actor: a restarted actor loads it again
                self._wait([self._on_loop(self.manager.get(model))])
        self.inflight: dict[int, tuple[str, concurrent.futures.Future]] = {}

    def identity(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def get(self, path: str) -> Any:
        """A JSON document from the worker's target (None when it has no such route)."""
        future = self._on_loop(self.target.get(path))
        self._wait([future])
        return future.result()

    def pump(self, items: list[Item], wait_s: float) -> list[Done]:
        """Start `items`, run until some of what is in flight finished (at least
        MIN_BATCH_S, at most `wait_s`), and return the finished ones."""
        for key, url, body in items:
            self.inflight[key] = (url, self._on_loop(self.target.post(url, body)))
        futures = [future for _, future in self.inflight.values()]
        self._wait(futures, wait_s, MIN_BATCH_S)
        done: list[Done] = []
        for key in [k for k, (_, f) in self.inflight.items() if f.done()]:
            url, future = self.inflight.pop(key)
            reply: Reply = future.result()  # Unreachable ends the call: the driver decides
            done.append((key, reply.status, self.target.answer(url, reply), reply.request_id))
        return done

    def complete(self, items: list[Item]) -> list[Done]:
        """Run `items` to the end (Ray Data's batches: ray_data.py)."""
        done = self.pump(items, 1.0)
        while self.inflight:
            done += self.pump([], 1.0)
        return done

    # -- waiting on the loop's work, stepping the engine meanwhile --------------------
    def _on_loop(self, work: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        if self.manager is not None:  # the drive loop sleeps when idle: wake it
            future.add_done_callback(lambda _: self.manager.wake())
        return future

    def _wait(
        self, futures: list[concurrent.futures.Future], most_s: float = 1e9, least_s: float = 0.0
    ) -> None:
        """Until all are done, or one is and `least_s` passed, or `most_s` passed."""
        start = time.monotonic()

        def enough() -> bool:
            waited = time.monotonic() - start
            finished = sum(f.done() for f in futures)
            if finished == len(futures) or waited >= most_s:
                return True
            return finished > 0 and waited >= least_s

        if self.manager is not None:
            self.manager.drive(until=enough)
        while not enough():  # a client of an endpoint: the server does the work
            time.sleep(0.01)
