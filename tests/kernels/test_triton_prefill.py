"""The Triton paged prefill/extend attention against the float64 torch reference (CPU: Triton interpreter).

Every pool slot a sequence does not own is NaN (unused blocks, the tail of a partial last block,
the block-table padding), so a read past a context shows up as NaN; the output starts as NaN, so
a row the kernel forgets to write does too.
"""
from __future__ import annotations

import pytest
import torch

from sot_engine.kernels import reference as ref
from sot_engine.kernels.triton.prefill import _tile_table, paged_prefill_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(prefixes: list[int], news: list[int], heads: int, kvh: int, d: int, bs: int,
               dtype: torch.dtype, seed: int, q_gain: float = 1.0):
    """Packed q (a strided view, like the engine's q out of its fused qkv) and a NaN-poisoned pool
    whose sequences own shuffled, non-contiguous blocks of a larger pool."""
    g = torch.Generator().manual_seed(seed)
    ctx = [p + n for p, n in zip(prefixes, news)]
    need = [-(-c // bs) for c in ctx]
    num_blocks = 2 * sum(need) + 3
    k_cache = torch.full((num_blocks, bs, kvh, d), float("nan"), dtype=torch.float64)
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(num_blocks, generator=g)
    spare = perm[sum(need):]  # never owned: stays NaN, and pads the block tables
    tables = spare[torch.randint(len(spare), (len(ctx), max(need) + 2), generator=g)]
    owned = perm[:sum(need)].split(need)
    for s, (c, blocks) in enumerate(zip(ctx, owned)):
        tables[s, :len(blocks)] = blocks
        for kv in (k_cache, v_cache):
            kv[blocks] = torch.randn(len(blocks), bs, kvh, d, generator=g, dtype=torch.float64)
            kv[blocks[-1], c - (len(blocks) - 1) * bs:] = float("nan")  # stale tail of the last block
    t = sum(news)
    qkv = torch.randn(t, heads + 2 * kvh, d, generator=g, dtype=torch.float64) * q_gain
    cu = torch.tensor([0, *torch.tensor(news).cumsum(0).tolist()], dtype=torch.int32)
    to = dict(device=DEVICE)
    return (qkv.to(dtype=dtype, **to)[:, :heads], k_cache.to(dtype=dtype, **to), v_cache.to(dtype=dtype, **to),
            tables.to(**to), cu.to(**to), torch.tensor(ctx, **to))


def check(prefixes, news, heads, kvh, d, bs, dtype=torch.float32, tol=1e-4, q_gain=1.0, seed=0, **blocks):
    q, k_cache, v_cache, tables, cu, ctx = make_batch(prefixes, news, heads, kvh, d, bs, dtype, seed, q_gain)
    scale = d ** -0.5
    want = ref.paged_prefill_attention(q.double(), k_cache.double(), v_cache.double(), tables, cu, ctx, scale)
    out = torch.full_like(q, float("nan"))  # dense [T, H, D], unlike q's strided view
    got = paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctx, scale, out=out, **blocks)
    assert got is out and got.dtype == dtype
    bad = got.isnan().flatten(1).any(1).nonzero().flatten().tolist()
    assert not bad, f"rows not written, or NaN read past a context: {bad}"
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


# (prefixes, new tokens, heads, kv heads, head_dim, block_size, tile overrides): every GQA ratio,
# head_dim and block size appears; small tiles force many query tiles and unmasked context tiles.
CASES = {
    "prefill": ([0], [50], 4, 4, 64, 16, dict(block_m=16, block_n=16)),  # 50: not a block multiple
    "extend": ([37], [5], 9, 3, 64, 16, {}),  # a forked prefix + a suffix; SmolLM2's 9/3 heads
    "decode_like": ([299], [1], 8, 2, 128, 32, {}),  # one token over a long context
    "single_block": ([3], [9], 8, 1, 64, 16, {}),
    "ragged": ([0, 37, 20, 100], [70, 5, 0, 1], 8, 2, 128, 32, {}),  # one sequence with no new tokens
    "ragged_small_tiles": ([0, 37, 20, 100], [70, 5, 0, 1], 8, 2, 128, 32, dict(block_m=64, block_n=32)),
    # Gemma 3's 4 heads on one KV head at head_dim 256, key tiles half a page (float32 on sm_8x launches so)
    "tiles_inside_pages": ([20, 0], [30, 7], 4, 1, 256, 32, dict(block_m=32, block_n=16)),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_fp32(case):
    prefixes, news, heads, kvh, d, bs, blocks = CASES[case]
    check(prefixes, news, heads, kvh, d, bs, q_gain=3.0 if case == "extend" else 1.0, **blocks)


@pytest.mark.parametrize("bs", [16, 12])
def test_every_diagonal_offset(bs):
    # the causal diagonal and the context end at every offset within a 16-key tile, in one launch
    # (block size 12: not a power of two, so a key tile spans partial blocks)
    prefixes = list(range(0, 34))
    check(prefixes, [1 + p % 3 for p in prefixes], 2, 1, 64, bs, block_m=16, block_n=16)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 3e-3), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
def test_half_precision(dtype, tol):
    # bf16 runs in the interpreter too: the kernel upcasts its tiles there (the interpreter rounds
    # fp32 -> bf16 toward zero, so expect up to 1 ulp, ~1.6e-2 at |x| ~ 3, on the output)
    check([0, 45, 7], [33, 4, 0], 12, 4, 64, 16, dtype=dtype, tol=tol, seed=1)


def test_tile_table_covers_every_token_once():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        news = torch.randint(0, 40, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
        news[torch.rand(len(news), generator=g) < 0.3] = 0
        if news.sum() == 0:
            continue
        cu = torch.cat((torch.zeros(1, dtype=torch.long), news.cumsum(0))).int()
        tok = int(torch.randint(1, 20, (1,), generator=g))
        table = _tile_table(cu, int(news.sum()), tok)
        seen = torch.zeros(int(news.sum()), dtype=torch.long)
        for s, start in table.tolist():
            if s >= 0:
                assert 0 <= start < news[s]
                seen[cu[s] + start:cu[s] + min(start + tok, int(news[s]))] += 1
        assert torch.equal(seen, torch.ones_like(seen))


def test_rejects_bad_shapes_and_allows_no_new_tokens():
    q, k_cache, v_cache, tables, cu, ctx = make_batch([4, 8], [0, 0], 4, 2, 64, 16, torch.float32, 0)
    assert paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctx, 0.1).shape == (0, 4, 64)
    q, k_cache, v_cache, tables, cu, ctx = make_batch([4], [3], 4, 2, 80, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="head_dim"):
        paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctx, 0.1)
    q, k_cache, v_cache, tables, cu, ctx = make_batch([4], [3], 6, 4, 64, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="multiple"):
        paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctx, 0.1)
