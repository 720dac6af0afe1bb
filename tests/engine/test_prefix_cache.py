"""Automatic prefix caching in the engine: a request whose prompt starts with full blocks computed before
(by a finished, running or preempted request) prefills only the rest, and answers exactly as with caching
off. float64, so any difference is a logic bug, not rounding."""
from __future__ import annotations

import torch

from sot_engine.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def make(tiny_dir, caching: bool, **kw) -> LLM:
    return LLM(str(tiny_dir), dtype=torch.float64, enable_prefix_caching=caching, **kw)


def record_logits(llm: LLM) -> dict[tuple[int, ...], torch.Tensor]:
    """Every logits row the runner produces, keyed by the tokens it conditions on (the same key in two
    engines whatever their request ids, batching or preemptions)."""
    rec: dict[tuple[int, ...], torch.Tensor] = {}
    run = llm.engine.runner.run

    def recording(seqs, is_prefill):
        logits = run(seqs, is_prefill)
        for s, row in zip(seqs, logits):
            rec[tuple(s.token_ids)] = row.clone()
        return logits

    llm.engine.runner.run = recording
    return rec


def assert_same_logits(on: dict, off: dict) -> None:
    assert on.keys() == off.keys()
    for k in on:
        torch.testing.assert_close(on[k], off[k], rtol=0, atol=1e-10)


def rand(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=g).tolist()


def test_a_finished_requests_prefix_is_served_from_the_cache(tiny_dir):
    on, off = make(tiny_dir, True, block_size=8, num_blocks=64), make(tiny_dir, False, block_size=8, num_blocks=64)
    rec_on, rec_off = record_logits(on), record_logits(off)
    g = torch.Generator().manual_seed(21)
    prefix = rand(g, 37)  # 4 full blocks + 5 tokens
    a, b = prefix + rand(g, 6), prefix + rand(g, 9)
    first = on.generate(a, GREEDY)[0]
    assert first.num_cached_tokens == 0
    st = on.stats()
    assert st["free_blocks"] == st["total_blocks"]  # finished and freed, yet ...
    assert st["cached_blocks"] == (len(a) + 10 - 1) // 8  # ... every full block with KV stays cached

    second = on.generate(b, GREEDY)[0]
    st2 = on.stats()
    assert second.num_cached_tokens == 32
    assert st2["prefill_tokens"] - st["prefill_tokens"] == len(b) - 32, "the cached prefix was prefilled again"
    assert st2["prefix_cache_hit_tokens"] - st["prefix_cache_hit_tokens"] == 32

    # blocks filled during decode are cached too: continuing the first request's output hits them
    cont = first.prompt_token_ids + first.token_ids + rand(g, 1)
    third = on.generate(cont, GREEDY)[0]
    assert third.num_cached_tokens == (len(a) + 10 - 1) // 8 * 8

    ref = off.generate([a, b, cont], GREEDY)
    assert [o.token_ids for o in (first, second, third)] == [r.token_ids for r in ref]
    assert [r.num_cached_tokens for r in ref] == [0, 0, 0] and off.stats()["cached_blocks"] == 0
    assert off.stats()["prefix_cache_hit_tokens"] == 0
    assert_same_logits(rec_on, rec_off)


def test_a_repeated_prompt_recomputes_its_last_block(tiny_dir):
    on, off = make(tiny_dir, True, block_size=8, num_blocks=64), make(tiny_dir, False, block_size=8, num_blocks=64)
    g = torch.Generator().manual_seed(22)
    exact, ragged = rand(g, 32), rand(g, 33)  # whole blocks; one token past them
    for prompt, cached in ((exact, 24), (ragged, 32)):
        first = on.generate(prompt, GREEDY)[0]
        before = on.stats()["prefill_tokens"]
        again = on.generate(prompt, GREEDY)[0]
        assert again.num_cached_tokens == cached and on.stats()["prefill_tokens"] - before == len(prompt) - cached
        assert again.token_ids == first.token_ids == off.generate(prompt, GREEDY)[0].token_ids


