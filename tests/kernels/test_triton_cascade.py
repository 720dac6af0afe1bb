"""Triton cascade (shared-prefix) decode attention == the torch cascade == plain paged decode (float64 oracles).

Fork-shaped block tables (`forked_pool`): groups whose members share leading full blocks, mixed with rows in
no group. Pool slots outside every row's context are NaN in the kernel's copy, so reading one shows up.
On CPU the kernels run in Triton's interpreter: few rows, few programs.
"""
from __future__ import annotations

import math

import pytest
import torch

from sot_engine.kernels import reference as ref
from sot_engine.kernels.cascade import attention_lse, cascade_decode_attention as torch_cascade, find_groups
from sot_engine.kernels.triton import cascade, decode
from tests.kernels.test_cascade import forked_pool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 kernels vs float64 oracles


def poison(cache: torch.Tensor, tables: list[list[int]], lens: list[int]) -> torch.Tensor:
    bs = cache.shape[1]
    live = torch.zeros(cache.shape[:2], dtype=torch.bool)
    for t, n in zip(tables, lens):
        for i in range(n):
            live[t[i // bs], i % bs] = True
    bad = cache.clone()
    bad[~live] = math.nan
    return bad


def setup(heads, kvh, d, bs, spec, solo, seed):
    g = torch.Generator().manual_seed(seed)
    kc, vc, bt, tables, lens, expect = forked_pool(spec, solo, kvh=kvh, d=d, bs=bs, g=g)
    q = 2 * torch.randn(len(lens), heads, d, generator=g, dtype=torch.float64)
    groups = find_groups(tables, lens, bs)
    assert len(groups) == len(expect)
    want = ref.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens), d ** -0.5)
    torch.testing.assert_close(torch_cascade(q, kc, vc, bt, torch.tensor(lens), d ** -0.5, groups), want,
                               rtol=1e-12, atol=1e-12)
    dev = dict(dtype=torch.float32, device=DEVICE)
    args = (q.to(**dev), poison(kc, tables, lens).to(**dev), poison(vc, tables, lens).to(**dev), bt.to(DEVICE),
            torch.tensor(lens, device=DEVICE), d ** -0.5, groups, max(lens))
    return args, want


# (heads, kv_heads, head_dim, block_size, suffix partition, prefix partition): GQA 1/3/4, d 64/128, pages 16/32;
# None = one partition (the CPU default), numbers force split-K in either pass and its merge
CASES = {
    "mha-d64-bs16": (4, 4, 64, 16, None, None),
    "gqa3-d64-bs32-split-both": (6, 2, 64, 32, 40, 48),
    "gqa4-d64-bs16-split-prefix": (8, 2, 64, 16, None, 32),
    "gqa4-d128-bs32-split-suffix": (8, 2, 128, 32, 32, None),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_torch_cascade_and_plain_decode(case):
    heads, kvh, d, bs, psize, pre_psize = case
    # two groups (3 and 2 members, prefixes of 3 and 2 blocks) and two rows in no group
    spec = [(3, [3 * bs + 1, 3 * bs + 7, 4 * bs + 2]), (2, [2 * bs + 1, 3 * bs])]
    args, want = setup(heads, kvh, d, bs, spec, solo=[1, bs + 3], seed=heads + 10 * kvh + d + bs)
    out = cascade.cascade_decode_attention(*args, partition_size=psize, prefix_partition_size=pre_psize)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), want, **TOL)


def test_member_chunks_and_no_groups(monkeypatch):
    # 16 rows per prefix program: 4 members of a GQA-4 group each, so 6 members take two chunks
    monkeypatch.setattr(cascade, "MAX_ROWS", 16)
    bs = 16
    spec = [(2, [2 * bs + 1 + i for i in range(6)])]
    args, want = setup(8, 2, 64, bs, spec, solo=[5], seed=3)
    torch.testing.assert_close(cascade.cascade_decode_attention(*args).cpu().double(), want, **TOL)
    # no groups at all: a plain paged decode
    no_groups = args[:6] + ([],) + args[7:]
    torch.testing.assert_close(cascade.cascade_decode_attention(*no_groups).cpu().double(), want, **TOL)


def test_plan_is_built_once_per_step():
    bs = 16
    args, want = setup(4, 2, 64, bs, [(2, [2 * bs + 1, 2 * bs + 4])], solo=[], seed=4)
    first = cascade.cascade_decode_attention(*args)
    plan = cascade._last_plan[3]
    second = cascade.cascade_decode_attention(*args)  # the next layer of the same step
    assert cascade._last_plan[3] is plan
    assert plan.suffix_lens.tolist() == [1, 4] and plan.members.tolist() == [0, 1]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first.cpu().double(), want, **TOL)


@pytest.mark.parametrize("psize", [None, 24], ids=["one-partition", "split"])
def test_decode_returns_lse(psize):
    g = torch.Generator().manual_seed(9)
    bs, kvh, heads, d = 16, 2, 4, 64
    lens = [40, 7]
    kc = torch.randn(8, bs, kvh, d, generator=g, dtype=torch.float64)
    vc = torch.randn(8, bs, kvh, d, generator=g, dtype=torch.float64)
    bt = torch.tensor([[3, 1, 6], [5, 0, 0]])
    q = torch.randn(2, heads, d, generator=g, dtype=torch.float64)
    out, lse = decode.paged_decode_attention(q.float().to(DEVICE), kc.float().to(DEVICE), vc.float().to(DEVICE),
                                             bt.to(DEVICE), torch.tensor(lens, device=DEVICE), 0.2,
                                             partition_size=psize, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, heads)
    for r, n in enumerate(lens):
        k = kc[bt[r]].flatten(0, 1)[:n]
        v = vc[bt[r]].flatten(0, 1)[:n]
        o, l = attention_lse(q[r:r + 1], k, v, 0.2)
        torch.testing.assert_close(out[r:r + 1].cpu().double(), o, **TOL)
        torch.testing.assert_close(lse[r:r + 1].cpu().double(), l, **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("bfloat16 math is broken in Triton's CPU interpreter")
    bs = 16
    args, want = setup(8, 2, 128, bs, [(3, [3 * bs + 2, 4 * bs + 1, 3 * bs + 9])], solo=[7], seed=8)
    half = (args[0].to(dtype), args[1].to(dtype), args[2].to(dtype)) + args[3:]
    out = cascade.cascade_decode_attention(*half, partition_size=32, prefix_partition_size=16)
    assert out.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out.cpu().double(), want, rtol=tol, atol=tol)
