"""Shared-prefix (cascade) decode attention, plain torch: the oracle for the fast kernels (Triton's; the C++ CPU
attention finds and attends its groups itself, csrc/cpu/attention.cpp).

The B points of one SoT answer share their prompt's prefix blocks (a fork shares full blocks by reference).
Plain paged decode reads that prefix once per sequence: B matrix-vector products over the same K/V. Cascade
splits each sequence's attention in two:
- the shared prefix, once for the whole group: all B queries (x the query heads of a KV head) against the
  prefix K/V, a matrix-matrix product that reads the prefix once;
- each sequence's own suffix (its blocks after the shared ones), a paged decode over shifted block tables;
and merges the two partial results exactly through their log-sum-exp ("merge state", as in FlashInfer).

Groups are found from the block tables themselves (`find_groups`): sequences whose tables start with the same
block ids share those blocks, whoever forked them. Whether cascade pays is a cost question (`cascade_pays`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefixGroup:
    """Sequences `members` (batch rows) share their first `num_blocks` blocks, `blocks` (ids)."""
    members: torch.Tensor  # [n] int64 batch rows
    blocks: torch.Tensor  # [num_blocks] int64 block ids
    num_blocks: int


def find_groups(block_tables: list[list[int]], context_lens: list[int], block_size: int,
                min_members: int = 2) -> list[PrefixGroup]:
    """Groups of rows whose block tables share a leading run of blocks that are full for every member
    (a block still being written belongs to one sequence only, so it is never shared). Host-side lists: the
    runner has them before building tensors."""
    by_first: dict[int, list[int]] = {}
    for row, table in enumerate(block_tables):
        if table and context_lens[row] > block_size:
            by_first.setdefault(table[0], []).append(row)
    groups = []
    for rows in by_first.values():
        if len(rows) < min_members:
            continue
        n = min(len(block_tables[r]) for r in rows)
        n = min(n, min((context_lens[r] - 1) // block_size for r in rows))  # leave each row its last token
        first = block_tables[rows[0]]
        k = 0
        while k < n and all(block_tables[r][k] == first[k] for r in rows):
            k += 1
        if k:
            groups.append(PrefixGroup(torch.tensor(rows), torch.tensor(first[:k]), k))
    return groups


def cascade_pays(num_members: int, prefix_len: int, suffix_len: int, group_heads: int) -> bool:
    """A first cost model: cascade saves (members - 1) reads of the prefix K/V and costs a second pass plus a
    merge. Published numbers: FlashInfer #595 and TRT-LLM measured it slower at short prefixes (0.52x at 128
    tokens) and 2-4x faster from 256-512 up; with one query head per KV head the prefix pass is a
    matrix-vector product again and gains little. To be refined by the GPU microbenchmark."""
    return num_members >= 2 and prefix_len >= 256 and prefix_len >= suffix_len and num_members * group_heads >= 4


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each query's scores.

    q [N, H, D], k/v [L, KVH, D] (GQA: H a multiple of KVH), mask [N, L] (True = attend) -> o [N, H, D]
    and lse [N, H] (fp32 or fp64; -inf and o = 0 for a query that sees no key)."""
    n, h, d = q.shape
    kvh = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.view(n, kvh, h // kvh, d).to(acc)
    s = torch.einsum("nkgd,lkd->nkgl", qg, k.to(acc)) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [N, KVH, G]
    p = torch.exp(s - lse[..., None].clamp(min=torch.finfo(acc).min)).nan_to_num(0.0)
    o = torch.einsum("nkgl,lkd->nkgd", p, v.to(acc))
    return o.reshape(n, h, d), lse.reshape(n, h)


def merge_state(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys A and B from attention over A and over B: weights exp(lse_x - lse), exact.
    o [N, H, D], lse [N, H]; a side with lse -inf (no keys) contributes nothing."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a - safe)[..., None]
    wb = torch.exp(lse_b - safe)[..., None]
    return (wa * o_a + wb * o_b), lse


def _gather(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    return cache[blocks].flatten(0, 1)[:length]


def cascade_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                             groups: list[PrefixGroup], max_context_len: int | None = None) -> torch.Tensor:
    """Decode attention (one query per row, as `reference.paged_decode_attention`) with each group's shared
    prefix attended once for all its members, merged with each member's suffix by log-sum-exp. Rows in no
    group attend to their whole context the same way (empty prefix). `max_context_len` is unused here (the
    kernels' signature)."""
    b, h, d = q.shape
    bs = k_cache.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    lens = context_lens.tolist()
    prefix_blocks = [0] * b
    out_p = torch.zeros(b, h, d, dtype=acc, device=q.device)
    lse_p = torch.full((b, h), float("-inf"), dtype=acc, device=q.device)
    for g in groups:  # one pass over the prefix for all members: [members, H, D] x [prefix, KVH, D]
        plen = g.num_blocks * bs
        rows = g.members.to(q.device)
        o, lse = attention_lse(q[rows], _gather(k_cache, g.blocks, plen), _gather(v_cache, g.blocks, plen), scale)
        out_p[rows], lse_p[rows] = o, lse
        for r in g.members.tolist():
            prefix_blocks[r] = g.num_blocks
    out_s = torch.empty(b, h, d, dtype=acc, device=q.device)
    lse_s = torch.empty(b, h, dtype=acc, device=q.device)
    for r in range(b):  # each row's own suffix (the oracle loops; a kernel does this as a paged decode)
        start = prefix_blocks[r] * bs
        n_blk = -(-lens[r] // bs)
        tail = block_tables[r, prefix_blocks[r]:n_blk]
        k = _gather(k_cache, tail, lens[r] - start)
        v = _gather(v_cache, tail, lens[r] - start)
        out_s[r:r + 1], lse_s[r:r + 1] = attention_lse(q[r:r + 1], k, v, scale)
    o, _ = merge_state(out_p, lse_p, out_s, lse_s)
    return o.to(q.dtype)