def test_requests_sharing_a_prefix_in_one_step_compute_it_once(tiny_dir):
    """Blocks are registered once their KV is computed, so of several requests that arrive together with
    one prefix (the API-style SoT points) the first prefills it and the others wait one step for it to
    become a cache hit -- while an unrelated request is admitted at once. A later request hits it too,
    also while the requests that computed it are still running."""
    on, off = make(tiny_dir, True, block_size=8, num_blocks=64), make(tiny_dir, False, block_size=8, num_blocks=64)
    rec_on, rec_off = record_logits(on), record_logits(off)
    eng = on.engine
    g = torch.Generator().manual_seed(23)
    prefix = rand(g, 32)
    x, y, u, z = prefix + rand(g, 5), prefix + rand(g, 7), rand(g, 20), prefix + rand(g, 3)
    sx, sy, su = (eng.add_request(p, GREEDY) for p in (x, y, u))
    eng.step()
    assert {s.seq_id for s in eng.scheduler.running} == {sx.seq_id, su.seq_id}  # y held back, u not
    assert eng.counters["prefill_tokens"] == len(x) + len(u) and eng.counters["prefix_cache_hit_tokens"] == 0
    assert on.stats()["cached_blocks"] == 4 + 2  # x's prefix, u's two full blocks
    eng.step()  # y's prefill, on x's prefix
    assert sy.prefix_cached_tokens == 32 and sy.block_table[:4] == sx.block_table[:4]
    assert eng.counters["prefill_tokens"] == len(x) + len(u) + len(y) - 32
    sz = eng.add_request(z, GREEDY)
    eng.step()  # z's prefill
    assert sz.prefix_cached_tokens == 32 and sz.block_table[:4] == sx.block_table[:4]
    assert all(eng.block_manager.ref_counts[b] == 3 for b in sx.block_table[:4])  # x, y (running) and z
    assert eng.counters["prefill_tokens"] == len(x) + len(u) + len(y) + len(z) - 64
    while eng.has_unfinished():
        eng.step()
    assert [s.prefix_cached_tokens for s in (sx, sy, su, sz)] == [0, 32, 0, 32]
    ref = off.generate([x, y, u, z], GREEDY)
    assert [s.output_ids for s in (sx, sy, su, sz)] == [r.token_ids for r in ref]
    assert_same_logits(rec_on, rec_off)
    for s in (sx, sy, su, sz):
        eng.release(s)
    assert on.stats()["free_blocks"] == on.stats()["total_blocks"]


def test_a_preempted_request_recomputes_from_its_own_cached_blocks(tiny_dir):
    # 2 requests of 20 + 20 tokens need 10 blocks each at the end; 15 blocks: the younger is preempted
    # while both decode; its registered blocks stay cached, so its recompute prefills only what was evicted
    kw = dict(block_size=4, num_blocks=15)
    on, off = make(tiny_dir, True, **kw), make(tiny_dir, False, **kw)
    roomy = make(tiny_dir, False, block_size=4, num_blocks=64)  # no preemption at all
    rec_on, rec_off = record_logits(on), record_logits(off)
    g = torch.Generator().manual_seed(24)
    prompts = [rand(g, 20), rand(g, 20)]
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = on.generate(prompts, p)
    assert [o.num_preemptions for o in outs] == [0, 1]
    assert [o.num_cached_tokens for o in outs] == [0, 0]  # what each prefilled at its first admission
    st = on.stats()
    assert st["prefix_cache_hit_tokens"] > 0, "the preempted request recomputed blocks that were still cached"
    ref = off.generate(prompts, p)
    assert [r.num_preemptions for r in ref] == [0, 1]  # the same schedule: the hits are exactly the work saved
    assert st["prefill_tokens"] + st["prefix_cache_hit_tokens"] == off.stats()["prefill_tokens"]
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref] == \
        [r.token_ids for r in roomy.generate(prompts, p)]
    assert_same_logits(rec_on, rec_off)
    assert st["free_blocks"] == st["total_blocks"]


