"""The elastic paged KV cache of one model: layer groups, block tables, prefix sharing.

It knows sequences only by id and tokens by id. Full-attention layers form one
group; sliding-window layers another, whose tables drop blocks that left the
window so their memory is bounded by the window, not by the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from accordion.kv.arena import PAGE, Arena
from accordion.kv.pool import BlockKey, BlockPool, NoFreeBlocks
from accordion.models.config import ModelConfig

__all__ = ["KVCache", "NoFreeBlocks", "SeqBlocks"]


@dataclass
class Group:
    layers: list[int]
    window: int  # 0 = full attention
    arena: Arena
    pool: BlockPool

    def first_needed(self, pos: int, block_size: int) -> int:
        """First block the query at `pos` may read."""
        return 0 if not self.window else max(0, pos - self.window + 1) // block_size


@dataclass
class SeqBlocks:
    tables: list[list[int]]  # per group: held blocks in position order
    first: list[int]  # per group: logical block index of tables[g][0]
    keys: list[BlockKey] = field(default_factory=list)  # chain keys of its full blocks


def chain_keys(tokens: list[int], block_size: int, n_blocks: int) -> list[BlockKey]:
    keys, parent = [], 0
    for i in range(n_blocks):
        key = (parent, tuple(tokens[i * block_size : (i + 1) * block_size]))
        keys.append(key)
        parent = hash(key)
    return keys


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        budget_bytes: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.bfloat16,
        segment_tokens: int = 64,
        warm_tokens: int = 64,
    ) -> None:
        self.block_size, self.budget_bytes, self.cfg = block_size, budget_bytes, cfg
        windows = sorted({cfg.sliding_window if w else 0 for w in cfg.window_layers})
        self.groups: list[Group] = []
        self._group_of: list[int] = [0] * cfg.n_layers
        for window in windows:
            layers = [
                i
                for i in range(cfg.n_layers)
                if (cfg.window_layers[i] and window) or (not cfg.window_layers[i] and not window)
            ]
            for i in layers:
                self._group_of[i] = len(self.groups)
            self.groups.append(self._make_group(layers, window, dtype, segment_tokens))
        self.seqs: dict[int, SeqBlocks] = {}
        # full prompt blocks some open sequence is about to compute: a request sharing
        # them waits one step rather than computing them a second time
        self.inflight: dict[BlockKey, int] = {}
        self._promised: dict[int, list[BlockKey]] = {}
        self.warm_segments = [
            -(-warm_tokens // (g.pool.segment_blocks * block_size)) for g in self.groups
        ]
        for g, floor in zip(self.groups, self.warm_segments, strict=True):
            while g.pool.segments < floor and g.pool.grow():
                pass

    def _make_group(self, layers: list[int], window: int, dtype: torch.dtype, seg_tokens: int):
        cfg, bs = self.cfg, self.block_size
        probe = Arena(len(layers), 1, bs, cfg.n_kv_heads, cfg.head_dim, dtype)
        seg = max(1, seg_tokens // bs)
        while (seg * probe.head_block_bytes) % PAGE:  # segments release whole pages
            seg += 1
        max_segments = max(1, self.budget_bytes // (seg * probe.bytes_per_block))
        arena = Arena(len(layers), max_segments * seg, bs, cfg.n_kv_heads, cfg.head_dim, dtype)
        seg_bytes = seg * arena.bytes_per_block
        pool = BlockPool(
            seg,
            max_segments,
            arena.commit,
            arena.release,
            lambda: self.allocated_bytes + seg_bytes <= self.budget_bytes,
        )
        return Group(layers, window, arena, pool)

    # -- what the model reads ----------------------------------------------------
    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.groups[self._group_of[i]]
        j = g.layers.index(i)
        return g.arena.k[j], g.arena.v[j]

    def group_of(self, i: int) -> int:
        return self._group_of[i]

    # -- sequences ---------------------------------------------------------------
    def open(self, sid: int, tokens: list[int]) -> int:
        """Start a sequence; share cached prefix blocks; return tokens served from cache."""
        bs = self.block_size
        n_full = (len(tokens) - 1) // bs  # at least one token is left to compute
        keys = chain_keys(tokens, bs, n_full)
        hit = 0
        while hit < n_full and all(g.pool.peek(keys[hit]) for g in self.groups if not g.window):
            hit += 1
        for g in self.groups:  # a window group needs the whole window before the cut
            while (
                g.window
                and hit
                and not all(g.pool.peek(keys[i]) for i in range(g.first_needed(hit * bs, bs), hit))
            ):
                hit -= 1
        seq = SeqBlocks([[] for _ in self.groups], [0] * len(self.groups), keys[:hit])
        self._promised[sid] = keys[hit:]
        for key in keys[hit:]:
            self.inflight[key] = self.inflight.get(key, 0) + 1
        for gi, g in enumerate(self.groups):
            first = g.first_needed(hit * bs, bs)
            seq.first[gi] = first
            for i in range(first, hit):
                block = g.pool.lookup(keys[i])
                assert block is not None
                seq.tables[gi].append(block)
        self.seqs[sid] = seq
        return hit * bs

    def coming_soon(self, sid: int) -> bool:
        """Is the first block this sequence must compute also being computed by another?"""
        promised = self._promised.get(sid)
        return bool(promised) and self.inflight.get(promised[0], 0) > 1

    def _unpromise(self, sid: int, keys: list[BlockKey]) -> None:
        for key in keys:
            left = self.inflight.get(key, 0) - 1
            if left > 0:
                self.inflight[key] = left
            else:
                self.inflight.pop(key, None)

    def blocks_needed(self, sid: int, start: int, end: int) -> list[int]:
        """Per group: new blocks to compute positions [start, end)."""
        seq, bs = self.seqs[sid], self.block_size
        need = []
        for gi, g in enumerate(self.groups):
            held_to = seq.first[gi] + len(seq.tables[gi])
            first = max(held_to, g.first_needed(start, bs))
            need.append(max(0, -(-end // bs) - first))
        return need

    def try_reserve(self, sid: int, start: int, end: int) -> bool:
        """Hold blocks for positions [start, end), growing storage as needed; False if
        the budget (or the machine) cannot supply them: then nothing is taken."""
        need = self.blocks_needed(sid, start, end)
        for g, n in zip(self.groups, need, strict=True):
            while g.pool.available < n:
                if g.pool.grow():
                    continue
                # the budget is shared: idle segments of another group may be given back
                if not self._reclaim(g, need) or not g.pool.grow():
                    return False
        self._take(sid, start, end)
        return True

    def _take(self, sid: int, start: int, end: int) -> None:
        seq, bs = self.seqs[sid], self.block_size
        self._trim(seq, start)
        for gi, g in enumerate(self.groups):
            table = seq.tables[gi]
            if not table:
                seq.first[gi] = max(seq.first[gi], g.first_needed(start, bs))
            missing = -(-end // bs) - seq.first[gi] - len(table)
            if missing > 0:  # one run if possible: attention reads a run as a view
                table += g.pool.allocate_run(missing, table[-1] if table else None)

    def _trim(self, seq: SeqBlocks, pos: int) -> None:
        """Window groups give back blocks no query from `pos` on can see."""
        for gi, g in enumerate(self.groups):
            drop = g.first_needed(pos, self.block_size) - seq.first[gi]
            if g.window and drop > 0:
                table = seq.tables[gi]
                for block in table[:drop]:
                    g.pool.deallocate(block)  # a full block stays cached for prefix hits
                del table[:drop]
                seq.first[gi] += drop

    def written(self, sid: int, tokens: list[int], n_computed: int) -> None:
        """Tokens [0, n_computed) are in the cache: make newly full blocks shareable."""
        seq, bs = self.seqs[sid], self.block_size
        while len(seq.keys) < n_computed // bs:
            i = len(seq.keys)
            parent = hash(seq.keys[-1]) if seq.keys else 0
            key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            seq.keys.append(key)
            promised = self._promised.get(sid)
            if promised and promised[0] == key:
                self._unpromise(sid, [promised.pop(0)])
            for gi, g in enumerate(self.groups):
                j = i - seq.first[gi]
                if 0 <= j < len(seq.tables[gi]):
                    g.pool.register(seq.tables[gi][j], key)
        self._trim(seq, n_computed)  # memory at rest stays within the window

    def close(self, sid: int) -> None:
        """Free a sequence's blocks; full ones stay cached for later prefix hits."""
        seq = self.seqs.pop(sid, None)
        if seq is None:
            return
        self._unpromise(sid, self._promised.pop(sid, []))
        for g, table in zip(self.groups, seq.tables, strict=True):
            for block in reversed(table):  # tail first: LRU evicts a chain from its end
                g.pool.deallocate(block)

    def slices(self, sid: int) -> list[tuple[list[int], int]]:
        """Per group: (block table, position of its first token)."""
        seq = self.seqs[sid]
        return [(t, f * self.block_size) for t, f in zip(seq.tables, seq.first, strict=True)]

    # -- memory ------------------------------------------------------------------
    def _reclaim(self, wanting: Group, need: list[int]) -> bool:
        """Release other groups' unowned top segments beyond what this step needs of them."""
        released = 0
        for gi, g in enumerate(self.groups):
            if g is not wanting:  # no compaction here: live tables stay as they are
                released += g.pool.shrink(self.warm_segments[gi], keep=need[gi])
        return released > 0

    def shrink(self) -> int:
        """Release empty top segments down to the warm floor (compacting first)."""
        return sum(self._shrink_group(gi, floor) for gi, floor in enumerate(self.warm_segments))

    def _shrink_group(self, gi: int, floor: int) -> int:
        g = self.groups[gi]
        for src, dst in g.pool.compaction_moves():
            g.arena.copy_block(src, dst)
            g.pool.move(src, dst)
            for seq in self.seqs.values():
                table = seq.tables[gi]
                table[:] = [dst if b == src else b for b in table]
        return g.pool.shrink(floor)

    @property
    def allocated_bytes(self) -> int:
        return sum(g.pool.committed_blocks * g.arena.bytes_per_block for g in self.groups)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across every layer."""
        return sum(g.arena.bytes_per_block for g in self.groups) // self.block_size

    def stats(self) -> dict:
        bs, per_token = self.block_size, self.bytes_per_token
        groups = []
        for g in self.groups:
            b = g.arena.bytes_per_block
            groups.append(
                {
                    "layers": len(g.layers),
                    "window": g.window,
                    "segments": g.pool.segments,
                    "segment_blocks": g.pool.segment_blocks,
                    "bytes_per_block": b,
                    "allocated_blocks": g.pool.committed_blocks,
                    "used_blocks": g.pool.owned,
                    "cached_blocks": len(g.pool.cached),
                    "free_blocks": len(g.pool.free),
                }
            )

        def total(field: str) -> int:
            return sum(d[field] * d["bytes_per_block"] for d in groups)

        return {
            "max_tokens": self.cfg.context_length,
            "block_size": bs,
            "bytes_per_token": per_token,
            "budget_bytes": self.budget_bytes,
            "allocated_bytes": total("allocated_blocks"),
            "used_bytes": total("used_blocks"),
            "cached_bytes": total("cached_blocks"),
            "allocated_tokens": total("allocated_blocks") // per_token,
            "used_tokens": total("used_blocks") // per_token,
            "cached_tokens": total("cached_blocks") // per_token,
            "sequences": len(self.seqs),
            "groups": groups,
        }
