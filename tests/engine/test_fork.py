"""Prefix fork: N children of one prefill == N full prompts; the prefix is stored once."""
from __future__ import annotations

import pytest
import torch

from sot_engine.engine import LLM, SamplingParams


def test_fork_children_equal_full_prompts_and_share_blocks(tiny_dir):
    llm = LLM(str(tiny_dir), dtype=torch.float64, block_size=8, num_blocks=64)
    eng = llm.engine
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(0, 512, (37,), generator=g).tolist()  # 4 full blocks + 5 tokens
    suffixes = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (6, 1, 19, 0)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 4, 15, 7)]
    expected = llm.generate([prefix + s for s in suffixes], params)

    children = eng.add_fork(prefix, suffixes, params)
    eng.step()  # prefills the prefix once and forks
    n = len(children)
    shared = children[0].block_table[:4]
    assert all(c.block_table[:4] == shared for c in children)
    assert all(eng.block_manager.ref_counts[b] == n for b in shared), "prefix blocks not shared N times"
    tails = [c.block_table[4] for c in children]
    assert len(set(tails) | set(shared)) == n + 4, "partial block must be copied per child"
    assert [c.num_cached_tokens for c in children] == [37, 37, 37, 36]  # empty suffix recomputes 1 token
    while eng.has_unfinished():
        eng.step()
    for c, e in zip(children, expected):
        assert c.token_ids == e.prompt_token_ids + e.token_ids
        assert c.prefix_cached_tokens > 0
        eng.release(c)
    assert llm.stats()["free_blocks"] == llm.stats()["total_blocks"]


def test_fork_api_and_exhausted_pool_fallback(tiny_dir):
    # 6 blocks of 4: the prefix takes 3 (2 full + partial); copies for 3 children cannot all fit,
    # so some children recompute their prefix: still the same tokens, nothing leaked
    llm = LLM(str(tiny_dir), dtype=torch.float64, block_size=4, num_blocks=6)
    prefix = list(range(10, 20))
    suffixes = [[1, 2], [3], [4, 5, 6]]
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = llm.fork(prefix, suffixes, p)
    ref = llm.generate([prefix + s for s in suffixes], p)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    assert llm.stats()["free_blocks"] == 6


def test_aborting_every_child_drops_the_unrun_parent(tiny_dir):
    llm = LLM(str(tiny_dir), block_size=4, num_blocks=16)
    eng = llm.engine
    kids = eng.add_fork(list(range(1, 12)), [[3], [4]], SamplingParams(temperature=0, max_tokens=3))
    assert llm.stats()["waiting"] == 1  # the parent
    for k in kids:
        eng.abort(k.request_id)
    assert [k.finish_reason for k in kids] == ["abort", "abort"]
    assert llm.stats()["waiting"] == 0 and not eng.has_unfinished()
    assert llm.stats()["free_blocks"] == 16


def test_fork_from_a_kept_request_reuses_its_kv(tiny_dir):
    """Continue a finished request (prompt + output) with suffixes: same tokens as full prompts, the kept
    request's full blocks shared, nothing leaked after release."""
    llm = LLM(str(tiny_dir), dtype=torch.float64, block_size=8, num_blocks=64)
    g = torch.Generator().manual_seed(12)
    prompt = torch.randint(0, 512, (21,), generator=g).tolist()
    first = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), keep_kv=True)[0]
    assert llm.stats()["kept"] == 1
    kept_blocks = llm.stats()["total_blocks"] - llm.stats()["free_blocks"]
    assert kept_blocks == 4  # 32 tokens with KV (the last sampled token has none yet)
    full = first.prompt_token_ids + first.token_ids
    suffixes = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 7, 1)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (5, 9, 3)]
    for plen in (None, 27):  # the whole kept request, and only its first 27 tokens
        base = full if plen is None else full[:plen]
        expected = llm.generate([base + s for s in suffixes], params)
        kids = llm.engine.add_fork(llm.engine.requests[first.request_id], suffixes, params, prefix_len=plen)
        assert [k.prefix_cached_tokens for k in kids] == [min(len(base), 32)] * 3
        shared = kids[0].block_table[:len(base) // 8]
        assert all(k.block_table[:len(shared)] == shared for k in kids)
        assert all(llm.engine.block_manager.ref_counts[b] == 4 for b in shared)  # kept + 3 children
        while llm.engine.has_unfinished():
            llm.engine.step()
        assert [k.token_ids for k in kids] == [e.prompt_token_ids + e.token_ids for e in expected]
        for k in kids:
            llm.engine.release(k)
    out = llm.fork(first, [[5]], SamplingParams(temperature=0, max_tokens=2))  # the LLM-level API
    assert out[0].num_cached_tokens == 32
    llm.release(first)
    assert llm.stats()["free_blocks"] == llm.stats()["total_blocks"] and llm.stats()["kept"] == 0
    with pytest.raises(ValueError, match="released"):
        llm.fork(first, [[5]])


def test_fork_from_a_request_rejects_bad_use(tiny_dir):
    llm = LLM(str(tiny_dir), block_size=4, num_blocks=32)
    eng = llm.engine
    running = eng.add_request([1, 2, 3], SamplingParams(max_tokens=4), keep_kv=True)
    with pytest.raises(ValueError, match="not finished"):
        eng.add_fork(running, [[4]])
    while eng.has_unfinished():
        eng.step()
    for bad in (0, 99, True):
        with pytest.raises(ValueError, match="prefix_len"):
            eng.add_fork(running, [[4]], prefix_len=bad)
    with pytest.raises(ValueError, match="prefix_len"):
        eng.add_fork([1, 2, 3], [[4]], prefix_len=2)
    eng.release(running)
    assert llm.stats()["free_blocks"] == 32
