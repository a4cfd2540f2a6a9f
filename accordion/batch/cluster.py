"""A job spread over Ray: worker actors run the requests, the driver keeps the job.

`accordion batch run … --ray auto|local|ADDRESS --workers N` runs the same Runner
as a job on one machine: it reads the input, commits each result and writes the
files. Only its target changes. `Cluster` is that target. Each request joins a
queue; one pump loop per worker actor (worker.py) drains it, keeping that worker's
fair share of what is in flight there, so no worker holds much.

A worker that dies (its process killed, its node lost) gives back what it held.
Those requests join the queue again, and another worker runs them, or the same one
once Ray has restarted it (`max_restarts`: the model loads again in the new
process). The driver commits each custom_id once, so nothing is written twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from accordion.batch.job import RefusedError, Settings
from accordion.batch.target import Reply, Unreachable
from accordion.batch.worker import Worker

log = logging.getLogger("accordion.batch")
WAIT_S = 0.5  # the longest a pump call runs before the driver hears from its worker
RESTARTS = 4  # Ray restarts a dead worker this often before the job goes on without it
SUMMED = ("active", "running", "waiting", "preemptions", "evaluated_per_s", "generated_per_s")
SUMMED_KV = ("max_tokens", "budget_bytes", "allocated_bytes", "used_bytes", "cached_bytes")


def connect(address: str) -> None:
    """Join the Ray instance at `address` ("auto": the one running here; "local": start
    one for this process), unless this process already has one."""
    try:
        import ray
    except ImportError:
        raise RefusedError("--ray needs Ray: pip install 'accordion[ray]'") from None

    if ray.is_initialized():
        return
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=False)
        return
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as e:
        raise RefusedError(
            f"no Ray cluster at {address!r} ({e}): start one (`ray start --head`),"
            " give its address, or use --ray local"
        ) from None


@dataclass
class _Request:
    key: int
    url: str
    body: dict[str, Any]
    future: asyncio.Future


@dataclass
class _Seat:
    """One worker as the driver sees it: its actor and the requests it holds."""

    handle: Any
    url: str | None
    held: dict[int, _Request] = field(default_factory=dict)
    failures: int = 0  # in a row: past RESTARTS the worker is given up
    alive: bool = True
    ready: bool = True  # False while Ray restarts it: the others take its share


class Cluster:
    api = "openai"  # workers answer in OpenAI's shapes, whatever their endpoint speaks

    def __init__(self, seats: list[_Seat]) -> None:
        self.seats = seats
        self.queue: list[_Request] = []  # oldest first; given back requests go in front
        self.requeued = 0  # requests a dead worker held (each ran again elsewhere)
        self._keys = itertools.count()
        self._more: asyncio.Condition | None = None
        self._loops: list[asyncio.Task] = []

    @property
    def workers(self) -> int:
        return sum(seat.alive for seat in self.seats)

    @classmethod
    def start(cls, settings: Settings, model: str | None) -> Cluster:
        """Start the job's workers: an engine each, or clients of `--endpoint` URLs
        (comma-separated: worker i talks to URL i mod their number)."""
        connect(settings.ray or "auto")
        import ray

        urls: list[str | None] = [None]
        if settings.endpoint:
            urls = [url.strip() for url in settings.endpoint.split(",") if url.strip()]
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        count = settings.workers or (len(urls) if settings.endpoint else max(nodes, 1))
        cpus = settings.cpus_per_worker
        if cpus is None:  # an engine takes its share of the cluster; a client next to none
            total = ray.cluster_resources().get("CPU", 1.0)
            cpus = 0.0 if settings.endpoint else max(1.0, float(int(total // count)))
        env = {k: v for k, v in os.environ.items() if k.startswith("ACCORDION_")}
        actor, tag, seats = ray.remote(Worker), uuid.uuid4().hex[:8], []
        for i in range(count):
            url = urls[i % len(urls)]
            handle = actor.options(
                name=f"accordion-worker-{tag}-{i}",  # found by `ray list actors` (and tests)
                num_cpus=cpus,
                max_restarts=RESTARTS,
                runtime_env={"env_vars": env} if env else None,
            ).remote(
                model,
                url,
                api=settings.api,
                kv_budget=settings.kv_budget,
                max_inflight=settings.max_inflight,
                retries=settings.retries,
            )
            seats.append(_Seat(handle, url))
        return cls(seats)

    # -- the Target surface the Runner uses ------------------------------------------
    async def post(self, url: str, body: dict[str, Any]) -> Reply:
        future = asyncio.get_running_loop().create_future()
        await self._add([_Request(next(self._keys), url, body, future)], front=False)
        return await future

    def answer(self, url: str, reply: Reply) -> Any:
        return reply.body

    async def get(self, path: str) -> Any | None:
        """One worker's document; /api/stats is the sum over the workers' servers."""
        live = [seat for seat in self.seats if seat.alive]
        if path != "/api/stats":
            return await _ask(live[0].handle.get.remote(path)) if live else None
        servers = live
        if live and live[0].url:  # clients of one server ask it once
            servers = list({seat.url: seat for seat in reversed(live)}.values())
        docs = await asyncio.gather(*(_ask(s.handle.get.remote(path)) for s in servers))
        return merged([d for d in docs if isinstance(d, dict)])

    async def close(self) -> None:
        import ray

        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for seat in self.seats:
            ray.kill(seat.handle, no_restart=True)

    # -- keeping the workers busy ----------------------------------------------------
    async def _add(self, requests: list[_Request], front: bool) -> None:
        if self._more is None:
            self._more = asyncio.Condition()
            self._loops = [asyncio.ensure_future(self._serve(seat)) for seat in self.seats]
        async with self._more:
            self.queue = requests + self.queue if front else self.queue + requests
            self._more.notify_all()

    async def _serve(self, seat: _Seat) -> None:
        assert self._more is not None
        while seat.alive:
            async with self._more:
                await self._more.wait_for(lambda: bool(self.queue or seat.held))
            items = self._take(seat)
            try:
                done = await seat.handle.pump.remote(
                    [(r.key, r.url, r.body) for r in items], WAIT_S
                )
            except Unreachable as e:  # its server is gone: the job stops, resume finishes it
                self._fail(seat, e)
                continue
            except Exception as e:  # the actor died (or is restarting): give back its work
                await self._lose(seat, e)
                continue
            for key, status, body, request_id in done:
                request = seat.held.pop(key, None)
                if request is not None and not request.future.done():
                    request.future.set_result(Reply(status, body, request_id))

    def _take(self, seat: _Seat) -> list[_Request]:
        """Up to this worker's fair share of all that is queued or in flight."""
        held = sum(len(s.held) for s in self.seats)
        ready = sum(s.alive and s.ready for s in self.seats)
        share = math.ceil((len(self.queue) + held) / max(ready, 1))
        taken = []
        while self.queue and len(seat.held) < share:
            request = self.queue.pop(0)
            if request.future.done():  # its caller gave up (the job is stopping)
                continue
            seat.held[request.key] = request
            taken.append(request)
        return taken

    async def _lose(self, seat: _Seat, error: Exception) -> None:
        """Its requests go to the others now; it takes work again once Ray has it back."""
        given_back = [r for r in seat.held.values() if not r.future.done()]
        seat.held.clear()
        seat.ready = False
        self.requeued += len(given_back)
        log.warning(
            "ray worker %d lost (%s): %d requests queued again",
            self.seats.index(seat),
            type(error).__name__,
            len(given_back),
        )
        await self._add(given_back, front=True)
        while seat.alive:
            try:
                await seat.handle.identity.remote()  # waits out a restart (the model loads)
            except Exception:
                seat.failures += 1
                seat.alive = seat.failures <= RESTARTS
                await asyncio.sleep(min(0.25 * seat.failures, 2.0))
                continue
            seat.ready, seat.failures = True, 0
            return
        log.warning("ray worker %d is given up", self.seats.index(seat))
        if not self.workers:  # nobody left to run them: the job stops
            for request in self.queue:
                if not request.future.done():
                    request.future.set_exception(Unreachable(f"every Ray worker died: {error}"))
            self.queue.clear()

    def _fail(self, seat: _Seat, error: Exception) -> None:
        for request in seat.held.values():
            if not request.future.done():
                request.future.set_exception(Unreachable(str(error)))
        seat.held.clear()


async def _ask(ref: Any) -> Any:
    try:
        return await ref
    except Exception:  # a dead worker has no document
        return None


def merged(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Several servers' /api/stats as one: what the Runner plans with is the sum."""
    if not docs:
        return None
    out: dict[str, Any] = {"t": min(d.get("t") or 0.0 for d in docs), "process": {}, "models": {}}
    for doc in docs:
        for name, model in (doc.get("models") or {}).items():
            total = out["models"].get(name)
            if total is None:
                out["models"][name] = {**model, "kv": dict(model["kv"])}
                continue
            for key in SUMMED:
                total[key] = (total.get(key) or 0) + (model.get(key) or 0)
            for key in SUMMED_KV:
                total["kv"][key] += model["kv"][key]
    return out
