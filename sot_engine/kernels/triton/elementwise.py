"""Triton row kernels: RMSNorm, fused add + RMSNorm, RoPE and the KV-pool store.

Each is memory-bound, so one program per token reads its row once, keeps it in registers and writes
each output once (BLOCK = the row padded to a power of two, masked). Statistics and rotations run in
float32; values are rounded to the input dtype where the reference (and HF) round them, so half
precision matches `kernels.reference` up to summation order. Every function has the reference
signature and, like it, returns fresh tensors: nothing the caller passed in is modified except the
KV pool by `store_kv`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _num_warps(block: int) -> int:
    """Enough warps that each thread holds a few elements of the row, capped at 8."""
    return min(max(block // 256, 1), 8)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, hidden] with unit column stride (a strided row view is fine, no copy)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                     stride_x, stride_r, stride_o, stride_ro, n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # the new residual is x + residual rounded to its dtype; the norm sees that rounded sum
        s = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    # HF rounds the normalized row to the activation dtype before the weight multiply
    y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One kernel for both norms: (norm(x [+ residual]), x + residual or None)."""
    x2 = _rows(x)
    r2 = x2 if residual is None else _rows(residual)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = out if residual is None else torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        n = x2.shape[1]
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0),
                                         out.stride(0), res_out.stride(0), n, eps,
                                         HAS_RESIDUAL=residual is not None, BLOCK=block,
                                         num_warps=_num_warps(block))
    return out.view(x.shape), None if residual is None else res_out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA RMSNorm over the last dim; statistics in float32, output in x's dtype."""
    return _launch_norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: returns (norm(x + residual), x + residual) from one pass.

    Out of place: the new residual is a fresh tensor (the same traffic as updating it in place, and
    callers may still hold the old one, e.g. the embedding output or a test's oracle input).
    """
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    return _launch_norm(x, residual, weight, eps)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, stride_ct, stride_st,
                 stride_ot, stride_oh, n_heads, half,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < half
    mask = (h < n_heads) & dmask
    dtype = out_ptr.dtype.element_ty
    # cos/sin rounded to x's dtype first, as HF (and the reference) do, then math in float32
    c = tl.load(cos_ptr + t * stride_ct + d, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_st + d, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    src = x_ptr + t * stride_xt + h * stride_xh + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + t * stride_ot + h * stride_oh + d
    tl.store(dst, (x1 * c - x2 * s).to(dtype), mask=mask)
    tl.store(dst + half, (x2 * c + x1 * s).to(dtype), mask=mask)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, HF rotate-half convention. x: [T, H, D] (any token/head strides); cos/sin: [T, D/2].

    Returns a new contiguous [T, H, D]; x is not modified (the model passes a view of its fused qkv).
    """
    t, heads, d = x.shape
    if d % 2 or cos.shape != (t, d // 2) or sin.shape != (t, d // 2):
        raise ValueError(f"rope: x {tuple(x.shape)} needs cos/sin of shape ({t}, {d // 2}), "
                         f"got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    out = torch.empty((t, heads, d), dtype=x.dtype, device=x.device)
    if t:
        bh, bd = triton.next_power_of_2(heads), triton.next_power_of_2(d // 2)
        _rope_kernel[(t,)](x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                           out.stride(0), out.stride(1), heads, d // 2,
                           BLOCK_H=bh, BLOCK_D=bd, num_warps=_num_warps(bh * bd))
    return out


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cr, stride_ch,
                     block_size, n_heads, head_dim,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    heads = tl.where(slot >= 0, n_heads, 0)  # slot -1: a padding token, nothing stored
    mask = (h < heads) & (d < head_dim)
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cr + h * stride_ch + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new K/V ([T, kv_heads, D], any token/head strides) into their pool slots, in place.

    slot = block * block_size + row; a slot of -1 skips its token (vLLM's convention for padding),
    where the reference would fail. Slots are not range-checked on the device: the caller (the block
    manager) owns them. Values are cast to the pool's dtype.
    """
    t, kvh, d = k.shape
    if v.shape != k.shape or k_cache.shape != v_cache.shape or k_cache.shape[2:] != (kvh, d):
        raise ValueError(f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)} do not fit pools "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("store_kv: K and V pools need the same strides, unit along head_dim")
    if slot_mapping.shape != (t,):
        raise ValueError(f"store_kv: slot_mapping {tuple(slot_mapping.shape)} needs one slot per token ({t})")
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    slot_mapping = slot_mapping.contiguous()
    if t:
        bh, bd = triton.next_power_of_2(kvh), triton.next_power_of_2(d)
        _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping,
                               k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                               k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                               k_cache.shape[1], kvh, d,
                               BLOCK_H=bh, BLOCK_D=bd, num_warps=_num_warps(bh * bd))
