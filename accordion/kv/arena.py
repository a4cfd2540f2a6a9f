"""Physical K/V memory of one layer group: reserved once, committed by segment.

The arena reserves address space for the whole budget with an anonymous
mapping, so a block id is a plain index into one tensor per layer and growth
never moves or copies a block. Memory is committed segment by segment (pages
are touched when a segment is added) and returned to the OS with
MADV_DONTNEED when a segment is released, so resident memory follows the
committed segments, not the budget.
"""

from __future__ import annotations

import mmap

import psutil
import torch

PAGE = mmap.PAGESIZE
# reserve address space without charging it against the commit limit (Linux value)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class Arena:
    def __init__(
        self,
        n_layers: int,
        max_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> None:
        self.n_layers = n_layers
        self.max_blocks = max_blocks
        self.block_shape = (block_size, kv_heads, head_dim)
        elem = torch.empty(0, dtype=dtype).element_size()
        self.block_bytes = block_size * kv_heads * head_dim * elem  # one layer, K or V
        plane = max_blocks * self.block_bytes  # one layer's K (or V) for every block
        self.plane_bytes = -(-plane // PAGE) * PAGE
        size = max(PAGE, 2 * n_layers * self.plane_bytes)
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        raw = torch.frombuffer(self._map, dtype=torch.uint8)
        planes = []
        for i in range(2 * n_layers):
            chunk = raw[i * self.plane_bytes : i * self.plane_bytes + plane]
            planes.append(chunk.view(dtype).view(max_blocks, *self.block_shape))
        self.k = planes[:n_layers]
        self.v = planes[n_layers:]

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block across all layers of the group."""
        return 2 * self.n_layers * self.block_bytes

    def commit(self, first: int, count: int) -> bool:
        """Make blocks [first, first+count) resident; False if the machine lacks the memory."""
        need = count * self.bytes_per_block
        if psutil.virtual_memory().available < need + (256 << 20):
            return False  # touching pages past this point risks the OOM killer, not an exception
        try:
            for plane in (*self.k, *self.v):
                plane[first : first + count].zero_()
        except (MemoryError, RuntimeError):
            self.release(first, count)
            return False
        return True

    def release(self, first: int, count: int) -> None:
        """Give the pages of blocks [first, first+count) back to the OS."""
        for i in range(2 * self.n_layers):
            start = i * self.plane_bytes + first * self.block_bytes
            end = start + count * self.block_bytes
            lo = -(-start // PAGE) * PAGE  # only whole pages inside the range
            hi = end // PAGE * PAGE
            if hi > lo:
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def copy_block(self, src: int, dst: int) -> None:
        for plane in (*self.k, *self.v):
            plane[dst].copy_(plane[src])