def test_outputs_under_eviction_pressure_equal_caching_off(tiny_dir):
    """A tiny pool, waves of requests sharing prefixes of different lengths: blocks are cached, hit, evicted
    and preempted all the time; the answers stay those of caching off, and nothing leaks."""
    kw = dict(block_size=4, num_blocks=14, max_num_seqs=4)
    on, off = make(tiny_dir, True, **kw), make(tiny_dir, False, **kw)
    rec_on, rec_off = record_logits(on), record_logits(off)
    g = torch.Generator().manual_seed(25)
    roots = [rand(g, 24), rand(g, 16)]
    waves = [[roots[i % 2][:8 + 3 * i] + rand(g, 1 + i % 4) for i in range(k, k + n)]
             for k, n in ((0, 1), (1, 4), (5, 2), (7, 5))]
    params = [SamplingParams(temperature=0, max_tokens=4 + i % 7, ignore_eos=True) for i in range(5)]
    got, want = [], []
    for wave in waves:
        got += on.generate(wave, params[:len(wave)])
        want += off.generate(wave, params[:len(wave)])
    assert [o.token_ids for o in got] == [w.token_ids for w in want]
    assert_same_logits(rec_on, rec_off)
    st = on.stats()
    assert sum(o.num_preemptions for o in got) > 0 and st["prefix_cache_hit_tokens"] > 0
    assert sum(o.num_cached_tokens > 0 for o in got) >= 3
    assert st["prefill_tokens"] < off.stats()["prefill_tokens"]
    assert st["free_blocks"] == st["total_blocks"] and st["cached_blocks"] <= st["total_blocks"]


def test_abort_frees_and_keeps_the_computed_prefix_cached(tiny_dir):
    on, off = make(tiny_dir, True, block_size=8, num_blocks=32), make(tiny_dir, False, block_size=8, num_blocks=32)
    eng = on.engine
    g = torch.Generator().manual_seed(26)
    prefix = rand(g, 24)
    running = eng.add_request(prefix + rand(g, 4), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    eng.step()
    eng.step()
    waiting = eng.add_request(prefix + rand(g, 2), GREEDY)
    eng.abort(running.request_id)
    eng.abort(waiting.request_id)
    assert running.finish_reason == waiting.finish_reason == "abort" and not eng.has_unfinished()
    st = on.stats()
    assert st["free_blocks"] == st["total_blocks"] and st["cached_blocks"] == 3
    later = prefix + rand(g, 5)
    out = on.generate(later, GREEDY)[0]
    assert out.num_cached_tokens == 24 and out.token_ids == off.generate(later, GREEDY)[0].token_ids
    for s in (running, waiting):
        eng.release(s)
    assert on.stats()["free_blocks"] == on.stats()["total_blocks"]


def test_reset_prefix_cache(tiny_dir):
    llm = make(tiny_dir, True, block_size=8, num_blocks=64)
    g = torch.Generator().manual_seed(24)
    prompt = rand(g, 30)
    first = llm.generate(prompt, GREEDY)[0]
    assert llm.stats()["cached_blocks"] == (30 + 10 - 1) // 8
    eng = llm.engine
    seq = eng.add_request(prompt, GREEDY)
    eng.step()  # running, on cached blocks: nothing may be dropped
    assert seq.prefix_cached_tokens == 24 and not llm.reset_prefix_cache() and llm.stats()["cached_blocks"] == 4
    while eng.has_unfinished():
        eng.step()
    eng.release(seq)
    assert llm.reset_prefix_cache()
    st = llm.stats()
    assert st["cached_blocks"] == 0 and st["free_blocks"] == st["total_blocks"]
    again = llm.generate(prompt, GREEDY)[0]
    assert again.num_cached_tokens == 0 and again.token_ids == first.token_ids
    assert llm.stats()["cached_blocks"] == (30 + 10 - 1) // 8  # blocks register again after the reset
