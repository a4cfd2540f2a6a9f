"""The server watching itself: one sample a second of every loaded model and the process,
kept for an hour, for /api/stats, the dashboard and `accordion ps --watch`.

Samples are taken on the driving thread between engine steps (`tick`), so they read
the KV pool and the scheduler without locks and cost one `kv.stats()` a second.
Per model: weights bytes, KV tokens and bytes (allocated / used / cached, per layer
group), the budget, running and waiting sequences, tokens/s evaluated and generated
over the last second, time to first token (median and p95 of the requests that
ended in the last minute), preemptions. For the process: RSS and the machine's
available memory. Loads and unloads are kept as events.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from accordion.engine.request import RequestOutput
    from accordion.process.link import Link
    from accordion.server.manager import Loaded

HISTORY_S = 3600
TTFT_WINDOW_S = 60.0


@dataclass
class _Counters:
    evaluated: int = 0
    generated: int = 0
    at: float = 0.0


@dataclass
class Stats:
    interval_s: float = 1.0
    samples: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY_S))
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=1000))
    _last: float = 0.0
    _counters: dict[int, _Counters] = field(default_factory=dict)  # by engine id
    _ttft: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _process: psutil.Process = field(default_factory=psutil.Process)

    # -- fed by the manager ------------------------------------------------------------
    def event(self, kind: str, model: str) -> None:
        with self._lock:
            self.events.append({"t": time.time(), "kind": kind, "model": model})

    def observe(self, model: str, out: RequestOutput) -> None:
        """A finished request (called from the HTTP thread)."""
        t = out.timings
        if out.token_ids and "prefill" in t:
            with self._lock:
                window = self._ttft.setdefault(model, deque(maxlen=10_000))
                window.append((time.monotonic(), t.get("queue", 0.0) + t["prefill"]))

    def tick(self, loaded: list[Loaded], link: Link | None = None) -> None:
        """Take a sample if one is due (the driving thread calls this often)."""
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        memory = psutil.virtual_memory()
        sample = {
            "t": time.time(),
            "process": {"rss": self._process.memory_info().rss, "available": memory.available},
            "models": {entry.name: self._model(entry, now) for entry in loaded},
        }
        if link is not None:  # the engine process: its memory, and how often it restarted
            sample["engine"] = {"pid": link.pid, "restarts": link.restarts, "rss": _rss(link.pid)}
        live = {entry.engine_id for entry in loaded}
        for gone in [i for i in self._counters if i not in live]:
            del self._counters[gone]
        with self._lock:
            self.samples.append(sample)

    def _model(self, entry: Loaded, now: float) -> dict[str, Any]:
        engine = entry.engine
        kv = engine.kv_stats()
        seen = self._counters.setdefault(
            entry.engine_id,
            _Counters(engine.tokens_evaluated, engine.tokens_generated, now - self.interval_s),
        )
        span = max(now - seen.at, 1e-6)
        rates = (
            (engine.tokens_evaluated - seen.evaluated) / span,
            (engine.tokens_generated - seen.generated) / span,
        )
        seen.evaluated, seen.generated, seen.at = (
            engine.tokens_evaluated,
            engine.tokens_generated,
            now,
        )
        return {
            "weights_bytes": entry.weight_bytes,
            "kv": {
                key: kv[key]
                for key in (
                    "max_tokens",
                    "block_size",
                    "budget_bytes",
                    "bytes_per_token",
                    "allocated_tokens",
                    "used_tokens",
                    "cached_tokens",
                    "allocated_bytes",
                    "used_bytes",
                    "cached_bytes",
                )
            }
            | {"groups": kv["groups"]},
            "active": entry.active,
            "running": kv["running"],
            "waiting": kv["waiting"],
            "evaluated_per_s": round(rates[0], 1),
            "generated_per_s": round(rates[1], 1),
            "preemptions": kv["preemptions"],
            **self._ttft_of(entry.name, now),
        }

    def _ttft_of(self, model: str, now: float) -> dict[str, float | None]:
        with self._lock:
            window = self._ttft.get(model, deque())
            while window and now - window[0][0] > TTFT_WINDOW_S:
                window.popleft()
            values = sorted(v for _, v in window)
        if not values:
            return {"ttft_p50": None, "ttft_p95": None}
        p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
        return {"ttft_p50": round(statistics.median(values), 4), "ttft_p95": round(p95, 4)}

    # -- read by the routes ------------------------------------------------------------
    def latest(self) -> dict[str, Any] | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def history(self, seconds: float) -> dict[str, Any]:
        since = time.time() - seconds
        with self._lock:
            samples = [s for s in self.samples if s["t"] >= since]
            events = [e for e in self.events if e["t"] >= since]
        return {"interval_s": self.interval_s, "samples": samples, "events": events}


def _rss(pid: int | None) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss if pid else None
    except psutil.Error:  # between a death and the restart
        return None
