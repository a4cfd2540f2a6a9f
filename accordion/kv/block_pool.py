"""Hands out fixed-size KV blocks by id; knows nothing of models or requests."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """A fixed number of blocks; lowest ids first so used memory stays packed at the front."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.owned: set[int] = set()

    def can_allocate(self, n: int) -> bool:
        return len(self.free) >= n

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"KV pool exhausted: need {n} blocks, {len(self.free)} free")
        blocks = [self.free.popleft() for _ in range(n)]
        self.owned.update(blocks)
        return blocks

    def deallocate(self, blocks: list[int]) -> None:
        for b in blocks:
            self.owned.remove(b)
            self.free.appendleft(b)

    @property
    def used(self) -> int:
        return len(self.owned)
