"""Triton paged decode attention against the torch reference computed in float64.

Every case runs on a poisoned setup, so reading anything the kernel must not read shows up as NaN:
pool slots outside every sequence's context hold NaN, block-table entries past a sequence's last page
hold ids far outside the pool, and `out` and the split workspace start as NaN. Block tables are
shuffled ids from a pool larger than needed. On CPU the kernels run in Triton's interpreter.
"""
from __future__ import annotations

import math

import pytest
import torch

from sot_engine.kernels import reference as ref
from sot_engine.kernels.triton import decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def paged_inputs(lens: list[int], heads: int, kvh: int, d: int, bs: int, seed: int,
                 dtype: torch.dtype = torch.float32, table_dtype: torch.dtype = torch.int64):
    """Random q and pool, shuffled tables; returns (q, clean k/v, poisoned k/v, table, oracle table)."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // bs) for n in lens]
    num_blocks = sum(pages) + 7  # spare blocks nobody owns
    k = torch.randn(num_blocks, bs, kvh, d, generator=g)
    v = torch.randn(num_blocks, bs, kvh, d, generator=g)
    q = 2 * torch.randn(len(lens), heads, d, generator=g)  # peakier softmax than unit scores
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0, a masked load's fallback, is NaN
    width = max(pages) + 2  # and unused columns past the longest sequence
    table = torch.full((len(lens), width), num_blocks + 10**6, dtype=torch.int64)  # invalid ids
    live = torch.zeros(num_blocks, bs, dtype=torch.bool)
    for s, (n, p) in enumerate(zip(lens, pages)):
        table[s, :p] = torch.tensor([ids.pop() for _ in range(p)])
        for t in range(n):
            live[table[s, t // bs], t % bs] = True
    k, v, q = k.to(dtype), v.to(dtype), q.to(dtype)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[~live], v_bad[~live] = math.nan, math.nan
    oracle_table = torch.where(table < num_blocks, table, 0)  # the reference gathers whole padded rows
    return q, k, v, k_bad, v_bad, table.to(table_dtype), oracle_table


def expected(q, k, v, oracle_table, lens, scale) -> torch.Tensor:
    return ref.paged_decode_attention(q.double(), k.double(), v.double(), oracle_table, torch.tensor(lens), scale)


def run(q, k_bad, v_bad, table, lens, scale, partition_size=None, max_context_len=None,
        len_dtype=torch.int64) -> torch.Tensor:
    """The kernel on device with NaN-filled `out` and workspace."""
    b, heads, d = q.shape
    out = torch.full((b, heads, d), math.nan, dtype=q.dtype, device=DEVICE)
    max_len = max_context_len or max(lens)
    parts = -(-max_len // (partition_size or max_len))
    ws = torch.full((decode.workspace_numel(b, heads, d, parts),), math.nan, device=DEVICE)
    res = decode.paged_decode_attention(
        q.to(DEVICE), k_bad.to(DEVICE), v_bad.to(DEVICE), table.to(DEVICE),
        torch.tensor(lens, dtype=len_dtype, device=DEVICE), scale, max_context_len,
        partition_size=partition_size, out=out, workspace=ws)
    assert res is out
    return res.cpu()


# (heads, kv_heads, head_dim, block_size, context lens, partition size): GQA ratios 1/3/4/8,
# head_dim 64/128, pages of 16/32; partitions of 40 and 48 split pages, 128 holds two tiles
CASES = {
    "mha-d64-bs16-ragged-one-partition": (4, 4, 64, 16, [1, 17, 70, 33], None),
    "gqa3-d64-bs16-ragged-split40": (6, 2, 64, 16, [1, 17, 70, 33, 130], 40),
    "gqa4-d128-bs32-split64": (8, 2, 128, 32, [200, 31, 64], 64),
    "gqa8-d128-bs16-multi-tile-one-partition": (8, 1, 128, 16, [200, 3], None),
    "gqa8-d64-bs32-multi-tile-split128": (8, 1, 64, 32, [190, 1, 129], 128),
    "mha-d128-bs32-split48": (2, 2, 128, 32, [97, 48, 49], 48),
    "gemma-d256-bs16-split48": (4, 1, 256, 16, [90, 7], 48),  # float32 at head_dim 256: 32-token tiles
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_reference(case):
    heads, kvh, d, bs, lens, psize = case
    q, k, v, k_bad, v_bad, table, oracle_table = paged_inputs(lens, heads, kvh, d, bs, seed=heads * 1000 + d + bs)
    scale = d ** -0.5
    out = run(q, k_bad, v_bad, table, lens, scale, psize)
    torch.testing.assert_close(out.double(), expected(q, k, v, oracle_table, lens, scale), rtol=1e-4, atol=1e-5)


def test_reduce_over_several_steps(monkeypatch):
    """More partitions than the reduce merges per step (BLOCK_P, shrunk from 32 to 4 to keep it small):
    its running merge carries over steps, the last one partly past the sequence's partitions."""
    monkeypatch.setattr(decode, "BLOCK_P", 4)
    lens = [130, 9, 70]  # 9, 1 and 5 partitions of 16: three steps, one, two
    q, k, v, k_bad, v_bad, table, oracle_table = paged_inputs(lens, 4, 2, 64, 16, seed=13)
    out = run(q, k_bad, v_bad, table, lens, 0.125, partition_size=16)
    torch.testing.assert_close(out.double(), expected(q, k, v, oracle_table, lens, 0.125), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lens, bs", [([1], 16), ([16], 16), ([5], 32), ([1, 1, 1], 32)],
                         ids=["context1", "one-full-block", "one-partial-block", "batch-of-context1"])
