"""Chunked prefill: prompts cut into chunks within a small token budget, mixed with running decodes, give the
logits and tokens of unchunked runs (float64: any difference is a logic bug), with requests arriving mid-run,
prefix-cache hits, forks and preemption."""
from __future__ import annotations

import pytest
import torch

from sot_engine.engine import LLM, SamplingParams

BUDGET = 16


def engine(tiny_dir, chunked: bool, num_blocks: int = 256, block_size: int = 8) -> LLM:
    return LLM(str(tiny_dir), dtype=torch.float64, block_size=block_size, num_blocks=num_blocks, max_num_seqs=6,
               enable_chunked_prefill=chunked, max_num_batched_tokens=BUDGET if chunked else 4096)


def recorded(max_tokens: int, log: list) -> SamplingParams:
    """Greedy, and every row of logits it is sampled from appended to `log` (processors see the model's logits)."""
    def rec(_ids, row):
        log.append(row.clone())
        return row
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logits_processors=[rec])


def run(llm: LLM, arrivals: dict[int, list[tuple[list[int], int]]], steps_log: list | None = None):
    """Add the requests of `arrivals[step]` before that step; run to the end. Returns [(tokens, logits,
    preemptions, prompt tokens served from the cache)]."""
    eng, out, step = llm.engine, [], 0
    if steps_log is not None:
        inner = eng.runner.run

        def spy(seqs, is_prefill):
            steps_log.append([(s.num_scheduled, s.num_pending, s.num_output_tokens) for s in seqs])
            return inner(seqs, is_prefill)
        eng.runner.run = spy
    while step <= max(arrivals) or eng.has_unfinished():
        for prompt, m in arrivals.get(step, []):
            log: list = []
            out.append((eng.add_request(prompt, recorded(m, log)), log))
        eng.step()
        step += 1
    for seq, _ in out:
        eng.release(seq)
    st = llm.stats()
    assert st["free_blocks"] == st["total_blocks"] and st["running"] == st["waiting"] == 0
    return [(seq.output_ids, torch.stack(log), seq.num_preemptions, seq.prefix_cached_tokens) for seq, log in out]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for i, ((ta, la, *_), (tb, lb, *_)) in enumerate(zip(a, b)):
        assert ta == tb, f"request {i}: tokens differ"
        assert torch.allclose(la, lb, rtol=0, atol=1e-10), f"request {i}: logits differ by {(la - lb).abs().max()}"


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


def test_chunks_beside_running_decodes_equal_unchunked(tiny_dir):
    p = prompts(5, [5, 40, 3, 150, 71, 9])
    arrivals = {0: [(p[0], 20), (p[1], 12), (p[2], 30)], 3: [(p[3], 10)], 5: [(p[4], 8)], 6: [(p[5], 6)]}
    steps: list = []
    chunked = run(engine(tiny_dir, True), arrivals, steps)
    assert_same(chunked, run(engine(tiny_dir, False), arrivals))
    assert all(sum(n for n, _, _ in s) <= BUDGET for s in steps), "a step went over the token budget"
    # the 150-token prompt took ~10 steps of chunks, each beside the decodes of the running requests
    mixed = [s for s in steps if any(n > 1 for n, _, _ in s) and any(n == 1 and o > 0 for n, _, o in s)]
    assert len(mixed) >= 8
    assert any(n < pending for s in steps for n, pending, _ in s if n > 1), "no prompt was cut into chunks"


def test_prefix_cache_and_a_prompt_waiting_for_the_chunks_it_shares(tiny_dir):
    """A request whose prefix another request is still prefilling waits for those blocks and takes them from the
    cache rather than computing them twice: the 42-token prompt runs in chunks of 16, 16 and 10 tokens; the last
    one completes the 5th shared block while 6 tokens of budget are left, and the request that arrives then
    (sharing all 40) waits one step for it instead of computing it beside."""
    shared, (a, b, c) = prompts(8, [40])[0], prompts(9, [2, 12, 20])
    arrivals = {0: [(shared + a, 6)], 2: [(shared + b, 9)], 3: [(a, 5)], 9: [(shared + c, 4)]}
    chunked = run(engine(tiny_dir, True), arrivals)
    assert_same(chunked, run(engine(tiny_dir, False), arrivals))
    assert [r[3] for r in chunked] == [0, 40, 0, 40]


def test_fork_under_chunks_equals_full_prompts(tiny_dir):
    llm = engine(tiny_dir, True)
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(0, 512, (45,), generator=g).tolist()  # longer than the budget: prefilled in chunks
    suffixes = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (6, 1, 30, 0)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 4, 15, 7)]
    expected = engine(tiny_dir, False).generate([prefix + s for s in suffixes], params)
    got = llm.fork(prefix, suffixes, params)
    assert [o.token_ids for o in got] == [e.token_ids for e in expected]
    assert all(o.num_cached_tokens >= 40 for o in got)  # the chunked prefix was shared, not recomputed
    assert llm.stats()["free_blocks"] == llm.stats()["total_blocks"]


def test_preemption_mid_chunks_recomputes_to_the_same_tokens(tiny_dir):
    """16 blocks of 4 tokens: the decodes run the pool dry, the youngest (possibly part-way through its prompt) is
    preempted and recomputed later; every request still gets the unchunked tokens and logits."""
    p = prompts(13, [10, 23, 6, 30])
    arrivals = {0: [(p[0], 14), (p[1], 10)], 2: [(p[2], 20)], 3: [(p[3], 8)]}
    llm = engine(tiny_dir, True, num_blocks=24, block_size=4)
    chunked = run(llm, arrivals)
    assert sum(r[2] for r in chunked) > 0
    assert_same(chunked, run(engine(tiny_dir, False, num_blocks=24, block_size=4), arrivals))


def test_embeddings_are_never_split(tiny_dir):
    """An embedding averages all its hidden states: it is prefilled whole even past the budget."""
    llm = engine(tiny_dir, True)
    g = torch.Generator().manual_seed(2)
    long = torch.randint(0, 512, (50,), generator=g).tolist()
    want = engine(tiny_dir, False).embed([long, long[:7]])
    assert torch.allclose(llm.embed([long, long[:7]]), want, rtol=0, atol=1e-10)


def test_budget_must_leave_room_for_prompts(tiny_dir):
    with pytest.raises(ValueError, match="must exceed max_num_seqs"):
        LLM(str(tiny_dir), max_num_seqs=8, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be a positive integer"):
        LLM(str(tiny_dir), max_num_batched_tokens=0)
