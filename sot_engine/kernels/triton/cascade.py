"""Shared-prefix (cascade) decode attention in Triton; `kernels.cascade` is its torch reference.

Three launches per call:
- prefix pass, grid (group, KV head, member chunk x prefix partition): a program loads the queries of its
  group's members for the query heads of one KV head (members x GROUP rows, padded to >= 16 for `tl.dot`)
  and walks the group's shared prefix blocks once, a matrix-matrix product where plain decode would do one
  matrix-vector product per member. Each writes its partition's normalized output and log-sum-exp per row;
  rows in no group (and partitions a group does not reach) keep lse = -inf.
- suffix pass: the paged decode kernel (`decode.py`, `return_lse=True`) on each row's own blocks: its block
  table shifted by its shared block count, its length minus the shared tokens (rows in no group: all of it).
  `find_groups` leaves every member at least its last token, so no suffix is empty.
- merge, grid (row, head): the prefix partitions and the suffix combined exactly by their log-sum-exps.
The prefix pass runs decode's tile loop (`attention.attend_pages`) on more rows, the merge its partial-result
fold (`attention.merge_partitions`) starting from the suffix.
The groups arrive as `PrefixGroup`s; they are packed into a few int32 tensors (one host-to-device copy) once
per step and reused by every layer (`_plan`, keyed on the step's group list and block table objects).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sot_engine.kernels.cascade import PrefixGroup
from sot_engine.kernels.triton.attention import LN2, LOG2E, attend_pages, dot_inputs, merge_partitions
from sot_engine.kernels.triton.decode import default_partition_size, paged_decode_attention, tile_tokens

MAX_ROWS = 64  # query rows (members x heads per KV head) per prefix program; more members -> more chunks


@triton.jit
def _prefix_kernel(
        q_ptr, k_ptr, v_ptr, members_ptr, member_off_ptr, blocks_ptr, block_off_ptr, part_out_ptr, part_lse_ptr,
        qk_scale, partition_size, num_parts,
        stride_qb, stride_qh, stride_kn, stride_kr, stride_kh, stride_vn, stride_vr, stride_vh,
        stride_pb, stride_ph, stride_pp, stride_lb, stride_lh,
        GROUP: tl.constexpr, MEMBERS: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    chunk = tl.program_id(2) // num_parts
    part = tl.program_id(2) % num_parts
    m_first = tl.load(member_off_ptr + g) + chunk * MEMBERS
    m_end = tl.load(member_off_ptr + g + 1)
    b_first = tl.load(block_off_ptr + g)
    n_tok = (tl.load(block_off_ptr + g + 1) - b_first) * PAGE  # prefix blocks are full
    start = part * partition_size
    if (m_first >= m_end) | (start >= n_tok):
        return
    end = tl.minimum(start + partition_size, n_tok)

    offs_r = tl.arange(0, ROWS)  # row r: member r // GROUP, query head kvh * GROUP + r % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    member = m_first + offs_r // GROUP
    r_mask = (offs_r < MEMBERS * GROUP) & (member < m_end)
    d_mask = offs_d < HEAD_DIM
    seq = tl.load(members_ptr + member, mask=r_mask, other=0).to(tl.int64)
    head = (kvh * GROUP + offs_r % GROUP).to(tl.int64)
    q = tl.load(q_ptr + seq[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    acc, l_i, m_i = attend_pages(acc, l_i, m_i, q, k_ptr + kvh.to(tl.int64) * stride_kh,
                                 v_ptr + kvh.to(tl.int64) * stride_vh, blocks_ptr + b_first, start, end,
                                 qk_scale, stride_kn, stride_kr, stride_vn, stride_vr,
                                 HEAD_DIM, BLOCK_D, PAGE, BLOCK_N, True, UPCAST, DOT_PRECISION)

    o = acc / l_i[:, None]  # l_i >= 1 for every row, padding rows included (their q is 0)
    tl.store(part_out_ptr + seq[:, None] * stride_pb + head[:, None] * stride_ph + part * stride_pp + offs_d[None, :],
             o, mask=r_mask[:, None] & d_mask[None, :])
    tl.store(part_lse_ptr + seq * stride_lb + head * stride_lh + part, m_i + tl.log2(l_i), mask=r_mask)


@triton.jit
def _merge_kernel(
        part_out_ptr, part_lse_ptr, suf_out_ptr, suf_lse_ptr, out_ptr, num_parts,
        stride_pb, stride_ph, stride_pp, stride_lb, stride_lh, stride_sb, stride_sh, stride_eb, stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """out = (sum_p 2^(lse_p - m) o_p + 2^(lse_s - m) o_s) / (sum_p 2^(lse_p - m) + 2^(lse_s - m))."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    # start from the suffix, whose lse is finite (every suffix holds a token), and fold in the prefix partitions
    o_s = tl.load(suf_out_ptr + b * stride_sb + h * stride_sh + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
    lse_s = tl.load(suf_lse_ptr + b * stride_eb + h) / LN2  # natural log -> log2 units
    acc, l, m = merge_partitions(
        o_s, tl.full([], 1.0, tl.float32), lse_s, part_out_ptr + b * stride_pb + h * stride_ph,
        part_lse_ptr + b * stride_lb + h * stride_lh, stride_pp, num_parts, HEAD_DIM, BLOCK_D, BLOCK_P)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, (acc / l).to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@dataclass(frozen=True)
class CascadePlan:
    """One step's groups as device tensors: what every layer's call needs."""
    members: torch.Tensor  # [M] int32 batch rows, group after group
    member_off: torch.Tensor  # [G+1] int32
    blocks: torch.Tensor  # [NB] int32 prefix block ids, group after group
    block_off: torch.Tensor  # [G+1] int32
    suffix_tables: torch.Tensor  # [B, W] each row's block table shifted past its shared blocks
    suffix_lens: torch.Tensor  # [B] context_lens minus the shared tokens
    num_groups: int
    max_members: int
    max_prefix_blocks: int


def make_plan(groups: list[PrefixGroup], block_tables: torch.Tensor, context_lens: torch.Tensor,
              block_size: int) -> CascadePlan:
    b, width = block_tables.shape
    shared = [0] * b
    members, blocks, member_off, block_off = [], [], [0], [0]
    for g in groups:
        rows = g.members.tolist()
        members += rows
        blocks += g.blocks.tolist()
        member_off.append(len(members))
        block_off.append(len(blocks))
        for r in rows:
            shared[r] = g.num_blocks
    packed = torch.tensor(members + member_off + blocks + block_off + shared, dtype=torch.int32).to(
        block_tables.device, non_blocking=True)  # one host-to-device copy
    parts = torch.split(packed, [len(members), len(member_off), len(blocks), len(block_off), b])
    shift = parts[4].to(torch.int64)
    cols = (shift[:, None] + torch.arange(width, device=block_tables.device)).clamp(max=width - 1)
    return CascadePlan(
        members=parts[0], member_off=parts[1], blocks=parts[2], block_off=parts[3],
        suffix_tables=torch.gather(block_tables, 1, cols), suffix_lens=context_lens - shift * block_size,
        num_groups=len(groups), max_members=max((len(g.members) for g in groups), default=0),
        max_prefix_blocks=max((g.num_blocks for g in groups), default=0))


_last_plan: tuple = (None, None, None, None)  # (groups, block_tables, context_lens, plan): layers share a step's


def _plan(groups, block_tables, context_lens, block_size) -> CascadePlan:
    global _last_plan
    g, bt, cl, plan = _last_plan
    if g is groups and bt is block_tables and cl is context_lens:
        return plan
    plan = make_plan(groups, block_tables, context_lens, block_size)
    _last_plan = (groups, block_tables, context_lens, plan)  # held, so their ids cannot be reused meanwhile
    return plan


def cascade_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                             groups: list[PrefixGroup] | CascadePlan, max_context_len: int | None = None, *,
                             partition_size: int | None = None,
                             prefix_partition_size: int | None = None) -> torch.Tensor:
    """As `kernels.cascade.cascade_decode_attention`: q [B, H, D] -> [B, H, D] in q's dtype.

    `groups` as `find_groups` returns them (or a `make_plan` of them). `partition_size` splits the suffix
    decode, `prefix_partition_size` (tokens) the prefix pass; by default a CUDA
    launch is split to fill the GPU and elsewhere not at all."""
    b, heads, d = q.shape
    _, page, kvh, _ = k_cache.shape
    if heads % kvh:
        raise ValueError(f"{heads} query heads do not split into {kvh} KV heads")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the KV caches need a unit stride on head_dim")
    if b == 0 or not groups:
        return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len,
                                      partition_size=partition_size)
    plan = groups if isinstance(groups, CascadePlan) else _plan(groups, block_tables, context_lens, page)
    group = heads // kvh
    max_len = max_context_len or int(context_lens.max())

    # suffix: a plain paged decode over each row's own blocks, in float32 with its log-sum-exp
    suf_out = torch.empty(b, heads, d, dtype=torch.float32, device=q.device)
    suf_out, suf_lse = paged_decode_attention(q, k_cache, v_cache, plan.suffix_tables, plan.suffix_lens, scale,
                                              max_len, partition_size=partition_size, out=suf_out, return_lse=True)

    # prefix: once per (group, KV head) for all members
    members = max(1, min(plan.max_members, MAX_ROWS // group))
    chunks = triton.cdiv(plan.max_members, members)
    prefix_len = plan.max_prefix_blocks * page
    if prefix_partition_size is not None and prefix_partition_size < 1:
        raise ValueError(f"prefix_partition_size must be positive, got {prefix_partition_size}")
    psize = prefix_partition_size or default_partition_size(plan.num_groups * kvh * chunks, prefix_len, q.device)
    parts = triton.cdiv(prefix_len, psize)
    part_out = torch.empty(b, heads, parts, d, dtype=torch.float32, device=q.device)
    part_lse = torch.full((b, heads, parts), float("-inf"), dtype=torch.float32, device=q.device)
    upcast, precision = dot_inputs(q, k_cache)
    _prefix_kernel[(plan.num_groups, kvh, chunks * parts)](
        q, k_cache, v_cache, plan.members, plan.member_off, plan.blocks, plan.block_off, part_out, part_lse,
        scale * LOG2E, psize, parts,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        *part_out.stride()[:3], *part_lse.stride()[:2],
        GROUP=group, MEMBERS=members, ROWS=max(16, triton.next_power_of_2(members * group)), HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)), PAGE=page, BLOCK_N=tile_tokens(d, k_cache), UPCAST=upcast,
        DOT_PRECISION=precision, num_warps=4)

    out = torch.empty(b, heads, d, dtype=q.dtype, device=q.device)
    _merge_kernel[(b, heads)](
        part_out, part_lse, suf_out, suf_lse, out, parts,
        *part_out.stride()[:3], *part_lse.stride()[:2], suf_out.stride(0), suf_out.stride(1), suf_lse.stride(0),
        out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_P=max(2, triton.next_power_of_2(parts)), num_warps=4)
    return out
