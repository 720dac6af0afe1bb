"""Cascade (shared-prefix) decode attention == plain paged decode, in float64, on fork-shaped block tables."""
from __future__ import annotations

import pytest
import torch

from sot_engine.kernels import reference as ref
from sot_engine.kernels.cascade import attention_lse, cascade_decode_attention, cascade_pays, find_groups, merge_state


def forked_pool(groups_spec, solo_lens, kvh, d, bs, g):
    """Block tables as a fork leaves them: each group's members share `prefix` full blocks, then own blocks.
    groups_spec: [(prefix_blocks, [member context lens])]. Returns caches, tables, lens, expected groups."""
    num_blocks = 200
    k_cache = torch.randn(num_blocks, bs, kvh, d, generator=g, dtype=torch.float64)
    v_cache = torch.randn(num_blocks, bs, kvh, d, generator=g, dtype=torch.float64)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables, lens, expect = [], [], []
    for prefix, member_lens in groups_spec:
        shared = [free.pop() for _ in range(prefix)]
        rows = []
        for n in member_lens:
            assert n > prefix * bs
            rows.append(len(tables))
            tables.append(shared + [free.pop() for _ in range(-(-n // bs) - prefix)])
            lens.append(n)
        expect.append((rows, shared))
    for n in solo_lens:
        tables.append([free.pop() for _ in range(-(-n // bs))])
        lens.append(n)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return k_cache, v_cache, bt, tables, lens, expect


@pytest.mark.parametrize("heads, kvh", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("bs", [4, 16])
def test_cascade_equals_plain_decode(heads, kvh, bs):
    g = torch.Generator().manual_seed(heads * 100 + kvh + bs)
    d = 16
    spec = [(3, [3 * bs + 1, 3 * bs + 7, 5 * bs + 2]), (1, [bs + 1, 2 * bs])]
    kc, vc, bt, tables, lens, expect = forked_pool(spec, solo_lens=[1, bs + 3], kvh=kvh, d=d, bs=bs, g=g)
    q = torch.randn(len(lens), heads, d, generator=g, dtype=torch.float64)
    cl = torch.tensor(lens)
    groups = find_groups(tables, lens, bs)
    # the groups are found from the tables alone; a member's last (partial) block is never shared
    assert sorted((gr.members.tolist(), gr.blocks.tolist()) for gr in groups) == sorted(
        (rows, shared[:min(len(shared), min((lens[r] - 1) // bs for r in rows))]) for rows, shared in expect)
    plain = ref.paged_decode_attention(q, kc, vc, bt, cl, 0.3)
    casc = cascade_decode_attention(q, kc, vc, bt, cl, 0.3, groups)
    torch.testing.assert_close(casc, plain, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(casc).all()


def test_merge_state_is_exact_and_handles_empty_sides():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(20, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(20, 2, 8, generator=g, dtype=torch.float64)
    whole, lse = attention_lse(q, k, v, 0.5)
    a, la = attention_lse(q, k[:7], v[:7], 0.5)
    b, lb = attention_lse(q, k[7:], v[7:], 0.5)
    m, lm = merge_state(a, la, b, lb)
    torch.testing.assert_close(m, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lm, lse, rtol=1e-12, atol=1e-12)
    none = torch.zeros(3, 4, 8, dtype=torch.float64), torch.full((3, 4), float("-inf"), dtype=torch.float64)
    m2, l2 = merge_state(*none, whole, lse)
    torch.testing.assert_close(m2, whole) and torch.testing.assert_close(l2, lse)
    e, le = attention_lse(q, k, v, 0.5, mask=torch.zeros(3, 20, dtype=torch.bool))  # sees nothing
    assert torch.isneginf(le).all() and (e == 0).all()


def test_no_groups_without_shared_full_blocks():
    assert find_groups([[1, 2], [3, 4]], [20, 20], 16) == []
    assert find_groups([[1, 2], [1, 5]], [17, 16], 16) == []  # row 1's only full block is its last token's
    assert find_groups([[1]], [9], 16) == []


def test_cost_model_prefers_long_shared_prefixes():
    assert not cascade_pays(8, 128, 32, 3)  # short prefix: published 0.52x
    assert cascade_pays(8, 512, 64, 3)
    assert not cascade_pays(1, 4096, 10, 8)  # nothing shared
    assert not cascade_pays(2, 512, 1024, 1)
