"""The torch reference kernels against textbook float64 math on fresh random inputs."""
from __future__ import annotations

import math

import pytest
import torch

from sot_engine.kernels import reference as ref


def dense_attention(q, k, v, causal_offset: int, scale: float) -> torch.Tensor:
    """Textbook softmax(q k^T) v for one sequence, GQA by head index, in float64."""
    tq, h, d = q.shape
    g = h // k.shape[1]
    out = torch.empty(tq, h, d, dtype=torch.float64)
    for head in range(h):
        s = q[:, head].double() @ k[:, head // g].double().T * scale
        for i in range(tq):
            s[i, causal_offset + i + 1:] = -math.inf
        out[:, head] = torch.softmax(s, -1) @ v[:, head // g].double()
    return out


def paged_setup(lens, kvh, d, bs, num_blocks, g):
    """Scatter per-sequence K/V into a pool through shuffled block tables."""
    k_cache = torch.randn(num_blocks, bs, kvh, d, generator=g, dtype=torch.float64)
    v_cache = torch.randn(num_blocks, bs, kvh, d, generator=g, dtype=torch.float64)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // bs) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int64)
    for s, n in enumerate(lens):
        blocks = [perm.pop() for _ in range(-(-n // bs))]
        tables[s, :len(blocks)] = torch.tensor(blocks)
    return k_cache, v_cache, tables


@pytest.mark.parametrize("heads, kvh", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("bs", [4, 16])
def test_paged_decode_matches_dense(heads, kvh, bs):
    g = torch.Generator().manual_seed(heads * 100 + bs)
    lens, d = [1, 7, 33, 64, 5], 16
    k_cache, v_cache, tables = paged_setup(lens, kvh, d, bs, 64, g)
    q = torch.randn(len(lens), heads, d, generator=g, dtype=torch.float64)
    out = ref.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens), 0.3)
    for s, n in enumerate(lens):
        k = ref.gather_kv(k_cache, tables[s], n)
        v = ref.gather_kv(v_cache, tables[s], n)
        torch.testing.assert_close(out[s], dense_attention(q[s:s + 1], k, v, n - 1, 0.3)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heads, kvh", [(4, 2), (3, 3)])
def test_paged_prefill_with_cached_context_matches_dense(heads, kvh):
    g = torch.Generator().manual_seed(5)
    ctx_lens, new_lens, d, bs = [10, 3, 40], [4, 3, 1], 8, 8
    k_cache, v_cache, tables = paged_setup(ctx_lens, kvh, d, bs, 32, g)
    q = torch.randn(sum(new_lens), heads, d, generator=g, dtype=torch.float64)
    cu = torch.tensor([0] + torch.tensor(new_lens).cumsum(0).tolist(), dtype=torch.int32)
    out = ref.paged_prefill_attention(q, k_cache, v_cache, tables, cu, torch.tensor(ctx_lens), 0.25)
    for s, (n, m) in enumerate(zip(ctx_lens, new_lens)):
        k = ref.gather_kv(k_cache, tables[s], n)
        v = ref.gather_kv(v_cache, tables[s], n)
        want = dense_attention(q[cu[s]:cu[s + 1]], k, v, n - m, 0.25)
        torch.testing.assert_close(out[cu[s]:cu[s + 1]], want, rtol=1e-12, atol=1e-12)


def test_store_kv_writes_exactly_its_slots():
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(6, 4, 2, 8, generator=g)
    v_cache = torch.randn(6, 4, 2, 8, generator=g)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([5, 0, 23, 14])
    k, v = torch.randn(4, 2, 8, generator=g), torch.randn(4, 2, 8, generator=g)
    ref.store_kv(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 8), v_cache.view(-1, 2, 8)
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat_k[untouched], before_k.view(-1, 2, 8)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(-1, 2, 8)[untouched])


def test_rope_matches_complex_rotation():
    g = torch.Generator().manual_seed(2)
    t, h, d, theta = 9, 3, 16, 10000.0
    x = torch.randn(t, h, d, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 500, (t,), generator=g)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None, :]
    got = ref.apply_rope(x, ang.cos(), ang.sin())
    # rotate-half convention: pair (i, i + d/2) is one complex number
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(ang), ang)[:, None, :]
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1), rtol=1e-12, atol=1e-12)


def test_rms_norm_and_fused_add():
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(5, 32, generator=g, dtype=torch.float64), torch.randn(5, 32, generator=g, dtype=torch.float64)
    w = torch.randn(32, generator=g, dtype=torch.float64)
    want = (x + r) / torch.sqrt(((x + r) ** 2).mean(-1, keepdim=True) + 1e-5) * w
    normed, res = ref.add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(normed, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res, x + r, rtol=0, atol=0)
