"""Property tests of the paged KV cache, driven the way the scheduler and runner drive it.

A hypothesis state machine opens, prefills, decodes, preempts, finishes and shrinks
sequences over small token alphabets (so prefixes are shared and hit), under budgets of
only a few segments (so storage grows, cached blocks are evicted and reservations fail).
Every computed position gets, in every layer of every group, a value that is a function
of its token prefix alone; after each step the block bookkeeping is checked and every
held position is read back, which proves that prefix sharing, window drops, compaction
moves and growth never hand a sequence the wrong data.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from accordion.kv.cache import Group, KVCache, chain_keys
from accordion.models.config import ModelConfig

MAX_LEN = 96  # context limit of the driven sequences
CHUNKS = [1, 3, 8, 16, 64]  # prefill chunk sizes (the engine's num_batch share)


def make_config(flags: tuple[bool, ...], window: int, kv_heads: int, head_dim: int) -> ModelConfig:
    """A model config for the cache alone: only layers, heads and the window matter."""
    return ModelConfig(
        arch="gemma3" if window else "llama",
        vocab_size=16,
        hidden=64,
        n_layers=len(flags),
        n_heads=2,
        n_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn=128,
        context_length=MAX_LEN,
        norm_eps=1e-6,
        rope_base=10000.0,
        rope_base_local=10000.0,
        sliding_window=window,
        window_layers=flags,
        attn_scale=1.0 / math.sqrt(head_dim),
        qkv_bias=False,
        qk_norm=bool(window),
        sandwich_norm=bool(window),
        embed_scale=1.0,
        activation="gelu_tanh" if window else "silu",
        tied_embeddings=True,
        rope_interleaved=False,
    )


@dataclass(frozen=True)
class Setup:
    """One cache shape. One head's block (block_size * head_dim * 4 bytes) divides a page
    and segment_tokens make whole pages, so a segment is exactly segment_tokens /
    block_size blocks (no rounding up to pages)."""

    name: str
    flags: tuple[bool, ...]  # per layer: sliding window or not
    window: int
    block_size: int
    kv_heads: int
    head_dim: int
    segment_tokens: int
    warm_tokens: int
    budget_bytes: int

    def cache(self) -> KVCache:
        cfg = make_config(self.flags, self.window, self.kv_heads, self.head_dim)
        return KVCache(
            cfg,
            self.budget_bytes,
            self.block_size,
            torch.float32,  # values are exact integers < 2**24
            self.segment_tokens,
            self.warm_tokens,
        )

    def __repr__(self) -> str:  # short falsifying-example output
        return self.name


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Only tiny tensor ops here: on a busy machine more OpenMP threads just spin-wait
    (the state machine ran ten times slower under load with the default two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


KIB = 1024
SETUPS = [
    # gemma3-like: two window layers, one global; 16 KiB / 8 KiB per block, 4-block segments
    Setup("gemma_bs4_w32", (True, True, False), 32, 4, 2, 128, 16, 16, 512 * KIB),
    # 16-token blocks, two per window; the global layer sits between window layers
    Setup("gemma_bs16_w32", (True, False, True), 32, 16, 1, 64, 32, 32, 256 * KIB),
    # every layer windowed (mistral-like), window not a multiple of the block size
    Setup("mistral_bs4_w10", (True, True), 10, 4, 2, 128, 8, 8, 320 * KIB),
    # no window at all; a warm floor of two segments
    Setup("llama_bs16", (False, False), 0, 16, 1, 64, 32, 64, 256 * KIB),
    # no window, a tight budget (24 blocks = 96 tokens): eviction and failure are common
    Setup("llama_bs4_tight", (False,), 0, 4, 2, 128, 16, 16, 192 * KIB),
]
SETUP = {s.name: s for s in SETUPS}


# -- the values written into the cache ---------------------------------------------------
def prefix_values(tokens: list[int]) -> list[int]:
    """Per position, a hash of tokens[:pos+1] (< 2**20): what its K/V must hold."""
    out, h = [], 0
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % (1 << 20)
        out.append(h)
    return out


def slot_value(h: torch.Tensor, layer: int, kind: int) -> torch.Tensor:
    """Distinct per layer and K/V so a mixed-up plane is caught too (exact in float32)."""
    return (h * 8 + 2 * layer + kind).to(torch.float32)


def slot_index(kv: KVCache, sid: int, gi: int, positions: range) -> tuple[torch.Tensor, ...]:
    """Block and offset of each position in group gi, as the runner computes its slots."""
    bs = kv.block_size
    table, first_pos = kv.slices(sid)[gi]
    first_block = first_pos // bs
    rows = [p // bs - first_block for p in positions]
    # a negative row would silently wrap around the Python list
    assert all(0 <= r < len(table) for r in rows), (positions, first_pos, len(table))
    blocks = torch.tensor([table[r] for r in rows], dtype=torch.long)
    offs = torch.tensor([p % bs for p in positions], dtype=torch.long)
    return blocks, offs


def write_kv(kv: KVCache, sid: int, tokens: list[int], start: int, end: int) -> None:
    """What a forward step does to the cache: store K/V of positions [start, end)."""
    h, bs = torch.tensor(prefix_values(tokens)[start:end], dtype=torch.long), kv.block_size
    for gi, g in enumerate(kv.groups):
        blocks, offs = slot_index(kv, sid, gi, range(start, end))
        for b in blocks.unique().tolist():
            # a block another sequence can read (shared or published) is never written
            assert g.pool.ref[b] == 1 and b not in g.pool.key_of, (gi, b)
        for j in range(len(g.layers)):
            for kind, planes in enumerate((g.arena.k, g.arena.v)):
                planes[j][:, blocks * bs + offs] = slot_value(h, j, kind).view(1, -1, 1)


def check_kv(kv: KVCache, sid: int, tokens: list[int], computed: int) -> None:
    """Every held position below `computed` reads back the value of its own prefix."""
    values, bs = prefix_values(tokens), kv.block_size
    for gi, g in enumerate(kv.groups):
        _, first_pos = kv.slices(sid)[gi]
        positions = range(first_pos, computed)
        if not positions:
            continue
        blocks, offs = slot_index(kv, sid, gi, positions)
        h = torch.tensor(values[first_pos:computed], dtype=torch.long)
        for j in range(len(g.layers)):
            for kind, planes in enumerate((g.arena.k, g.arena.v)):
                got = planes[j][:, blocks * bs + offs]  # [kv_heads, n, head_dim]
                want = slot_value(h, j, kind).view(1, -1, 1).expand_as(got)
                if not torch.equal(got, want):
                    bad = (got != want).any(2).any(0).nonzero().flatten().tolist()
                    pos = [positions[i] for i in bad]
                    raise AssertionError(f"seq {sid} group {gi} layer {j} kind {kind}: {pos}")


# -- structural checks ---------------------------------------------------------------------
def check_pools(kv: KVCache) -> None:
    """Each committed block is free, cached-free or owned, exactly one; refs match tables."""
    for gi, (g, floor) in enumerate(zip(kv.groups, kv.warm_segments, strict=True)):
        p = g.pool
        free, cached, owned = set(p.free), set(p.cached), set(p.ref)
        assert len(free) == len(p.free), "a block is free twice"
        assert not (free & cached or free & owned or cached & owned), gi
        assert free | cached | owned == set(range(p.committed_blocks)), gi
        assert p.free == sorted(p.free), "free ids are kept in order"
        # the prefix index: one key per block and back, only blocks holding full data
        assert len(p.key_of) == len(p.by_key)
        assert all(p.by_key[key] == b for b, key in p.key_of.items())
        assert cached <= set(p.key_of), "a cached block has no key to be found by"
        assert set(p.key_of) <= cached | owned
        refs = Counter(b for seq in kv.seqs.values() for b in seq.tables[gi])
        assert dict(refs) == p.ref, gi
        # only a published block (found by its key) can be shared
        assert all(b in p.key_of for b, n in p.ref.items() if n > 1)
        assert floor <= p.segments <= p.max_segments, (gi, p.segments)
    expect = sum(
        g.pool.segments * g.pool.segment_blocks * g.arena.bytes_per_block for g in kv.groups
    )
    assert kv.allocated_bytes == expect
    s = kv.stats()
    assert s["allocated_bytes"] == kv.allocated_bytes
    assert s["used_bytes"] <= s["allocated_bytes"] <= s["budget_bytes"]
    assert s["sequences"] == len(kv.seqs)


def check_promises(kv: KVCache) -> None:
    """`inflight` counts, per block key, the open prompts yet to compute that block."""
    promised = Counter(key for keys in kv._promised.values() for key in keys)
    assert set(kv._promised) <= set(kv.seqs)
    assert kv.inflight == dict(promised)
    for sid, keys in kv._promised.items():
        assert kv.coming_soon(sid) == (bool(keys) and promised[keys[0]] > 1)


def first_needed(g: Group, pos: int, bs: int) -> int:
    """First block the query at pos may read; written out here rather than trusted."""
    return max(0, pos - g.window + 1) // bs if g.window else 0


@dataclass
class Track:
    """What the test knows of an open sequence, like the engine's Sequence."""

    tokens: list[int]
    computed: int  # positions [0, computed) hold their K/V; the next query is at computed
    reserved: int  # end of the last reserve
    prompt_blocks: int  # full blocks of the tokens known at open: what it promises


