"""What the Triton attention kernels share: the paged K/V tile loop and the log-sum-exp merge of partials.

`attend_pages` is the inner loop of both paged decode (`decode.py`) and the cascade prefix pass
(`cascade.py`): they differ only in which query rows they bring (one sequence's GQA group, or a group's
members x its GQA heads) and which block list they walk. `merge_partitions` folds split-K partial results
into one, for decode's reduce and cascade's prefix + suffix merge.
Triton inlines `@triton.jit` helpers into the kernels that call them, so sharing costs nothing on a GPU;
in the CPU interpreter each call costs a patch of `triton.language` (~0.2 ms), so the helpers hold whole
loops and are called once per program, never per tile.
Scores are kept in log2 units (the scale folds in log2(e)), so the softmax uses exp2.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side: folded into the kernels' score scale, so scores are in log2 units
# back to natural-log units in a kernel; a kernel may read only tl.constexpr globals (the compiler rejects a
# plain float with a NameError, the interpreter does not check)
LN2 = tl.constexpr(0.6931471805599453)
NO_WINDOW = 1 << 30  # the window a kernel gets when there is none: past any context, so no key is masked by it


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter, whose bfloat16 arithmetic is broken."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_inputs(q: torch.Tensor, kv: torch.Tensor, use_dot: bool = True) -> tuple[bool, str]:
    """`attend_pages`' (UPCAST, DOT_PRECISION): compiled dots take q and K/V in their own dtype when both
    are one half dtype (float32 accumulation); float32, mixed dtypes, the multiply-sum path and the
    interpreter (broken bfloat16) upcast to float32 after the load and multiply in full precision."""
    half = use_dot and not interpreting() and q.dtype == kv.dtype and kv.dtype != torch.float32
    return not half, "tf32" if half else "ieee"


@triton.jit
def attend_pages(acc, l_i, m_i, q, k_head, v_head, table, start, end, qk_scale,
                 stride_kn, stride_kr, stride_vn, stride_vr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                 USE_DOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold keys [start, end) of one KV head into the online softmax (acc, l_i, m_i) of q's rows.

    q [R, BLOCK_D] holds every query row that reads this KV head; key t lives in row t % PAGE of block
    table[t // PAGE] (k_head/v_head: the pools offset to the head). Tiles of BLOCK_N keys may span pages.
    USE_DOT: scores and P.V as `tl.dot` (R >= 16); else a float32 multiply-sum (one row, no padding).
    UPCAST: K/V go to float32 after the load (q is then float32 too). Rows of q that are padding should be
    0: their scores are then finite, so no row's max is -inf and the state never turns NaN.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for n0 in tl.range(start, end, BLOCK_N):
        tok = n0 + offs_n
        t_mask = tok < end
        kv_mask = t_mask[:, None] & d_mask[None, :]
        # each token finds its page, so a tile may span pages and partitions need not align to them
        blk = tl.load(table + tok // PAGE, mask=t_mask, other=0).to(tl.int64)
        row = (tok % PAGE).to(tl.int64)
        k = tl.load(k_head + (blk * stride_kn + row * stride_kr)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if USE_DOT:
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # masked rows must load as 0, not whatever the pool holds there: 0 * NaN is NaN
        v = tl.load(v_head + (blk * stride_vn + row * stride_vr)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if USE_DOT:
            if UPCAST:
                v = v.to(tl.float32)
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def merge_partitions(acc, l, m, out_row, lse_row, stride_p, num_parts,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Fold the partial results of one (row, head) into a running merge: acc [BLOCK_D] and l, m (float32
    scalars) hold sum_p 2^(lse_p - m) o_p and sum_p 2^(lse_p - m); the result is acc / l, its log-sum-exp
    m + log2(l). Partition p < num_parts has the normalized output out_row + p * stride_p and lse_row[p]
    (log2 units); -inf marks a partition never written, whose output is not read (0 * NaN is NaN).
    The first chunk of BLOCK_P partitions, or the state passed in, must hold a finite lse."""
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for p0 in tl.range(0, num_parts, BLOCK_P):
        parts = p0 + offs_p
        lse = tl.load(lse_row + parts, mask=parts < num_parts, other=float("-inf"))
        o = tl.load(out_row + parts[:, None] * stride_p + offs_d[None, :],
                    mask=(lse > float("-inf"))[:, None] & d_mask[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        l = l * alpha + tl.sum(w, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        m = m_new
    return acc, l, m