def test_tiny_contexts(lens, bs):
    q, k, v, k_bad, v_bad, table, oracle_table = paged_inputs(lens, 6, 2, 64, bs, seed=sum(lens) + bs)
    out = run(q, k_bad, v_bad, table, lens, 0.125, partition_size=4)  # splits the 16- and 5-token contexts
    torch.testing.assert_close(out.double(), expected(q, k, v, oracle_table, lens, 0.125), rtol=1e-4, atol=1e-5)
    if lens == [1]:  # one token: the output is its V row, whatever the scores
        torch.testing.assert_close(out[0], v[table[0, 0], 0].repeat_interleave(3, dim=0))


def test_int32_metadata_and_loose_max_context_len():
    """int32 tables/lens (what a CUDA-graph runner keeps) and a max_context_len above the true max."""
    lens = [70, 9, 33]
    q, k, v, k_bad, v_bad, table, oracle_table = paged_inputs(lens, 4, 1, 64, 16, seed=3, table_dtype=torch.int32)
    out = run(q, k_bad, v_bad, table, lens, 0.1, partition_size=32, max_context_len=150, len_dtype=torch.int32)
    torch.testing.assert_close(out.double(), expected(q, k, v, oracle_table, lens, 0.1), rtol=1e-4, atol=1e-5)


def test_fp16_inputs():
    lens = [1, 45, 100]
    q, k, v, k_bad, v_bad, table, oracle_table = paged_inputs(lens, 8, 2, 128, 16, seed=11, dtype=torch.float16)
    out = run(q, k_bad, v_bad, table, lens, 128 ** -0.5, partition_size=64)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), expected(q, k, v, oracle_table, lens, 128 ** -0.5), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 math is broken in Triton's CPU interpreter")
@pytest.mark.parametrize("heads, kvh", [(8, 8), (8, 2)])
def test_bf16_inputs_on_gpu(heads, kvh):
    lens = [1, 300, 1000, 77]
    q, k, v, k_bad, v_bad, table, oracle_table = paged_inputs(lens, heads, kvh, 128, 16, seed=5, dtype=torch.bfloat16)
    for psize in (None, 256):
        out = run(q, k_bad, v_bad, table, lens, 128 ** -0.5, partition_size=psize)
        torch.testing.assert_close(out.double(), expected(q, k, v, oracle_table, lens, 128 ** -0.5),
                                   rtol=2e-2, atol=2e-2)


def test_strided_q_and_default_buffers():
    """q as the model passes it (a view into the fused qkv rows), no out/workspace given."""
    lens, heads, kvh, d = [20, 50], 4, 2, 64
    q, k, v, _, _, table, oracle_table = paged_inputs(lens, heads, kvh, d, 16, seed=9)
    qkv = torch.randn(len(lens), heads + 2 * kvh, d)
    qkv[:, :heads] = q
    got = decode.paged_decode_attention(qkv[:, :heads].to(DEVICE), k.to(DEVICE), v.to(DEVICE), table.to(DEVICE),
                                        torch.tensor(lens, device=DEVICE), 0.2, partition_size=16).cpu()
    torch.testing.assert_close(got.double(), expected(q, k, v, oracle_table, lens, 0.2), rtol=1e-4, atol=1e-5)


def test_bad_buffers_raise():
    q, k, v, _, _, table, _ = paged_inputs([40], 4, 2, 64, 16, seed=1)
    lens = torch.tensor([40])
    with pytest.raises(ValueError, match="workspace"):
        decode.paged_decode_attention(q, k, v, table, lens, 0.1, partition_size=16, workspace=torch.empty(10))
    with pytest.raises(ValueError, match="out"):
        decode.paged_decode_attention(q, k, v, table, lens, 0.1, out=torch.empty(1, 4, 32))
    with pytest.raises(ValueError, match="KV heads"):
        decode.paged_decode_attention(q[:, :3], k, v, table, lens, 0.1)


def test_default_partition_size(monkeypatch):
    """One partition off-GPU; on a GPU enough partitions for ~2 waves, in whole tiles, never tiny."""
    assert decode.default_partition_size(4, 5000, torch.device("cpu")) == 5000
    monkeypatch.setattr(decode, "_num_sms", lambda index: 132)
    cuda = torch.device("cuda", 0)
    for programs, max_len in [(8, 4096), (8, 32768), (1, 100), (512, 4096), (3, 1000)]:
        size = decode.default_partition_size(programs, max_len, cuda)
        parts = -(-max_len // size)
        assert size % decode.BLOCK_N == 0 and size >= decode.MIN_PARTITION
        assert parts == 1 or programs * parts >= 132 or size == decode.MIN_PARTITION  # a wave at least
        assert programs * (parts - 1) < 2 * 132  # no more partitions than the target needs