def snapshot(kv: KVCache) -> tuple:
    """Live state a failed reserve must leave as it was. It may grow storage, or give back
    idle segments of another group (dropping the cache they held), but never live data."""
    seqs = {s: ([list(t) for t in q.tables], list(q.first)) for s, q in kv.seqs.items()}
    pools = [
        (dict(g.pool.ref), {b: k for b, k in g.pool.key_of.items() if b in g.pool.ref})
        for g in kv.groups
    ]
    return seqs, pools, dict(kv.inflight)


class KVMachine(RuleBasedStateMachine):
    """The scheduler's use of the cache, with K/V writes standing in for the model."""

    @initialize(setup=st.sampled_from(SETUPS))
    def start(self, setup: Setup) -> None:
        self.setup = setup
        self.kv = setup.cache()
        self.bs = self.kv.block_size
        self.seqs: dict[int, Track] = {}
        self.waiting: dict[int, list[int]] = {}  # preempted or refused: hold nothing
        self.history: list[list[int]] = [[]]  # every token list so far, for shared prefixes
        self.next_sid = 0

    # -- the engine's moves ------------------------------------------------------------
    def _open(self, sid: int, tokens: list[int]) -> Track:
        hit = self.kv.open(sid, tokens)
        if hit:
            event("prefix hit")
        bs = self.bs
        assert hit % bs == 0 and 0 <= hit < len(tokens), (hit, len(tokens))
        seq = self.kv.seqs[sid]
        assert len(seq.keys) == hit // bs
        for gi, g in enumerate(self.kv.groups):
            table, first_pos = self.kv.slices(sid)[gi]
            assert first_pos == first_needed(g, hit, bs) * bs
            assert len(table) == hit // bs - first_pos // bs
            for i, b in enumerate(table):  # hits are the published blocks of these tokens
                assert g.pool.by_key[seq.keys[first_pos // bs + i]] == b
        track = Track(list(tokens), hit, hit, (len(tokens) - 1) // bs)
        self.seqs[sid] = track
        return track

    def _reserve(self, sid: int, n: int) -> bool:
        """One step of work for sid: reserve n positions, compute them, publish blocks."""
        t = self.seqs[sid]
        start, end = t.computed, t.computed + n
        assert end <= len(t.tokens)
        before = snapshot(self.kv)
        cached = [set(g.pool.cached) for g in self.kv.groups]
        segments = [g.pool.segments for g in self.kv.groups]
        if not self.kv.try_reserve(sid, start, end):
            assert snapshot(self.kv) == before, "a failed reserve took something"
            event("reserve refused")
            return False
        # coverage of the paths this test is about (see --hypothesis-show-statistics)
        for g, table, was, segs in zip(
            self.kv.groups, self.kv.seqs[sid].tables, cached, segments, strict=True
        ):
            if was & set(table):
                event("cached block evicted and reused")
            if g.pool.segments > segs:
                event("storage grew")
        t.reserved = end
        if n == 1:
            self._check_window_bound(sid)
        write_kv(self.kv, sid, t.tokens, start, end)
        t.computed = end
        self.kv.written(sid, t.tokens, end)
        return True

    def _prefill(self, sid: int, chunk: int, upto: int) -> bool:
        """Compute up to `upto` in chunks; False (and nothing held) if memory ran out."""
        while self.seqs[sid].computed < upto:
            n = min(chunk, upto - self.seqs[sid].computed)
            if not self._reserve(sid, n):
                self._preempt(sid)
                return False
        return True

    def _preempt(self, sid: int) -> None:
        """Blocks go back (full ones stay cached); the sequence waits to be recomputed."""
        self.kv.close(sid)
        self.waiting[sid] = self.seqs.pop(sid).tokens

    def _pick(self, pool: dict, pick: int) -> int:
        return sorted(pool)[pick % len(pool)]

    # -- rules -------------------------------------------------------------------------
    @rule(
        base=st.integers(0, 1 << 16),
        cut=st.integers(0, MAX_LEN),
        extra=st.lists(st.integers(0, 2), min_size=1, max_size=40),
        chunk=st.sampled_from(CHUNKS),
    )
    def admit_new(self, base: int, cut: int, extra: list[int], chunk: int) -> None:
        """A request arrives; it often shares a prefix with an earlier one."""
        tokens = (self.history[base % len(self.history)][:cut] + extra)[: MAX_LEN - 8]
        self.history.append(tokens)
        sid, self.next_sid = self.next_sid, self.next_sid + 1
        self._open(sid, tokens)
        if self.kv.coming_soon(sid) and len(self.seqs) > 1:
            # another running prompt is computing the same block: wait and share it
            self._preempt(sid)
            return
        # admission: only the first chunk must fit now, like the scheduler's first step
        first = min(self.seqs[sid].computed + chunk, len(tokens))
        if not self._reserve(sid, first - self.seqs[sid].computed):
            self._preempt(sid)

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 1 << 16), chunk=st.sampled_from(CHUNKS), tok=st.integers(0, 2))
    def step(self, pick: int, chunk: int, tok: int) -> None:
        """One scheduler step for a running sequence: a prefill chunk, or one decode."""
        sid = self._pick(self.seqs, pick)
        t = self.seqs[sid]
        if t.computed < len(t.tokens):
            n = min(chunk, len(t.tokens) - t.computed)
        elif len(t.tokens) < MAX_LEN:
            t.tokens.append(tok)  # the sampled token; its K/V is computed next step
            n = 1
        else:
            self.kv.close(sid)  # the context is full: the request finishes
            del self.seqs[sid]
            return
        if not self._reserve(sid, n):
            self._preempt(sid)

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 1 << 16))
    def finish(self, pick: int) -> None:
        sid = self._pick(self.seqs, pick)
        self.kv.close(sid)
        del self.seqs[sid]

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 1 << 16), chunk=st.sampled_from(CHUNKS))
    def preempt_and_recompute(self, pick: int, chunk: int) -> None:
        """Preempted, then re-admitted at once: its own blocks come back as prefix hits."""
        sid = self._pick(self.seqs, pick)
        t = self.seqs.pop(sid)
        keys = chain_keys(t.tokens, self.bs, (len(t.tokens) - 1) // self.bs)
        known = [all(g.pool.peek(k) for g in self.kv.groups) for k in keys] + [False]
        self.kv.close(sid)
        track = self._open(sid, t.tokens)
        if not any(g.window for g in self.kv.groups):
            # closing forgets no published block: its own (now cached) and others' all hit.
            # Not "every block it computed": a block computed while an identical one was
            # known stays private (register keeps the first), and that first copy may
            # have been evicted since, although this sequence held the same data.
            assert track.computed == known.index(False) * self.bs, (track, known)
        self._prefill(sid, chunk, t.computed)

    @precondition(lambda self: self.waiting)
    @rule(pick=st.integers(0, 1 << 16), chunk=st.sampled_from(CHUNKS))
    def resume(self, pick: int, chunk: int) -> None:
        """A waiting sequence is admitted again and recomputes what it lost."""
        sid = self._pick(self.waiting, pick)
        tokens = self.waiting.pop(sid)
        self._open(sid, tokens)
        self._prefill(sid, chunk, len(tokens) - 1)  # the last token is the next step's

    @precondition(lambda self: self.waiting)
    @rule(pick=st.integers(0, 1 << 16))
    def cancel_waiting(self, pick: int) -> None:
        del self.waiting[self._pick(self.waiting, pick)]

    @rule()
    def shrink(self) -> None:
        if any(g.pool.compaction_moves() for g in self.kv.groups):
            event("compaction moves blocks")
        if self.kv.shrink():
            event("shrink released segments")
        for g, floor in zip(self.kv.groups, self.kv.warm_segments, strict=True):
            p = g.pool
            top = range((p.segments - 1) * p.segment_blocks, p.committed_blocks)
            # only a top segment that still holds an owned block may stay above the floor
            assert p.segments == floor or any(b in p.ref for b in top)

    # -- checks ------------------------------------------------------------------------
    def _check_window_bound(self, sid: int) -> None:
        for g, (table, _) in zip(self.kv.groups, self.kv.slices(sid), strict=True):
            if g.window:
                assert len(table) <= g.window // self.bs + 2, (len(table), g.window)

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "kv"):
            return
        kv, bs = self.kv, self.bs
        assert set(kv.seqs) == set(self.seqs)
        check_pools(kv)
        check_promises(kv)
        for sid, t in self.seqs.items():
            for g, (table, first_pos) in zip(kv.groups, kv.slices(sid), strict=True):
                # at rest a window table starts at the first block the next query reads
                assert first_pos == first_needed(g, t.computed, bs) * bs, (first_pos, t)
                assert len(table) == max(0, -(-t.reserved // bs) - first_pos // bs)
                assert len(set(table)) == len(table)
            # still promised: the prompt's full blocks it has not computed yet, in order
            done = len(kv.seqs[sid].keys)
            keys = chain_keys(t.tokens, bs, max(done, t.prompt_blocks))
            assert kv._promised[sid] == keys[done : t.prompt_blocks]
            check_kv(kv, sid, t.tokens, t.computed)


KVMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestKVMachine = KVMachine.TestCase


# -- examples --------------------------------------------------------------------------------
def floor_bytes(kv: KVCache) -> int:
    return sum(
        f * g.pool.segment_blocks * g.arena.bytes_per_block
        for g, f in zip(kv.groups, kv.warm_segments, strict=True)
    )


def compute(kv: KVCache, sid: int, tokens: list[int], upto: int | None = None) -> int:
    """Open and prefill in one chunk (asserting it fits); returns the prefix hit."""
    hit = kv.open(sid, tokens)
    end = len(tokens) if upto is None else upto
    assert kv.try_reserve(sid, hit, end)
    write_kv(kv, sid, tokens, hit, end)
    kv.written(sid, tokens, end)
    return hit


@pytest.mark.parametrize("setup", SETUPS, ids=repr)
def test_fresh_cache_allocates_the_warm_floor(setup: Setup) -> None:
    kv = setup.cache()
    assert [g.pool.segments for g in kv.groups] == kv.warm_segments
    assert kv.allocated_bytes == floor_bytes(kv) > 0
    assert kv.stats()["used_bytes"] == 0


@pytest.mark.parametrize("setup", SETUPS, ids=repr)
def test_allocation_returns_to_the_warm_floor(setup: Setup) -> None:
    kv = setup.cache()
    prompts = {sid: [sid] * 12 + list(range(8)) for sid in range(3)}
    for sid, tokens in prompts.items():
        compute(kv, sid, tokens)
    assert kv.allocated_bytes > floor_bytes(kv)
    kv.close(1)
    kv.shrink()  # may compact 0 and 2 into the hole 1 left: their data must follow
    check_pools(kv)
    for sid in (0, 2):
        check_kv(kv, sid, prompts[sid], len(prompts[sid]))
    kv.close(0)
    kv.close(2)
    kv.shrink()
    assert kv.allocated_bytes == floor_bytes(kv)
    check_pools(kv)


@pytest.mark.parametrize("name", ["llama_bs4_tight", "gemma_bs4_w32", "gemma_bs16_w32"])
def test_same_prefix_shares_its_blocks(name: str) -> None:
    kv = SETUP[name].cache()
    bs = kv.block_size
    a = [1, 2, 3, 4] * bs  # 4 blocks
    compute(kv, 0, a)
    keys = kv.seqs[0].keys
    b = a[: 3 * bs] + [9] * (bs + 1)  # same 3 blocks, then different
    assert kv.open(1, b) == 3 * bs
    assert kv.seqs[1].keys == keys[:3]
    for gi, g in enumerate(kv.groups):
        (ta, pa), (tb, pb) = kv.slices(0)[gi], kv.slices(1)[gi]
        assert pb == (0 if not g.window else max(0, 3 * bs - g.window + 1) // bs * bs)
        for i, block in enumerate(tb, start=pb // bs):
            assert block == g.pool.by_key[keys[i]]  # the published block of that prefix
            still_held = pa // bs <= i < pa // bs + len(ta)
            # a block the first sequence still holds is shared, not copied
            assert g.pool.ref[block] == (2 if still_held else 1)
            assert not still_held or ta[i - pa // bs] == block
    assert kv.slices(1)[0][0] == kv.slices(0)[0][0][:3]  # full attention: the whole prefix
    check_kv(kv, 1, b, 3 * bs)
    check_pools(kv)


def test_cached_blocks_are_evicted_least_recently_used_first() -> None:
    kv = SETUP["llama_bs4_tight"].cache()  # 24 blocks of 4 tokens at most
    pool = kv.groups[0].pool
    prompts = {sid: [sid] * 9 for sid in range(3)}  # 2 full blocks + 1 token each
    for sid, tokens in prompts.items():
        compute(kv, sid, tokens)
    for sid in (1, 0, 2):  # closing order sets recency: 1 is the oldest, then 0, then 2
        kv.close(sid)
    assert len(pool.cached) == 6
    # the free blocks and two more: a reserve evicts cache before it grows storage
    n_blocks = len(pool.free) + 2
    kv.open(10, [7] * 100)
    assert kv.try_reserve(10, 0, 4 * n_blocks)
    assert len(pool.cached) == 4
    kv.close(10)
    hits = {sid: kv.open(20 + sid, tokens) for sid, tokens in prompts.items()}
    assert hits == {0: 8, 1: 0, 2: 8}, hits  # only the oldest chain lost its blocks
    check_pools(kv)


def test_a_new_sequence_gets_one_run_even_through_eviction() -> None:
    """Free blocks and blocks evicted from the cache are handed out in ascending order,
    and growth continues after a sequence's last block: attention then reads one view."""
    kv = SETUP["llama_bs4_tight"].cache()
    pool = kv.groups[0].pool
    compute(kv, 0, [1] * 9)  # blocks 0, 1 full (cached once closed), 2 partial (freed)
    kv.close(0)
    assert (sorted(pool.cached), pool.free) == ([0, 1], [2, 3])  # one segment of 4
    tokens = [50 + i for i in range(30)]
    compute(kv, 10, tokens, 16)  # 4 blocks: the 2 free ones, then 2 evicted
    ((table, _),) = kv.slices(10)
    assert table == [0, 1, 2, 3]
    for end in range(17, 31):  # one token at a time, as decode goes: the pool grows
        assert kv.try_reserve(10, end - 1, end)
        write_kv(kv, 10, tokens, end - 1, end)
        kv.written(10, tokens, end)
    ((table, _),) = kv.slices(10)
    assert table == list(range(8)), table
    check_pools(kv)
    check_kv(kv, 10, tokens, 30)


def test_partial_eviction_keeps_the_head_of_a_chain() -> None:
    """Evicting one block of a closed chain must not strand all the others: a prefix hit
    needs the chain from its first block, so the head should be evicted last."""
    kv = SETUP["llama_bs4_tight"].cache()
    pool = kv.groups[0].pool
    a = list(range(100, 100 + 4 * pool.max_segments * pool.segment_blocks - 1))  # everything
    compute(kv, 0, a)
    kv.close(0)
    kv.open(1, [7] * 5)  # two blocks: the one free block, and one evicted
    assert kv.try_reserve(1, 0, 5)
    cached = len(pool.cached)
    assert cached == len(a) // 4 - 1
    assert kv.open(2, a) == 4 * cached  # every other cached block still hits


@pytest.mark.parametrize("setup", SETUPS, ids=repr)
def test_reserve_beyond_the_budget_fails_and_takes_nothing(setup: Setup) -> None:
    kv = setup.cache()
    compute(kv, 0, [1] * 10)
    budget_tokens = kv.budget_bytes // kv.bytes_per_token
    kv.open(1, [2] * (budget_tokens + 10))
    before = snapshot(kv)
    # one chunk: a window group must hold all of it too, so no layout makes it fit
    assert not kv.try_reserve(1, 0, budget_tokens + 5)
    assert snapshot(kv) == before and kv.slices(1) == [([], 0)] * len(kv.groups)
    assert kv.allocated_bytes <= kv.budget_bytes  # it grew to the budget, not past it
    # and the cache still works: a small reserve for the same sequence succeeds
    assert kv.try_reserve(1, 0, 4)
    check_pools(kv)
    check_kv(kv, 0, [1] * 10, 10)


def test_cached_memory_of_one_group_does_not_refuse_another() -> None:
    """One long decode fills the full-attention group; when it ends its blocks are only
    cache, yet a much shorter prompt is refused because the window group cannot grow."""
    setup = SETUP["gemma_bs4_w32"]
    prompt = [0] * 80  # one prefill chunk: the window group must hold all of it
    fresh = setup.cache()
    fresh.open(0, prompt)
    assert fresh.try_reserve(0, 0, len(prompt))  # it fits this budget
    kv = setup.cache()
    compute(kv, 0, [1, 2, 3, 4])
    n = 4
    while kv.try_reserve(0, n, n + 1):  # a long decode, until the budget is reached
        n += 1
    assert n > len(prompt)
    kv.close(0)  # nothing is owned any more: its segments are only free blocks now
    kv.open(1, prompt)
    # refused: with nothing else running, the scheduler fails it as RequestTooLargeError
    assert kv.try_reserve(1, 0, len(prompt))
