"""Prometheus metrics: request counts and latencies, and live KV memory per model."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from accordion.engine.request import RequestOutput
from accordion.server.manager import ModelManager

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class _KVCollector(Collector):
    """Read at scrape time from the live engines: no bookkeeping on the hot path."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        names = {
            "allocated_tokens": "KV cache capacity allocated, in tokens",
            "used_tokens": "KV cache tokens held by running requests",
            "cached_tokens": "KV cache tokens kept for prefix reuse",
            "allocated_bytes": "KV cache bytes allocated",
            "used_bytes": "KV cache bytes held by running requests",
        }
        families = {
            k: GaugeMetricFamily(f"accordion_kv_{k}", h, labels=["model"]) for k, h in names.items()
        }
        running = GaugeMetricFamily(
            "accordion_running_requests", "Sequences running", labels=["model"]
        )
        waiting = GaugeMetricFamily("accordion_queue_depth", "Sequences waiting", labels=["model"])
        weights = GaugeMetricFamily(
            "accordion_weights_bytes",
            "Bytes the model's weights occupy: the GGUF file's tensors, mapped as they are",
            labels=["model"],
        )
        for entry in list(self.manager.loaded.values()):
            weights.add_metric([entry.name], entry.weight_bytes)
            stats = entry.engine.kv_stats()
            for key, family in families.items():
                family.add_metric([entry.name], stats[key])
            running.add_metric([entry.name], stats["running"])
            waiting.add_metric([entry.name], stats["waiting"])
        yield from families.values()
        yield weights
        yield running
        yield waiting
        link = self.manager.link
        if link is not None:
            restarts = GaugeMetricFamily(
                "accordion_engine_restarts",
                "Times the engine process died and was started again",
            )
            restarts.add_metric([], link.restarts)
            yield restarts


class Metrics:
    def __init__(self, manager: ModelManager) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "accordion_requests",
            "Finished generation requests",
            ["model", "finish_reason"],
            registry=r,
        )
        self.tokens = Counter(
            "accordion_tokens",
            "Tokens by kind (prompt, cached, generated)",
            ["model", "kind"],
            registry=r,
        )
        self.preemptions = Counter(
            "accordion_preemptions", "Sequences preempted for memory", ["model"], registry=r
        )
        self.ttft = Histogram(
            "accordion_time_to_first_token_seconds",
            "Arrival to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "accordion_time_per_output_token_seconds",
            "Decode time per generated token",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        r.register(_KVCollector(manager))

    def observe(self, model: str, out: RequestOutput) -> None:
        self.requests.labels(model, out.finish_reason or "unknown").inc()
        self.tokens.labels(model, "prompt").inc(out.prompt_tokens)
        self.tokens.labels(model, "cached").inc(out.cached_tokens)
        self.tokens.labels(model, "generated").inc(len(out.token_ids))
        self.preemptions.labels(model).inc(out.preemptions)
        t = out.timings
        if out.token_ids:
            self.ttft.labels(model).observe(t.get("queue", 0) + t.get("prefill", 0))
            if len(out.token_ids) > 1:
                self.per_token.labels(model).observe(t.get("decode", 0) / (len(out.token_ids) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
