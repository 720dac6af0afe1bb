"""Sampling: exact distributions, seeds independent of batch company, streaming == generate."""
from __future__ import annotations

import torch

from sot_engine.engine import LLM, SamplingParams
from sot_engine.engine.sampler import sample_row


def empirical(logits: torch.Tensor, p: SamplingParams, n: int = 20000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(logits, dtype=torch.float64)
    for _ in range(n):
        counts[sample_row(logits, p, g)] += 1
    return counts / n


def test_temperature_top_k_top_p_distributions():
    logits = torch.tensor([2.0, 1.5, 0.3, -0.5, -1.0])
    exact = torch.softmax(logits.double() / 0.7, -1)
    assert (empirical(logits, SamplingParams(temperature=0.7)) - exact).abs().max() < 0.015
    topk = exact.clone()
    topk[2:] = 0
    assert (empirical(logits, SamplingParams(temperature=0.7, top_k=2)) - topk / topk.sum()).abs().max() < 0.015
    # top_p: smallest head whose mass reaches p (here the first three tokens)
    p = float(exact[:2].sum() + exact[2] / 2)
    topp = exact.clone()
    topp[3:] = 0
    assert (empirical(logits, SamplingParams(temperature=0.7, top_p=p)) - topp / topp.sum()).abs().max() < 0.015


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_dir):
    llm = LLM(str(tiny_dir), dtype=torch.float64, num_blocks=64)
    p = [7, 8, 9, 10]
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=12, ignore_eos=True)
    alone = llm.generate([p], sp)[0].token_ids
    crowd = llm.generate([[1, 2], p, [3, 4, 5]], [SamplingParams(temperature=1.0, max_tokens=12), sp,
                                                 SamplingParams(temperature=0, max_tokens=5)])
    assert crowd[1].token_ids == alone
    other = llm.generate([p], SamplingParams(temperature=1.0, top_p=0.9, seed=124, max_tokens=12, ignore_eos=True))
    assert other[0].token_ids != alone
    greedy = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].token_ids
    top1 = llm.generate([p], SamplingParams(temperature=0.8, top_k=1, max_tokens=12, ignore_eos=True))[0].token_ids
    assert top1 == greedy


def test_stream_deltas_add_up_and_abandoning_frees_blocks(tiny_dir):
    llm = LLM(str(tiny_dir), num_blocks=64)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (6, 9)]
    full = llm.generate(prompts, params)
    got = {0: [], 1: []}
    finals = {}
    for d in llm.stream(prompts, params):
        got[d.index] += d.token_ids
        if d.finished:
            finals[d.index] = d.output
    assert [got[0], got[1]] == [o.token_ids for o in full]
    assert finals[1].token_ids == full[1].token_ids and finals[1].finish_reason == "length"
    for i, _ in enumerate(llm.stream(prompts, params)):
        if i == 3:
            break
    assert llm.stats()["free_blocks"] == 64 and llm.stats()["running"] == 0


def test_argmax_rows_is_torch_argmax_ties_and_nan_included():
    from sot_engine.engine.sampler import argmax_rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1000, generator=g)
    x[1, [7, 300]] = 50.0  # a tie: the first index wins
    x[2, 400] = float("nan")  # NaN counts as the maximum, as in torch
    x[3] = -1e30
    assert argmax_rows(x) == x.argmax(dim=-1).tolist() == [int(x[0].argmax()), 7, 400, 0, int(x[4].argmax())]
    assert argmax_rows(x[[4, 0]]) == [int(x[4].argmax()), int(x[0].argmax())]
    assert argmax_rows(x.double()) == x.argmax(dim=-1).tolist()  # other dtypes: torch's argmax


def test_extreme_temperature_and_top_p_sample_the_top_token():
    """A temperature or top_p so small it underflows (1e-320 reads as 0 in float32) is the greedy limit: the argmax,
    never a nan distribution that fails the step for the whole batch."""
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = torch.randn(97, generator=g) * 10
        top = int(logits.argmax())
        for p in (SamplingParams(temperature=1e-320), SamplingParams(temperature=1e-300),
                  SamplingParams(temperature=1e-40), SamplingParams(top_p=1e-320),
                  SamplingParams(top_p=1e-320, top_k=1, temperature=1e-320)):
            assert sample_row(logits, p, g) == top, p
