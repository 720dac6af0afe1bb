"""Block accounting: release in the finishing step, no leaks, refcounts always consistent."""
from __future__ import annotations

from collections import Counter

import torch
import pytest
from hypothesis import given, settings, strategies as st

from sot_engine.engine import LLM, SamplingParams
from sot_engine.engine.kv_cache import BlockManager, PoolExhausted, chain_hash
from sot_engine.engine.sequence import Sequence


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    held = Counter(b for s in live for b in s.block_table)
    for b in range(bm.num_blocks):
        assert bm.ref_counts[b] == held[b], f"block {b}: refcount {bm.ref_counts[b]}, held by {held[b]}"
    free = list(bm.free_ids) + list(bm.cached_free)
    assert len(set(free)) == len(free), "a block is free twice"
    assert set(free) == {b for b in range(bm.num_blocks) if held[b] == 0}
    assert all(bm.block_hash[b] is None for b in bm.free_ids), "a cached block on the uncached free list"
    assert all(bm.block_hash[b] is not None for b in bm.cached_free), "an uncached block on the cached free list"
    assert bm.cached == {h: b for b, h in enumerate(bm.block_hash) if h is not None}, "hash map and blocks disagree"


class ShadowKV:
    """What each KV slot holds, as the tokens it was computed from (a slot's KV depends on its token and
    every token before it): an independent model of the pool to check cache hits against."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm, self.bs = bm, bm.block_size
        self.slots: list[list[tuple[int, ...] | None]] = [[None] * self.bs for _ in range(bm.num_blocks)]

    def compute(self, seq: Sequence) -> None:
        """The runner's part: KV for the tokens past num_cached_tokens, then the engine's commit."""
        for pos in range(seq.num_cached_tokens, len(seq)):
            b = seq.block_table[pos // self.bs]
            assert self.bm.ref_counts[b] == 1 and self.bm.block_hash[b] is None, \
                f"KV written into block {b}, which is shared or cached"
            self.slots[b][pos % self.bs] = tuple(seq.token_ids[:pos + 1])
        seq.num_cached_tokens = len(seq)
        self.bm.commit(seq)

    def copy(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            self.slots[dst] = list(self.slots[src])

    def check_seq(self, seq: Sequence) -> None:
        for pos in range(seq.num_cached_tokens):
            got = self.slots[seq.block_table[pos // self.bs]][pos % self.bs]
            assert got == tuple(seq.token_ids[:pos + 1]), f"seq {seq.seq_id} position {pos} reads foreign KV"

    def check_cache(self) -> None:
        """Every registered block (in use or free) holds the KV of the prefix its hash names."""
        for h, b in self.bm.cached.items():
            toks = self.slots[b][-1]
            assert toks is not None and len(toks) % self.bs == 0
            parent = None
            for i in range(len(toks) // self.bs):
                parent = chain_hash(parent, list(toks[i * self.bs:(i + 1) * self.bs]))
            assert parent == h, f"block {b} is registered under a hash its KV does not have"
            assert self.slots[b] == [toks[:len(toks) - self.bs + j + 1] for j in range(self.bs)]


ops = st.lists(st.tuples(st.sampled_from(["admit", "admit", "grow", "fork", "finish", "preempt", "resume"]),
                         st.integers(0, 10_000), st.integers(1, 70)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 4, 16]),
       caching=st.booleans(), base=st.lists(st.integers(0, 2), min_size=70, max_size=70))
def test_block_manager_property(ops, num_blocks, block_size, caching, base):
    """Random admit/grow/fork/finish/preempt/resume over prompts that share prefixes of `base` (a 3-token
    vocabulary, so equal blocks are common): refcounts exact, free lists consistent, every sequence reads
    the KV of its own tokens, every cached block holds what its hash says, nothing leaks."""
    bm = BlockManager(num_blocks, block_size, enable_caching=caching)
    kv = ShadowKV(bm)
    live: list[Sequence] = []
    preempted: list[Sequence] = []
    params = SamplingParams()

    def admit(seq: Sequence) -> bool:
        before = (bm.num_free, list(seq.block_table))
        if not bm.can_allocate(seq):
            with pytest.raises(PoolExhausted):
                bm.allocate(seq)
            assert (bm.num_free, seq.block_table) == before
            return False
        cached_before = seq.num_cached_tokens
        bm.allocate(seq)
        assert len(seq.block_table) == bm.blocks_for(len(seq))
        assert seq.num_cached_tokens < len(seq), "the last token must be computed"
        assert caching or seq.num_cached_tokens == cached_before
        kv.check_seq(seq)  # the hits hold this sequence's KV
        kv.compute(seq)
        live.append(seq)
        return True

    for op, pick, n in ops:
        if op == "admit":
            admit(Sequence(base[:n] + [3] * (pick % 3), params))
        elif live and op == "grow":
            seq = live[pick % len(live)]
            seq.token_ids.append(pick % 3)
            if bm.can_append(seq):
                bm.append_slot(seq)
                kv.compute(seq)
            else:
                seq.token_ids.pop()
        elif live and op == "fork":
            parent = live[pick % len(live)]
            shared = pick % (parent.num_cached_tokens + 1)
            child = Sequence(parent.token_ids[:shared] + [pick % 3] * (n % 5), params)
            if not child.token_ids:
                continue
            shared = min(shared, len(child) - 1)  # as the engine forks: one token left to compute
            free_before = bm.num_free
            try:
                kv.copy(bm.fork(parent, child, shared))
            except PoolExhausted:
                assert bm.num_free == free_before == 0 and child.block_table == []
                continue
            assert child.block_table[:shared // block_size] == parent.block_table[:shared // block_size]
            check_invariants(bm, live + [child])
            kv.check_seq(child)
            if not admit(child):  # not admitted: it gives its references back
                bm.free(child)
        elif live and op == "finish":
            bm.free(live.pop(pick % len(live)))
        elif live and op == "preempt":
            seq = live.pop(pick % len(live))
            bm.free(seq)
            assert seq.num_cached_tokens == 0 and seq.block_hashes == []
            preempted.append(seq)
        elif preempted and op == "resume":  # recomputed from its tokens so far, maybe from its own cached blocks
            seq = preempted[pick % len(preempted)]
            if admit(seq):
                preempted.remove(seq)
        check_invariants(bm, live)
        for seq in live:
            kv.check_seq(seq)
        kv.check_cache()
    for seq in live:
        bm.free(seq)
    check_invariants(bm, [])
    kv.check_cache()
    assert bm.num_free == num_blocks
    assert caching or not bm.cached


def _computed(bm: BlockManager, tokens: list[int]) -> Sequence:
    seq = Sequence(tokens, SamplingParams())
    bm.allocate(seq)
    seq.num_cached_tokens = len(seq)
    bm.commit(seq)
    return seq


def test_cache_eviction_order_and_hits():
    """Never-cached free blocks go first, the most recently freed of them first (warm, its memory committed),
    then cached ones least recently freed first; a sequence's tail block is freed before its head, so the head
    of a prefix outlives its tail."""
    bm = BlockManager(8, 2)
    a = _computed(bm, [1, 2, 3, 4, 5])  # blocks 0, 1 full and registered, 2 partial
    assert a.block_table == [0, 1, 2] and len(bm.cached) == 2
    bm.free(a)
    assert bm.num_free == 8 and list(bm.cached_free) == [1, 0]
    b = Sequence(list(range(20, 26)), SamplingParams())
    e = Sequence(list(range(30, 36)), SamplingParams())
    bm.allocate(b)
    bm.allocate(e)
    assert b.block_table + e.block_table == [2, 3, 4, 5, 6, 7], "a cached block was taken before an uncached one"
    assert len(bm.cached) == 2
    d = Sequence([40, 41], SamplingParams())
    bm.allocate(d)
    assert d.block_table == [1] and list(bm.cached.values()) == [0], "not the least recently freed cached block"
    bm.free(d)
    bm.free(b)
    c = Sequence([1, 2, 3, 4, 6], SamplingParams())
    bm.allocate(c)
    assert c.block_table[0] == 0 and c.num_cached_tokens == 2 == bm.hit_tokens
    assert bm.ref_counts[0] == 1 and 0 not in bm.cached_free


def test_whole_prompt_hit_leaves_the_last_block_to_compute():
    bm = BlockManager(8, 4)
    bm.free(_computed(bm, list(range(12))))
    again = Sequence(list(range(12)), SamplingParams())  # 3 full blocks, all cached
    bm.allocate(again)
    assert again.num_cached_tokens == 8, "the block holding the last prompt token must be recomputed"
    assert bm.block_hash[again.block_table[2]] is None  # ... into a fresh block
    longer = Sequence(list(range(13)), SamplingParams())
    bm.allocate(longer)
    assert longer.num_cached_tokens == 12 and longer.block_table[:2] == again.block_table[:2]
    assert bm.ref_counts[again.block_table[0]] == 2


def test_hits_on_free_blocks_count_against_the_free_pool():
    bm = BlockManager(3, 2)
    bm.free(_computed(bm, [1, 2, 3]))  # block 0 cached, 1 uncached
    other = Sequence([9, 9, 9, 9], SamplingParams())
    bm.allocate(other)  # takes the two uncached blocks, the cached one stays
    assert bm.num_free == 1 and bm.cached_free
    hit = Sequence([1, 2, 5], SamplingParams())  # hit on the free block + one fresh block: 2 > 1 free
    assert not bm.can_allocate(hit)
    with pytest.raises(PoolExhausted):
        bm.allocate(hit)
    assert hit.block_table == [] and bm.num_free == 1 and len(bm.cached) == 1 and bm.hit_tokens == 0
    miss = Sequence([7, 8], SamplingParams())  # one block, no hit possible: evicts the cached one
    bm.allocate(miss)
    assert miss.block_table == [0] and not bm.cached and bm.num_free == 0


def test_fork_child_registers_its_own_blocks():
    """A child forked mid-block copies the partial block and, as its blocks fill, registers them under its
    own tokens (not the parent's, which continue differently): a later sequence with the child's tokens
    hits all of them."""
    bm = BlockManager(12, 4)
    parent = _computed(bm, list(range(12)))  # 3 full blocks, all registered
    child = Sequence(list(range(10)) + [20, 21, 22, 23, 24, 25], SamplingParams())
    copies = bm.fork(parent, child, 10)
    assert copies == [(parent.block_table[2], child.block_table[2])]
    bm.allocate(child)
    child.num_cached_tokens = len(child)
    bm.commit(child)
    assert bm.block_hash[child.block_table[2]] is not None and bm.block_hash[parent.block_table[2]] is not None
    table = list(child.block_table)
    bm.free(parent)
    bm.free(child)
    later = Sequence(child.token_ids + [99], SamplingParams())
    bm.allocate(later)
    assert later.num_cached_tokens == 16 and later.block_table[:4] == table


def test_finished_sequence_released_in_its_step(tiny_dir):
    llm = LLM(str(tiny_dir), num_blocks=40, block_size=4)
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    seqs = [eng.add_request(torch.randint(0, 512, (n,), generator=g).tolist(),
                            SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
            for n, m in [(9, 3), (5, 7), (14, 12)]]
    finished = set()
    while eng.has_unfinished():
        outs = eng.step()
        for o in outs:
            if o.finished:
                finished.add(o.seq.seq_id)
                assert o.seq.block_table == [], "finished sequence still holds blocks"
                assert o.seq not in eng.scheduler.running
        held = {b for s in eng.scheduler.running for b in s.block_table}
        assert eng.block_manager.num_free == 40 - len(held)
        nxt = [s for s in eng.scheduler.running]
        assert not any(s.seq_id in finished for s in nxt)
    assert [s.num_output_tokens for s in seqs] == [3, 7, 12]
    assert llm.stats()["free_blocks"] == llm.stats()["total_blocks"] == 40


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "fork", "abort", "step", "step"]),
                          st.integers(0, 1000)), min_size=1, max_size=30))
def test_engine_random_ops_leak_nothing(tiny_llm_small_pool, actions):
    llm = tiny_llm_small_pool
    eng = llm.engine
    live = []
    for act, r in actions:
        if act == "add":
            live.append(eng.add_request(list(range(1, 2 + r % 30)),
                                        SamplingParams(temperature=0, max_tokens=1 + r % 9, ignore_eos=True)))
        elif act == "fork":
            live += eng.add_fork(list(range(3, 4 + r % 25)), [[5] * (k % 4) for k in range(1 + r % 4)],
                                 SamplingParams(temperature=0, max_tokens=1 + r % 6, ignore_eos=True))
        elif act == "abort" and live:
            eng.abort(live[r % len(live)].request_id)
        else:
            eng.step()
        refs = Counter(b for s in list(eng.scheduler.running) + list(eng.scheduler.waiting) for b in s.block_table)
        assert all(eng.block_manager.ref_counts[b] == refs[b] for b in range(eng.block_manager.num_blocks))
    while eng.has_unfinished():
        eng.step()
    for s in live:
        assert s.is_finished and s.block_table == []
        eng.release(s)
    assert llm.stats()["free_blocks"] == llm.stats()["total_blocks"]
