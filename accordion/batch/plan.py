"""A job's plan: what its shape (a shared system prompt, messages, answers) needs of a
model's KV and time, from figures probe.py measures.

Requests in flight with the shared prefix held once, the KV that takes with and
without sharing, how many requests a conversation chunk holds under the context
limit, and the time it should take. Plain arithmetic, so that the runner and the
job tools import it without the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_INFLIGHT = 256  # a plan's cap on requests in flight
MARGIN = 64  # tokens a conversation chunk keeps free below the context limit


@dataclass
class Shape:
    system: int = 2400
    message: int = 600
    answer: int = 300
    requests: int = 170_000


@dataclass
class Plan:
    concurrency: int
    kv_tokens_shared: int  # system + (message + answer) x concurrency
    kv_tokens_unshared: int  # (system + message + answer) x concurrency
    kv_bytes_shared: int
    kv_bytes_unshared: int
    chunk_requests: int  # conversation mode: requests per chunk under the context limit
    chunks: int
    estimated_s: float


def sequence_bytes(groups: list[tuple[int, int]], tokens: int, block: int) -> int:
    """What one sequence of `tokens` holds: a window group only its window (and a block)."""
    return sum(per * (min(tokens, window + block) if window else tokens) for per, window in groups)


def plan(
    shape: Shape,
    groups: list[tuple[int, int]],
    block: int,
    budget: int,
    context: int,
    speeds: tuple,
) -> Plan:
    """Independent requests share the system prompt's full-attention blocks; each holds its
    own message and answer there, and its own window in sliding-window layers."""
    prefill, _, decode_batch = speeds
    own, whole = shape.message + shape.answer, shape.system + shape.message + shape.answer
    full = sum(per for per, window in groups if not window)
    shared_bytes = full * shape.system
    per_request = sequence_bytes(groups, whole, block) - shared_bytes
    # 0: not even one request of this shape fits the budget
    concurrency = max(0, min(MAX_INFLIGHT, (budget - shared_bytes) // max(per_request, 1)))
    chunk = max(1, (context - MARGIN - shape.system) // own)
    estimated = shape.requests * (shape.message / prefill + shape.answer / decode_batch)
    return Plan(
        concurrency,
        shape.system + own * concurrency,
        whole * concurrency,
        shared_bytes + per_request * concurrency,
        sequence_bytes(groups, whole, block) * concurrency,
        chunk,
        -(-shape.requests // chunk),
        estimated,
    )
