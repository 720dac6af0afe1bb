"""Plain-torch reference kernels: the test oracle for every fast kernel and the CPU path.

Layout conventions shared by all backends:
- activations are flat over the ragged batch: `[num_tokens, heads, head_dim]`, no padding;
- a KV pool is `[num_blocks, block_size, kv_heads, head_dim]`; a sequence's token at position p
  lives in block `block_tables[s, p // block_size]`, row `p % block_size`;
- `context_lens[s]` counts every token of sequence s whose K/V is in the pool, the new ones included
  (K/V are stored before attention runs);
- `window` (attention): a query at position p sees keys p - window + 1 .. p (a sliding window, Mistral's and Gemma's
  local layers; transformers' `kv_idx > q_idx - sliding_window`); 0 sees the whole causal context.
Everything works in any float dtype, float64 included, so tests can compute an exact oracle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sot_engine.kernels.weights import (Bf16MatmulWeight, Int8Weight, Q4Weight, Weight, int8_precision,
                                        quantize_activations_int8)


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T for any weight storage (`kernels.weights`): the weights are widened (dequantized)
    to x's dtype (at bf16 precision x is first rounded to bf16), then F.linear."""
    if int8_precision(w):  # int8 precision: x quantized per 32 of a row too
        xd = Int8Weight(*quantize_activations_int8(x.reshape(-1, x.shape[-1]))).dequantize(x.dtype)
        return F.linear(xd.view(x.shape), w.dequantize(x.dtype))
    if isinstance(w, (Int8Weight, Q4Weight)):
        return F.linear(x, w.dequantize(x.dtype))
    if isinstance(w, Bf16MatmulWeight):  # x rounded to bf16 too: exact products, sums in x's dtype
        return F.linear(x.to(torch.bfloat16).to(x.dtype), w.w.to(x.dtype))
    return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation on the fused gate/up output: silu(x[..., :F]) * x[..., F:]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_mul(x: torch.Tensor) -> torch.Tensor:
    """Gemma's gated activation on the fused gate/up output: gelu(x[..., :F], tanh approximation) * x[..., F:]."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA RMSNorm; statistics in float32 (or float64), like HF, then cast back."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x if x.dtype == acc else x.to(acc)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf if xf.dtype == x.dtype else xf.to(x.dtype))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: returns (norm(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the HF (rotate-half) convention. x: [T, H, D]; cos/sin: [T, D/2] for x's positions."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c = cos.unsqueeze(1).to(x.dtype)
    s = sin.unsqueeze(1).to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new K/V ([T, kv_heads, D]) into their pool slots (slot = block * block_size + row)."""
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` K (or V) rows from the pool: [length, kv_heads, D]."""
    bs = cache.shape[1]
    nblk = (length + bs - 1) // bs
    return cache[block_table[:nblk]].flatten(0, 1)[:length]


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor:
    """Causal attention of packed new tokens over each sequence's paged context (within `window`, if any).

    Sequence s owns queries `q[cu_seqlens_q[s]:cu_seqlens_q[s+1]]`, the last tokens of its
    `context_lens[s]` (a cached prefix, e.g. a forked one, then the new tokens).
    """
    out = torch.empty_like(q)
    heads, kvh = q.shape[1], k_cache.shape[2]
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for s in range(len(lens)):
        qs = q[cu[s]:cu[s + 1]]
        n_new, ctx = qs.shape[0], lens[s]
        if n_new == 0:
            continue
        k = gather_kv(k_cache, block_tables[s], ctx).to(q.dtype)
        v = gather_kv(v_cache, block_tables[s], ctx).to(q.dtype)
        if kvh != heads:
            k = k.repeat_interleave(heads // kvh, dim=1)
            v = v.repeat_interleave(heads // kvh, dim=1)
        # query i sits at position ctx - n_new + i and sees keys 0..that position
        qpos = torch.arange(ctx - n_new, ctx, device=q.device)[:, None]
        key = torch.arange(ctx, device=q.device)[None, :]
        mask = key <= qpos
        if window:
            mask &= key > qpos - window
        o = F.scaled_dot_product_attention(qs.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale)
        out[cu[s]:cu[s + 1]] = o.transpose(0, 1)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, max_context_len: int | None = None, window: int = 0) -> torch.Tensor:
    """One query per sequence over its paged context (its last `window` keys, if any): q [B, H, D] -> [B, H, D].

    Gathers the whole batch's blocks at once (padded to the longest context, padding masked out),
    so the cost in Python is a handful of ops per layer whatever the batch size.
    `max_context_len` (optional) spares a device-to-host read per call.
    """
    b, heads, d = q.shape
    kvh, bs = k_cache.shape[2], k_cache.shape[1]
    max_len = max_context_len or int(context_lens.max())
    nblk = (max_len + bs - 1) // bs
    tables = block_tables[:, :nblk]
    acc = torch.promote_types(q.dtype, torch.float32)  # half inputs: accumulate in float32
    k = k_cache[tables].view(b, nblk * bs, kvh, d).to(acc)  # [B, L, KVH, D]
    v = v_cache[tables].view(b, nblk * bs, kvh, d).to(acc)
    qg = q.view(b, kvh, heads // kvh, d).to(acc)  # the query heads that share one KV head
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k).mul_(scale)
    key = torch.arange(nblk * bs, device=q.device)[None, :]
    pad = key >= context_lens[:, None]
    if window:
        pad |= key < context_lens[:, None] - window
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bkgl,blkd->bkgd", probs, v).reshape(b, heads, d).to(q.dtype)


def rope_store_decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                                v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, scale: float,
                                max_context_len: int | None = None, window: int = 0) -> torch.Tensor:
    """The decode half of a layer's attention: one new token per sequence, qkv [B, (H + 2 KVH) * D] as the fused
    matmul leaves it. RoPE on its q and k heads, k and v stored at `slot_mapping`, paged decode attention ->
    [B, H * D]. (The engine calls a backend's fused version of it; backends without one run the three kernels.)"""
    b, (kvh, d) = qkv.shape[0], k_cache.shape[2:]
    h = qkv.shape[1] // d - 2 * kvh
    qkv = qkv.view(b, h + 2 * kvh, d)
    qk = apply_rope(qkv[:, :h + kvh], cos, sin)
    store_kv(qk[:, h:], qkv[:, h + kvh:], k_cache, v_cache, slot_mapping)
    return paged_decode_attention(qk[:, :h], k_cache, v_cache, block_tables, context_lens, scale,
                                  max_context_len, window).reshape(b, h * d)
