"""Block bookkeeping for one layer group: free, cached-free or owned, never two.

- owned: ref count >= 1 (several sequences may share a prefix block)
- cached-free: nobody owns it but it still holds a full block of known tokens,
  kept in LRU order for prefix hits and evicted first when memory is needed
- free: holds nothing useful

Blocks live in segments of `segment_blocks`; only the first `segments` are
committed. A sequence's next block is the one right after its last when that
one is free, so its table stays one run of consecutive ids that attention reads
as a view, with no gather. Otherwise allocation takes the start of the lowest
free run long enough for what the sequence needs now, else the lowest free id,
so high segments drain; shrinking releases empty segments from the top.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

BlockKey = tuple[int, tuple[int, ...]]  # (parent chain hash, token ids of the block)


class NoFreeBlocks(Exception):
    """The group's budget is reached and no cached block can be evicted."""


class BlockPool:
    def __init__(
        self,
        segment_blocks: int,
        max_segments: int,
        commit: Callable[[int, int], bool],
        release: Callable[[int, int], None],
        can_grow: Callable[[], bool] = lambda: True,
    ) -> None:
        self.segment_blocks = segment_blocks
        self.max_segments = max_segments
        self._commit, self._release, self._can_grow = commit, release, can_grow
        self.segments = 0
        self.free: list[int] = []  # free ids in committed segments, ascending
        self.cached: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self.ref: dict[int, int] = {}  # owned blocks
        self.key_of: dict[int, BlockKey] = {}  # full blocks (owned or cached-free)
        self.by_key: dict[BlockKey, int] = {}

    # -- sizes --------------------------------------------------------------
    @property
    def committed_blocks(self) -> int:
        return self.segments * self.segment_blocks

    @property
    def owned(self) -> int:
        return len(self.ref)

    @property
    def available(self) -> int:
        """Blocks obtainable now without growing: free plus evictable cached."""
        return len(self.free) + len(self.cached)

    def can_allocate(self, n: int) -> bool:
        growable = (self.max_segments - self.segments) * self.segment_blocks
        return n <= self.available + growable

    # -- growth and shrink --------------------------------------------------
    def grow(self) -> bool:
        if self.segments >= self.max_segments or not self._can_grow():
            return False
        first = self.segments * self.segment_blocks
        if not self._commit(first, self.segment_blocks):
            return False
        self.segments += 1
        self.free.extend(range(first, first + self.segment_blocks))  # above every free id
        return True

    def shrink(self, floor_segments: int, keep: int = 0) -> int:
        """Release top segments holding no owned block (dropping their cache), keeping at
        least `keep` blocks available; returns how many segments went."""
        released = 0
        while self.segments > floor_segments and self.available - self.segment_blocks >= keep:
            first = (self.segments - 1) * self.segment_blocks
            top = range(first, first + self.segment_blocks)
            if any(b in self.ref for b in top):
                break
            for b in top:
                if b in self.cached:
                    self._forget(b)
                    del self.cached[b]
            self.free = [b for b in self.free if b < first]
            self._release(first, self.segment_blocks)
            self.segments -= 1
            released += 1
        return released

    def compaction_moves(self) -> list[tuple[int, int]]:
        """(src, dst) moves that would empty the top segment into lower free blocks."""
        if self.segments < 2:
            return []
        first = (self.segments - 1) * self.segment_blocks
        live = [b for b in range(first, first + self.segment_blocks) if b in self.ref]
        low_free = [b for b in self.free if b < first][: len(live)]
        return list(zip(live, low_free, strict=False)) if len(low_free) == len(live) else []

    def move(self, src: int, dst: int) -> None:
        """Account a block's contents moved from src (owned) to dst (free)."""
        self._take_free(dst)
        self.ref[dst] = self.ref.pop(src)
        key = self.key_of.pop(src, None)
        if key is not None:
            self.key_of[dst] = key
            self.by_key[key] = dst
        bisect.insort(self.free, src)

    # -- allocation ---------------------------------------------------------
    def allocate_run(self, n: int, after: int | None = None) -> list[int]:
        """n blocks for a sequence whose last block is `after`, in the order that makes
        the fewest runs: ascending, starting at after + 1 when that is among them."""
        blocks = []
        for left in range(n, 0, -1):
            blocks.append(self.allocate(blocks[-1] if blocks else after, left))
        blocks.sort()  # evicted cached blocks may sit right before the free ones
        if after is not None and after + 1 in blocks:
            i = blocks.index(after + 1)
            blocks = blocks[i:] + blocks[:i]
        return blocks

    def allocate(self, after: int | None = None, run: int = 1) -> int:
        """A block for a sequence whose last block is `after` and that needs `run` more."""
        if not self.free and not self.cached:
            self.grow()
        if self.free:
            block = self._pick_free(after, run)
            self._take_free(block)
        elif self.cached:
            block, _ = self.cached.popitem(last=False)  # evict the least recently used
            self._forget(block)
        else:
            raise NoFreeBlocks
        self.ref[block] = 1
        return block

    def lookup(self, key: BlockKey) -> int | None:
        """A full block with exactly these tokens after this parent, now owned once more."""
        block = self.by_key.get(key)
        if block is None:
            return None
        if block in self.cached:
            del self.cached[block]
            self.ref[block] = 1
        else:
            self.ref[block] += 1
        return block

    def peek(self, key: BlockKey) -> bool:
        return key in self.by_key

    def register(self, block: int, key: BlockKey) -> None:
        """Record a block that just became full so later requests can share it."""
        if block in self.key_of:
            return
        old = self.by_key.get(key)
        if old is not None:
            if old not in self.cached:
                return  # a live identical block already serves hits; this one stays private
            del self.cached[old]  # the idle copy gives way to the one in use
            self._forget(old)
            bisect.insort(self.free, old)
        self.key_of[block] = key
        self.by_key[key] = block

    def deallocate(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] > 0:
            return
        del self.ref[block]
        if block in self.key_of:
            self.cached[block] = None  # most recently used at the end
        else:
            bisect.insort(self.free, block)

    def _pick_free(self, after: int | None, run: int) -> int:
        free = self.free
        if after is not None and self._is_free(after + 1):
            return after + 1
        if run > 1 and len(free) >= run:  # the lowest run of `run` consecutive ids
            ids = np.asarray(free)
            starts = np.flatnonzero(ids[run - 1 :] - ids[: len(ids) - run + 1] == run - 1)
            if len(starts):
                return free[int(starts[0])]
        return free[0]

    def _is_free(self, block: int) -> bool:
        i = bisect.bisect_left(self.free, block)
        return i < len(self.free) and self.free[i] == block

    def _take_free(self, block: int) -> None:
        del self.free[bisect.bisect_left(self.free, block)]

    def _forget(self, block: int) -> None:
        key = self.key_of.pop(block)
        del self.by_key[key]
