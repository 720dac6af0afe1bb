"""Varlen prefill/extend attention over a paged KV pool (FlashAttention-2 style), in Triton.

Same contract as `kernels.reference.paged_prefill_attention`: the new tokens of many sequences are
packed flat, each sequence's K/V (a cached prefix, e.g. a forked one, then its new tokens) is
already in the pool, and new token i of sequence s sits at position ctx - n_new + i.

Design:
- One program per (query tile, KV head). A tile packs BLOCK_M // G consecutive new tokens of one
  sequence times the G query heads that share the KV head (row r = token r // G, head r % G), so
  every K/V tile gathered from the pool serves all G heads. For long prefills this costs the same
  as one program per query head; for short extends and decode-like steps it does G times fewer
  K/V reads and wastes fewer rows (1 token x G heads fill G rows instead of 1).
- Tiles are listed on the host by a few torch ops (no per-token Python, no device-to-host sync):
  a [grid, 2] int32 table of (sequence, first new token), sized by an upper bound; unused entries
  say -1 and their programs return at once. Sequences with no new tokens get no tile.
- K/V are gathered token by token through the block table (like vLLM's prefix-prefill kernel), so
  any block size works; BLOCK_N is the context tile, a multiple of the block size when that is a
  power of two up to BLOCK_N.
- The context walk stops at the tile's last query position (tiles above the causal diagonal are
  never visited) and runs in phases: tiles every row sees in full, with no masks at all, then
  the few tiles that straddle the diagonal (or the context end), masked. With a sliding window it
  starts at the tile's first row's first key (keys before are never read), and the keys some rows
  see and others do not (the window's trailing edge) come first, masked.
- Online softmax in fp32 with exp2 (scale * log2 e folded into one multiply); tl.dot takes the
  input dtype (fp16/bf16 on GPU, fp32 accumulate), except bf16 in Triton's CPU interpreter, whose
  bf16 arithmetic is broken: there the tiles are upcast to fp32 after loading.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sot_engine.kernels.triton import arch
from sot_engine.kernels.triton.attention import LOG2E, NO_WINDOW, interpreting


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, ctx, first_key, lo, hi, window,
                  stride_kb, stride_kr, stride_vb, stride_vr, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold the key tiles from lo up to hi into the running (acc, l, m): whole tiles of BLOCK_N from lo, the last
    one overrunning hi unless hi - lo is a multiple. MASKED applies the causal, window and length masks (a row at
    position pos sees keys pos - window < key <= pos) and loads only keys in [first_key, ctx)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        key = start + offs_n
        if MASKED:
            # never read past the context (the rest of a partial block is stale) or before every row's window
            in_ctx = (key < ctx) & (key >= first_key)
            blk = tl.load(table + key // BLOCK_SIZE, mask=in_ctx, other=0).to(tl.int64)
        else:
            blk = tl.load(table + key // BLOCK_SIZE).to(tl.int64)
        row = (key % BLOCK_SIZE).to(tl.int64)
        k_off = blk * stride_kb + row * stride_kr
        v_off = blk * stride_vb + row * stride_vr
        if MASKED:
            kt = tl.load(k_base + k_off[None, :] + offs_d[:, None], mask=in_ctx[None, :], other=0.0)
            v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=in_ctx[:, None], other=0.0)
        else:
            kt = tl.load(k_base + k_off[None, :] + offs_d[:, None])
            v = tl.load(v_base + v_off[:, None] + offs_d[None, :])
        s = tl.dot(q, kt.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] fp32, log2 units
        if MASKED:
            s = tl.where((key[None, :] <= pos[:, None]) & (key[None, :] > pos[:, None] - window), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, cu_ptr, ctx_ptr, tiles_ptr, qk_scale, window,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_kr, stride_kh, stride_vb, stride_vr, stride_vh, stride_tb,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    if seq < 0:  # padding entry of the upper-bound grid
        return
    t0 = tl.load(tiles_ptr + 2 * tile + 1)
    q_lo = tl.load(cu_ptr + seq).to(tl.int32)
    n_new = tl.load(cu_ptr + seq + 1).to(tl.int32) - q_lo
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)

    TOKENS: tl.constexpr = BLOCK_M // GROUP
    rows = tl.arange(0, BLOCK_M)
    tok = t0 + rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = (rows < TOKENS * GROUP) & (tok < n_new)
    pos = ctx - n_new + tok  # each row attends to keys pos - window + 1 .. pos
    offs_d = tl.arange(0, HEAD_DIM)
    q_off = (q_lo + tok).to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # finite start: a row may meet a tile it sees none of (the window's trailing edge) before any key it
    # sees; with -inf there, -inf - -inf would be NaN
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh
    first = ctx - n_new + t0  # position of the tile's first token: keys up to it are seen by all
    last = ctx - n_new + tl.minimum(t0 + TOKENS, n_new) - 1
    # three runs of whole key tiles: masked ones that only some rows' windows reach (from the tile holding the
    # first row's first key), unmasked ones every row sees in full, masked ones across the diagonal. Without a
    # window (window: past any context) the first run is empty and the walk starts at key 0.
    first_key = tl.maximum(first - window + 1, 0)
    lo = first_key // BLOCK_N * BLOCK_N
    full_end = (first + 1) // BLOCK_N * BLOCK_N  # tiles up to it hold no key past the first row's position
    seen_by_all = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last - window + 1, 0), BLOCK_N) * BLOCK_N, lo), full_end)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, ctx, first_key, lo, seen_by_all,
                                  window, stride_kb, stride_kr, stride_vb, stride_vr, qk_scale,
                                  BLOCK_N, HEAD_DIM, BLOCK_SIZE, True, DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, ctx, first_key, seen_by_all,
                                  full_end, window, stride_kb, stride_kr, stride_vb, stride_vr, qk_scale,
                                  BLOCK_N, HEAD_DIM, BLOCK_SIZE, False, DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, pos, k_base, v_base, table, ctx, first_key, full_end, last + 1,
                                  window, stride_kb, stride_kr, stride_vb, stride_vr, qk_scale,
                                  BLOCK_N, HEAD_DIM, BLOCK_SIZE, True, DOT_PRECISION)
    out = acc / l_i[:, None]
    o_off = (q_lo + tok).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
    tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def _tile_table(cu_seqlens_q: torch.Tensor, num_tokens: int, tokens_per_tile: int) -> torch.Tensor:
    """[(sequence, first new token)] for every query tile, -1 rows padding to a host-known bound.

    The bound, T // tile + B (each sequence adds at most one partial tile, capped at T), needs no
    device-to-host read; a program finds its sequence by a binary search over the tile counts.
    """
    b = cu_seqlens_q.numel() - 1
    n_new = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    ntiles = (n_new + tokens_per_tile - 1) // tokens_per_tile
    ends = ntiles.cumsum(0)
    grid = min(num_tokens // tokens_per_tile + b, num_tokens)
    j = torch.arange(grid, device=cu_seqlens_q.device)
    seq = torch.searchsorted(ends, j, right=True)
    valid = seq < b
    seq_c = seq.clamp(max=b - 1)
    start = (j - (ends[seq_c] - ntiles[seq_c])) * tokens_per_tile
    return torch.stack((torch.where(valid, seq, -1), torch.where(valid, start, 0)), 1).to(torch.int32)


def _launch_config(head_dim: int, group: int, block_size: int, fp32: bool,
                   cap: tuple[int, int] | None) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N keys, warps) for a GPU of compute capability `cap` (`arch.capability`; None, the
    interpreter, gets the H100's). Rows fit at least one token's whole group of query heads; a power-of-two
    page size up to BLOCK_N is covered whole.
    - sm_90 (H100): FA2-like 128 x 64 tiles; 8 warps keep a 128-wide fp32 accumulator in registers (4 at
      head_dim 64). head_dim 256 (Gemma 3) takes 128 x 32: at 128 x 64 it spills.
    - sm_8x (A100 sm_80, RTX 3090 sm_86: mma.sync layouts, which hold more per thread than wgmma's; 99 KB of
      shared memory a block on sm_86), where those spill: 8 warps at every head_dim (4 spill at head_dim 64),
      128 x 32 tiles at head_dim 128 (48 KB: two blocks an SM on sm_86, still 128 rows a K/V read), 64 x 32
      at head_dim 256 (every 128-row tile spills); float32 (exact comparisons: it spills at any size) in
      64 x 32 tiles with 4 warps, 72 KB of shared memory at head_dim 128 where 128 x 64 needs 160 KB, and
      32 x 16 at head_dim 256 (66 KB; 64 x 32 needs 136 KB), whatever the page size.
    Registers, shared memory and spills of each: `python tests/kernels/test_triton_compile.py --table`."""
    rows, keys, warps = 128, 32 if head_dim >= 256 else 64, 4 if head_dim <= 64 else 8
    if arch.is_sm8x(cap):
        if fp32:  # exact comparisons, not speed: tiles that fit whatever the page size
            rows, keys, warps = (32, 16, 4) if head_dim >= 256 else (64, 32, 4)
            return max(rows, triton.next_power_of_2(group)), keys, warps
        else:
            rows, keys, warps = 64 if head_dim >= 256 else 128, 32 if head_dim >= 128 else 64, 8
    block_m = max(rows, triton.next_power_of_2(group))
    block_n = max(keys, block_size) if block_size & (block_size - 1) == 0 else keys
    return block_m, block_n, warps


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, scale: float, window: int = 0,
                            out: torch.Tensor | None = None, *, block_m: int | None = None,
                            block_n: int | None = None) -> torch.Tensor:
    """Causal attention of packed new tokens over each sequence's paged context; see the module doc.

    q [T, H, D] (any row/head strides), caches [num_blocks, block_size, kv_heads, D], block_tables
    [B, max_blocks], cu_seqlens_q [B+1], context_lens [B]; `window` > 0: a sliding window (keys before it are
    never read), 0 the whole causal context. `out` (like q) is written in place if
    given; `block_m`/`block_n` override the tile sizes (tests use them to force many tiles).
    """
    t, heads, d = q.shape
    _, bs, kvh, dk = k_cache.shape
    if dk != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match q's head dim {d}")
    if heads % kvh:
        raise ValueError(f"{heads} query heads are not a multiple of {kvh} KV heads")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim {d} must be a power of two >= 16")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV caches need a contiguous head_dim")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must have q's shape and dtype and a contiguous head_dim")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: the whole context), got {window}")
    if t == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    group = heads // kvh
    bm, bn, warps = _launch_config(d, group, bs, q.dtype == torch.float32, arch.capability(q.device))
    bm, bn = block_m or bm, block_n or bn
    if bm < group or bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"tiles {bm} x {bn} must be powers of two >= 16 (tl.dot), block_m >= {group} heads")
    tiles = _tile_table(cu_seqlens_q, t, bm // group)
    upcast = interpreting() and torch.bfloat16 in (q.dtype, k_cache.dtype, v_cache.dtype)
    _prefill_kernel[(tiles.shape[0], kvh)](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens, tiles, scale * LOG2E,
        window or NO_WINDOW, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d, BLOCK_SIZE=bs, UPCAST=upcast,
        # fp32 activations (tests, exact comparisons) get full-precision dots, not tf32
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=2)
    return out
