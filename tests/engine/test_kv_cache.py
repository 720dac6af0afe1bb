"""Block accounting: release in the finishing step, no leaks, refcounts always consistent."""
from __future__ import annotations

from collections import Counter

import torch
from hypothesis import given, settings, strategies as st

from engine import LLM, SamplingParams
from engine.kv_cache import BlockManager, PoolExhausted
from engine.sequence import Sequence


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    held = Counter(b for s in live for b in s.block_table)
    for b in range(bm.num_blocks):
        assert bm.ref_counts[b] == held[b], f"block {b}: refcount {bm.ref_counts[b]}, held by {held[b]}"
    assert len(set(bm.free_ids)) == len(bm.free_ids), "a block is on the free list twice"
    assert set(bm.free_ids) == {b for b in range(bm.num_blocks) if held[b] == 0}


ops = st.lists(st.tuples(st.sampled_from(["admit", "grow", "fork", "finish"]),
                         st.integers(0, 10_000), st.integers(1, 70)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 4, 16]))
def test_block_manager_property(ops, num_blocks, block_size):
    bm = BlockManager(num_blocks, block_size)
    live: list[Sequence] = []
    params = SamplingParams()
    for op, pick, n in ops:
        if op == "admit":
            seq = Sequence(list(range(n)), params)
            if bm.can_allocate(seq):
                bm.allocate(seq)
                seq.num_cached_tokens = len(seq)
                live.append(seq)
            else:
                try:
                    bm.allocate(seq)
                    raise AssertionError("allocate succeeded although can_allocate said no")
                except PoolExhausted:
                    assert seq.block_table == []
        elif live and op == "grow":
            seq = live[pick % len(live)]
            seq.token_ids.append(0)
            if bm.can_append(seq):
                bm.append_slot(seq)
                seq.num_cached_tokens = len(seq)
            else:
                seq.token_ids.pop()
        elif live and op == "fork":
            parent = live[pick % len(live)]
            shared = pick % (parent.num_cached_tokens + 1)
            child = Sequence(parent.token_ids[:shared] + [1] * (n % 5), params)
            free_before = bm.num_free
            try:
                bm.fork(parent, child, shared)
            except PoolExhausted:
                assert bm.num_free == free_before == 0 and child.block_table == []
                continue
            assert child.block_table[:shared // block_size] == parent.block_table[:shared // block_size]
            check_invariants(bm, live + [child])
            if bm.can_allocate(child):  # admitted: blocks for its own suffix, as the scheduler does
                bm.allocate(child)
                child.num_cached_tokens = len(child)
                live.append(child)
            else:  # not admitted: it gives its references back
                bm.free(child)
        elif live and op == "finish":
            bm.free(live.pop(pick % len(live)))
        check_invariants(bm, live)
    for seq in live:
        bm.free(seq)
    assert bm.num_free == num_blocks


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
