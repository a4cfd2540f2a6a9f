"""The engine for Ray Data: a callable class for `Dataset.map_batches`, one engine per actor.

    import ray
    from accordion.batch.ray_data import Chat

    ds = ray.data.read_json("prompts.jsonl")          # a `prompt` or `messages` column
    ds = ds.map_batches(
        Chat,
        fn_constructor_kwargs={"model": "smollm2", "max_tokens": 64, "temperature": 0},
        concurrency=2,                                # actors, each loading the model once
        num_cpus=1,
        batch_size=32,
    )
    ds.write_json("answers/")

Each row becomes one chat completion through the server's own route (the same
bodies `accordion batch` and `accordion serve` give, run in the actor as worker.py
runs them), so a batch's rows share the engine's continuous batching and its prefix
cache. A row the route refuses (too long, a bad message) gets its message in the
`error` column and empty outputs. It does not fail the batch, so one bad prompt
cannot end a long job.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from accordion.batch.lines import CHAT
from accordion.batch.worker import Worker

OUTPUTS = ("generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "error")


class Chat:
    def __init__(
        self,
        model: str,
        system: str | None = None,
        kv_budget: int | None = None,
        **sampling: Any,
    ) -> None:
        """`sampling`: any /v1/chat/completions field (max_tokens, temperature, seed …)."""
        self.model, self.system, self.sampling = model, system, sampling
        self.worker = Worker(model, kv_budget=kv_budget)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(batch.values()))) if batch else 0
        items = [(i, CHAT, self._body(batch, i)) for i in range(rows)]
        found = {key: (status, body) for key, status, body, _ in self.worker.complete(items)}
        columns: dict[str, list[Any]] = {name: [] for name in OUTPUTS}
        for i in range(rows):
            status, body = found[i]
            ok = status == 200
            choice = body["choices"][0] if ok else {}
            usage = body.get("usage", {}) if ok else {}
            columns["generated_text"].append((choice.get("message") or {}).get("content", ""))
            columns["finish_reason"].append(choice.get("finish_reason", ""))
            columns["prompt_tokens"].append(usage.get("prompt_tokens", 0))
            columns["completion_tokens"].append(usage.get("completion_tokens", 0))
            columns["error"].append("" if ok else _message(body))
        return {**batch, **{name: np.asarray(values) for name, values in columns.items()}}

    def _body(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        if "messages" in batch:
            messages = [dict(m) for m in batch["messages"][i]]
        elif "prompt" in batch:
            messages = [{"role": "user", "content": str(batch["prompt"][i])}]
        else:
            raise KeyError("Chat needs a 'prompt' or a 'messages' column")
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        return {**self.sampling, "model": self.model, "messages": messages}


def _message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message"))
    return json.dumps(body)[:1000]
