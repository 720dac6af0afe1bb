"""Sliding-window attention (a query at position p sees keys p - window + 1 .. p) in every attention path.

The torch reference is checked against the definition written out here in float64 (a dense softmax per query);
every fast kernel is then checked against the reference on pools where each key outside every window is NaN as
well as everything outside the contexts, so a kernel that reads a key it should skip shows NaN. Windows of 1 (a
query sees only itself), shorter than a page, across pages and partitions, and longer than the context (no effect).
"""
from __future__ import annotations

import math

import pytest
import torch

from sot_engine.kernels import reference as ref
from tests.kernels.test_triton_decode import paged_inputs
from tests.kernels.test_triton_prefill import make_batch

try:
    from sot_engine.kernels import _cpp
except ImportError:  # the C++ extension is optional
    _cpp = None
needs_cpp = pytest.mark.skipif(_cpp is None, reason="the C++ extension is not built")


def definition(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[int], window: int,
               scale: float) -> torch.Tensor:
    """Attention of queries q [N, H, D] at `positions` over one sequence's dense k, v [L, KVH, D], in float64."""
    heads, kvh = q.shape[1], k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, p in enumerate(positions):
        lo = max(0, p - window + 1) if window else 0
        for h in range(heads):
            kk, vv = k[lo:p + 1, h // (heads // kvh)].double(), v[lo:p + 1, h // (heads // kvh)].double()
            w = torch.softmax(kk @ q[i, h].double() * scale, dim=0)
            out[i, h] = w @ vv
    return out


def poison_outside_windows(k_bad: torch.Tensor, v_bad: torch.Tensor, table: torch.Tensor, first_seen: list[int]):
    """NaN into each sequence's keys before `first_seen[s]`, the first key any of its queries sees."""
    bs = k_bad.shape[1]
    for s, lo in enumerate(first_seen):
        for t in range(lo):
            k_bad[table[s, t // bs], t % bs] = math.nan
            v_bad[table[s, t // bs], t % bs] = math.nan


WINDOWS = [1, 3, 16, 37, 1000]


@pytest.mark.parametrize("window", WINDOWS)
def test_reference_decode_and_prefill_follow_the_definition(window):
    lens, heads, kvh, d, bs = [1, 9, 40, 70], 6, 2, 16, 8
    q, k, v, _, _, table, oracle = paged_inputs(lens, heads, kvh, d, bs, seed=window, dtype=torch.float64)
    got = ref.paged_decode_attention(q, k, v, oracle, torch.tensor(lens), 0.3, window=window)
    for s, n in enumerate(lens):
        kd, vd = ref.gather_kv(k, oracle[s], n), ref.gather_kv(v, oracle[s], n)
        torch.testing.assert_close(got[s:s + 1], definition(q[s:s + 1], kd, vd, [n - 1], window, 0.3))
    news = [1, 5, 33, 20]  # prefill: the last `new` tokens of each context are queries
    qp = torch.randn(sum(news), heads, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, *torch.tensor(news).cumsum(0).tolist()])
    got = ref.paged_prefill_attention(qp, k, v, oracle, cu, torch.tensor(lens), 0.3, window=window)
    for s, (n, new) in enumerate(zip(lens, news)):
        kd, vd = ref.gather_kv(k, oracle[s], n), ref.gather_kv(v, oracle[s], n)
        torch.testing.assert_close(got[cu[s]:cu[s + 1]],
                                   definition(qp[cu[s]:cu[s + 1]], kd, vd, list(range(n - new, n)), window, 0.3))


# (heads, kv heads, head_dim, block size, lens, partition size) x windows
DECODE = {"gqa3-bs16-split40": (6, 2, 64, 16, [1, 17, 70, 33, 130], 40),
          "gqa8-bs32-one-partition": (8, 1, 64, 32, [190, 1, 129], None),
          "mha-bs16-split16": (2, 2, 32, 16, [97, 48, 49], 16)}


@pytest.mark.parametrize("window", [1, 5, 16, 37, 500])
@pytest.mark.parametrize("case", list(DECODE), ids=list(DECODE))
def test_triton_decode_reads_only_the_window(case, window):
    from tests.kernels.test_triton_decode import DEVICE, decode
    heads, kvh, d, bs, lens, psize = DECODE[case]
    q, k, v, k_bad, v_bad, table, oracle = paged_inputs(lens, heads, kvh, d, bs, seed=window + d)
    poison_outside_windows(k_bad, v_bad, table, [max(0, n - window) for n in lens])
    want = ref.paged_decode_attention(q.double(), k.double(), v.double(), oracle, torch.tensor(lens), 0.2,
                                      window=window)
    out = torch.full(q.shape, math.nan, device=DEVICE)
    got = decode.paged_decode_attention(q.to(DEVICE), k_bad.to(DEVICE), v_bad.to(DEVICE), table.to(DEVICE),
                                        torch.tensor(lens, device=DEVICE), 0.2, max(lens), partition_size=psize,
                                        out=out, window=window).cpu()
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [1, 7, 16, 40, 500])
@pytest.mark.parametrize("blocks", [dict(block_m=16, block_n=16), {}], ids=["small-tiles", "default-tiles"])
def test_triton_prefill_reads_only_the_windows(window, blocks):
    from sot_engine.kernels.triton.prefill import paged_prefill_attention
    prefixes, news, heads, kvh, d, bs = [0, 37, 20, 100, 3], [70, 5, 0, 1, 40], 8, 2, 64, 16
    q, kc, vc, tables, cu, ctx = make_batch(prefixes, news, heads, kvh, d, bs, torch.float32, seed=window)
    k_bad, v_bad = kc.clone(), vc.clone()
    poison_outside_windows(k_bad, v_bad, tables, [max(0, p - window + 1) for p in prefixes])
    want = ref.paged_prefill_attention(q.double(), kc.double(), vc.double(), tables, cu, ctx, 0.125, window=window)
    got = paged_prefill_attention(q, k_bad, v_bad, tables, cu, ctx, 0.125, window=window, **blocks)
    assert not got.isnan().any(), "a key outside every window (or past a context) was read"
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@needs_cpp
@pytest.mark.parametrize("window", [1, 6, 16, 50, 1000])
@pytest.mark.parametrize("pool", [torch.float32, torch.bfloat16])
def test_cpp_decode_reads_only_the_window(window, pool):
    from sot_engine.kernels import cpp
    lens, heads, kvh, d, bs = [1, 5, 16, 17, 47, 211], 9, 3, 64, 16
    q, k, v, k_bad, v_bad, table, oracle = paged_inputs(lens, heads, kvh, d, bs, seed=window)
    k, v, k_bad, v_bad = (t.to(pool) for t in (k, v, k_bad, v_bad))
    poison_outside_windows(k_bad, v_bad, table, [max(0, n - window) for n in lens])
    want = ref.paged_decode_attention(q.double(), k.double(), v.double(), oracle, torch.tensor(lens), 0.2,
                                      window=window)
    got = cpp.paged_decode_attention(q, k_bad, v_bad, oracle, torch.tensor(lens), 0.2, window=window)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-6)
    # the fused RoPE + store + attention: the new token's K/V land in its slot, then the window's keys are read
    g = torch.Generator().manual_seed(window)
    qkv = torch.randn(len(lens), (heads + 2 * kvh) * d, generator=g)
    ang = torch.rand(len(lens), d // 2, generator=g) * 30
    last = torch.tensor(lens) - 1
    slots = oracle.gather(1, (last // bs)[:, None])[:, 0] * bs + last % bs
    kr, vr = k.double(), v.double()
    want = ref.rope_store_decode_attention(qkv.double(), ang.cos().double(), ang.sin().double(), kr, vr, slots,
                                           oracle, torch.tensor(lens), 0.2, window=window)
    got = cpp.rope_store_decode_attention(qkv, ang.cos(), ang.sin(), k_bad, v_bad, slots, oracle,
                                          torch.tensor(lens), 0.2, window=window)
    assert not got.isnan().any()
    if pool == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-6)
    else:  # K rotated in float32 vs float64 may round to neighbouring bf16 values: compare over what C++ stored
        qr = ref.apply_rope(qkv.double().view(len(lens), -1, d)[:, :heads], ang.cos().double(), ang.sin().double())
        k_new = k.clone()
        k_new.view(-1, kvh, d)[slots] = k_bad.view(-1, kvh, d)[slots]
        v_new = v.clone()
        v_new.view(-1, kvh, d)[slots] = v_bad.view(-1, kvh, d)[slots]
        want = ref.paged_decode_attention(qr, k_new.double(), v_new.double(), oracle, torch.tensor(lens), 0.2,
                                          window=window).reshape(len(lens), -1)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-6)


@needs_cpp
def test_cpp_decode_layers_take_a_window_per_layer():
    """The fused C++ decode loop with windows 5, none and 2 on its three layers equals the model's layer loop on the
    torch reference kernels (ragged contexts shorter and longer than the windows, the new K/V stored alike)."""
    from dataclasses import replace
    from sot_engine.kernels import get_backend
    from tests.kernels.test_cpp_cpu import decode_step_inputs, random_model
    heads, kvh, d = 6, 2, 16
    model = random_model(heads, kvh, d, None, seed=8)
    model.windows = [5, 0, 2]
    kv, meta, ids, pos = decode_step_inputs([1, 3, 9, 40], kvh, d, seed=9)
    kv_ref = [(k.clone(), v.clone()) for k, v in kv]
    assert model._decode_layers(kv) is not None
    got = model.forward(ids, pos, meta, kv)
    model.backend = replace(get_backend("torch", "cpu"))
    want = model.forward(ids, pos, meta, kv_ref)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    model.windows = [0, 0, 0]  # and the windows made a difference
    assert (model.forward(ids, pos, meta, [(k.clone(), v.clone()) for k, v in kv]) - want).abs().max() > 1e-3


from tests.kernels.test_cuda_decode import impl  # noqa: E402,F401 (the fixture: the GPU extension, or its emulation)


@pytest.mark.parametrize("window", [1, 5, 16, 37, 500])
def test_cuda_decode_reads_only_the_window(impl, window):  # noqa: F811
    heads, kvh, d, bs, lens = 6, 2, 64, 16, [1, 17, 70, 33, 130]
    q, k, v, k_bad, v_bad, table, oracle = paged_inputs(lens, heads, kvh, d, bs, seed=window)
    poison_outside_windows(k_bad, v_bad, table, [max(0, n - window) for n in lens])
    want = ref.paged_decode_attention(q.double(), k.double(), v.double(), oracle, torch.tensor(lens), 0.2,
                                      window=window)
    dev = impl.device
    for psize in (0, 16):  # one partition over the window, and a split of it (the reduce over the window's parts)
        out = torch.full(q.shape, math.nan, device=dev)
        got, _ = impl.paged_decode_attention(q.to(dev), k_bad.to(dev), v_bad.to(dev), table.to(dev),
                                             torch.tensor(lens, device=dev), 0.2, max(lens), psize, out, False, window)
        assert not got.isnan().any()
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-5)
