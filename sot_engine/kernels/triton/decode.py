"""Paged decode attention in Triton: split-K over the context (FlashDecoding, vLLM paged attention v2).

Decode is one query token per sequence, so the work is reading K/V; the kernel's job is to read each
K/V row once and keep the GPU busy when the batch is small.
- GQA: one program serves all query heads of one KV head, so a K/V tile feeds the whole group. With a
  group of 2+ heads the scores are a `tl.dot` (the group padded to 16 rows, the least a tensor-core
  dot takes: decode is memory-bound, the padding costs no memory traffic); with one head (MHA) a
  broadcast multiply-sum in float32 avoids 15 wasted rows.
- Split-K: grid (batch, kv_heads, partitions). Each program walks its partition's tokens a tile of
  `BLOCK_N` at a time (several pages per tile), gathering each token's row through the block table,
  with an online softmax in float32. With several partitions each writes its normalized partial output
  and log-sum-exp, and a small reduce kernel merges them exactly; with one it writes the output
  directly. A partition past a short sequence's end (ragged batch) returns at once and the reduce
  never reads its slot, so an unwritten workspace cannot leak into the result.
- The partition size is a runtime argument (no recompile per size): by default a CUDA batch is split
  until there are about two waves of programs; tests force small partitions to exercise the merge.
Half-precision K/V feed the dots in their own dtype on a GPU (float32 accumulation); in Triton's CPU
interpreter, where bfloat16 math is broken, everything is upcast to float32 after the load.
The tile loop and the merge are `attention.attend_pages` and `attention.merge_partitions`, which the
cascade kernels (`cascade.py`) share.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sot_engine.kernels.triton import arch
from sot_engine.kernels.triton.attention import LN2, LOG2E, NO_WINDOW, attend_pages, dot_inputs, merge_partitions

BLOCK_N = 64  # tokens per tile: 4 pages of 16 or 2 of 32
TILE_BYTES = 32 << 10  # at most this much of K (and of V) a tile: float32 at head_dim 256 takes 32 tokens, not 64


def tile_tokens(head_dim: int, kv: torch.Tensor) -> int:
    """Tokens per K/V tile: BLOCK_N, fewer where a tile would pass TILE_BYTES (float32 pools at head_dim 256, Gemma 3:
    64 tokens pipelined need 152 KB of shared memory, over an RTX 3090's 99 KB)."""
    return max(16, min(BLOCK_N, TILE_BYTES // (triton.next_power_of_2(head_dim) * kv.element_size())))
MIN_PARTITION = 256  # below this a partition's fixed cost (q load, partial write, reduce) dominates
BLOCK_P = 32  # partitions merged per step of the reduce loop


@triton.jit
def _decode_partition_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_out_ptr, part_lse_ptr, lse_ptr,
        qk_scale, partition_size, window,
        stride_qb, stride_qh, stride_kn, stride_kr, stride_kh, stride_vn, stride_vr, stride_vh,
        stride_tb, stride_ob, stride_oh, stride_pb, stride_ph, stride_pp, stride_lb, stride_lh, stride_eb,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, WRITE_LSE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(lens_ptr + b).to(tl.int32)
    lo = tl.maximum(ctx - window, 0)  # the first key in the window (0 without one: window is NO_WINDOW)
    start = lo + part * partition_size  # partitions split the window, so keys before it are never read
    if start >= ctx:  # nothing of this sequence here; the reduce skips this slot
        return
    end = tl.minimum(start + partition_size, ctx)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:  # set whenever USE_DOT is not: the multiply-sum runs in float32
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    acc, l_i, m_i = attend_pages(acc, l_i, m_i, q, k_ptr + kvh.to(tl.int64) * stride_kh,
                                 v_ptr + kvh.to(tl.int64) * stride_vh, tables_ptr + b * stride_tb, start, end,
                                 qk_scale, stride_kn, stride_kr, stride_vn, stride_vr,
                                 HEAD_DIM, BLOCK_D, PAGE, BLOCK_N, USE_DOT, UPCAST, DOT_PRECISION)

    o = acc / l_i[:, None]  # l_i >= 1: the partition holds at least one token
    o_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        tl.store(part_out_ptr + b * stride_pb + heads[:, None] * stride_ph + part * stride_pp + offs_d[None, :],
                 o, mask=o_mask)
        tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + part, m_i + tl.log2(l_i), mask=g_mask)
    else:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)
        if WRITE_LSE:  # natural-log units, as `kernels.cascade.attention_lse`
            tl.store(lse_ptr + b * stride_eb + heads, (m_i + tl.log2(l_i)) * LN2, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
        part_out_ptr, part_lse_ptr, lens_ptr, out_ptr, lse_ptr, partition_size, window,
        stride_pb, stride_ph, stride_pp, stride_lb, stride_lh, stride_ob, stride_oh, stride_eb,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, WRITE_LSE: tl.constexpr):
    """Merge one (sequence, head)'s partitions: out = sum_p 2^(lse_p - m) o_p / sum_p 2^(lse_p - m)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    ctx = tl.load(lens_ptr + b).to(tl.int32)
    n_parts = tl.cdiv(tl.minimum(ctx, window), partition_size)  # only these were written; later slots hold garbage
    offs_d = tl.arange(0, BLOCK_D)
    acc, l, m = merge_partitions(  # from an empty state: partition 0 always holds a token
        tl.zeros([BLOCK_D], tl.float32), tl.full([], 0.0, tl.float32), tl.full([], float("-inf"), tl.float32),
        part_out_ptr + b * stride_pb + h * stride_ph, part_lse_ptr + b * stride_lb + h * stride_lh, stride_pp,
        n_parts, HEAD_DIM, BLOCK_D, BLOCK_P)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, (acc / l).to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    if WRITE_LSE:
        tl.store(lse_ptr + b * stride_eb + h, (m + tl.log2(l)) * LN2)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_partition_size(programs: int, max_context_len: int, device: torch.device) -> int:
    """Tokens per partition: on a GPU, split until ~2 waves of programs, in whole tiles of at least
    MIN_PARTITION tokens (long contexts in a small batch); elsewhere one partition (no reduce)."""
    if device.type != "cuda":
        return max(max_context_len, 1)
    want = triton.cdiv(2 * _num_sms(device.index or 0), max(programs, 1))
    size = triton.cdiv(triton.cdiv(max_context_len, want), BLOCK_N) * BLOCK_N
    return max(size, MIN_PARTITION)


def workspace_numel(batch: int, heads: int, head_dim: int, num_partitions: int) -> int:
    """float32 elements a split run needs: partial outputs [B, H, P, D] then log-sum-exps [B, H, P]."""
    return batch * heads * num_partitions * (head_dim + 1)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None, window: int = 0, *, partition_size: int | None = None,
                           out: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
                           return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence over its paged context: q [B, H, D] -> [B, H, D] in q's dtype.

    As `kernels.reference.paged_decode_attention`; every `context_lens[s] >= 1`, and
    `max_context_len` (if given) must be at least their max (it sizes the grid). `window` > 0: each query sees its
    context's last `window` keys, and only those are read.
    `partition_size` (tokens) overrides the split; `out` ([B, H, D], unit last stride) and
    `workspace` (flat float32, `workspace_numel(...)` elements) let a caller reuse buffers.
    With `return_lse` it returns `(out, lse)`, lse [B, H] float32: each query's log-sum-exp of its scaled
    scores (natural log), what an exact merge with attention over other keys needs (cascade decode).
    The partition kernel runs 4 warps, 8 on sm_8x (`arch.capability`; with 4, an A100's mma.sync layouts spill).
    """
    b, heads, d = q.shape
    _, page, kvh, _ = k_cache.shape
    if heads % kvh:
        raise ValueError(f"{heads} query heads do not split into {kvh} KV heads")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"K cache {k_cache.dtype} and V cache {v_cache.dtype} differ")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the KV caches need a unit stride on head_dim")
    if out is None:
        out = torch.empty(b, heads, d, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a unit last stride")
    lse = torch.empty(b, heads, dtype=torch.float32, device=q.device) if return_lse else out.new_empty(1, 1)
    if b == 0:
        return (out, lse) if return_lse else out
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    max_len = max_context_len or int(context_lens.max())
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: the whole context), got {window}")
    max_len = min(max_len, window) if window else max_len  # keys any query reads
    group = heads // kvh
    if partition_size is not None and partition_size < 1:
        raise ValueError(f"partition_size must be positive, got {partition_size}")
    psize = partition_size or default_partition_size(b * kvh, max_len, q.device)
    parts = triton.cdiv(max_len, psize)
    split = parts > 1
    if split:
        need = workspace_numel(b, heads, d, parts)
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.float32, device=q.device)
        elif workspace.dtype != torch.float32 or workspace.numel() < need or not workspace.is_contiguous():
            raise ValueError(f"workspace must be contiguous float32 with at least {need} elements")
        part_out = workspace[:b * heads * parts * d].view(b, heads, parts, d)
        part_lse = workspace[b * heads * parts * d:need].view(b, heads, parts)
    else:
        part_out = out.new_empty(1, 1, 1, 1, dtype=torch.float32)  # unused: the kernel writes out directly
        part_lse = out.new_empty(1, 1, 1, dtype=torch.float32)

    use_dot = group > 1
    upcast, precision = dot_inputs(q, k_cache, use_dot)
    _decode_partition_kernel[(b, kvh, parts)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse, lse,
        scale * LOG2E, psize, window or NO_WINDOW,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1), *part_out.stride()[:3], *part_lse.stride()[:2],
        lse.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)) if use_dot else 1,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), PAGE=page, BLOCK_N=tile_tokens(d, k_cache),
        USE_DOT=use_dot, UPCAST=upcast, DOT_PRECISION=precision, SPLIT=split,
        WRITE_LSE=return_lse, num_warps=8 if arch.is_sm8x(arch.capability(q.device)) else 4)
    if split:
        _decode_reduce_kernel[(b, heads)](
            part_out, part_lse, context_lens, out, lse, psize, window or NO_WINDOW,
            *part_out.stride()[:3], *part_lse.stride()[:2], out.stride(0), out.stride(1), lse.stride(0),
            HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_P=BLOCK_P, WRITE_LSE=return_lse, num_warps=4)
    return (out, lse) if return_lse else out
