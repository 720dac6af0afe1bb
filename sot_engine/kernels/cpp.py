"""The "cpp" backend: C++ CPU kernels from csrc/cpu (module `sot_engine.kernels._cpp`, built by setup.py).

Weight matmuls (`linear`, for float32 / bfloat16 / int8 weight storage, and bf16 precision on AMX), paged
decode and prefill attention over float32 or bfloat16 pools (decode also fused with RoPE and the KV store; shared
prefixes read once for all their sequences), RMSNorm, RoPE, the KV store and the SwiGLU activation run in C++ for
float32 activations, and a plain decode step runs its whole layer loop in one call (`decode_layers`); any other
dtype is the torch reference. Importing this module raises BackendUnavailable when the extension was not built.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from sot_engine.kernels import BACKENDS, Backend, BackendUnavailable, reference
from sot_engine.kernels.weights import (Bf16MatmulWeight, Int8Weight, PackedWeight, Q4Weight, Weight, int8_precision,
                                        pack)

try:
    from sot_engine.kernels import _cpp
except ImportError as e:  # not built: no compiler, torch missing at build time, or a failed build
    raise BackendUnavailable(
        f"kernel backend 'cpp' is unavailable: the C++ extension sot_engine.kernels._cpp is not built ({e}); "
        "rebuild with `pip install -e . --no-build-isolation` (torch must be installed first)") from e

F32 = torch.float32
KV_DTYPES = (torch.float32, torch.bfloat16)  # pools the C++ attention reads (bf16 widened exactly)


def _pools_ok(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    return k_cache.dtype in KV_DTYPES and v_cache.dtype == k_cache.dtype and k_cache.is_contiguous() \
        and v_cache.is_contiguous()


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """`kernels.reference.linear`; the C++ kernel for float32 x and up to _cpp.MAX_ROWS rows, else at::linear on
    the widened weights (in C++ too)."""
    if int8_precision(w):  # integer dot products, any number of rows
        if x.dtype != F32 or x.dim() != 2:
            return reference.linear(x, w)
        if isinstance(w, PackedWeight):
            return (_cpp.linear_q4 if w.q.dtype == torch.uint8 else _cpp.linear_int8)(x, w.q, w.scale)
        return _cpp.linear_q4(x, w.q, w.scale_min) if isinstance(w, Q4Weight) else _cpp.linear_int8(x, w.q, w.scale)
    if isinstance(w, Int8Weight):
        return _cpp.linear(x, w.q, w.scale)
    if isinstance(w, Bf16MatmulWeight):  # any number of rows: on AMX prefill is compute-cheap too
        return _cpp.linear_bf16(x, w.w) if x.dtype == F32 else reference.linear(x, w)
    return _cpp.linear(x, w)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == F32 and weight.dtype == F32:
        return _cpp.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype == F32 and residual.dtype == F32 and weight.dtype == F32:
        return _cpp.add_rms_norm(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if x.dtype == F32 and cos.dtype == F32 and sin.dtype == F32:
        return _cpp.apply_rope(x, cos, sin)
    return reference.apply_rope(x, cos, sin)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    if k.dtype == v.dtype == k_cache.dtype == v_cache.dtype == F32:
        return _cpp.store_kv(k, v, k_cache, v_cache, slot_mapping)
    return reference.store_kv(k, v, k_cache, v_cache, slot_mapping)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    return _cpp.silu_mul(x) if x.dtype == F32 and x.dim() == 2 else reference.silu_mul(x)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, max_context_len: int | None = None, window: int = 0) -> torch.Tensor:
    """`kernels.reference.paged_decode_attention`, in C++ for float32 queries over float32 or bfloat16 pools."""
    if q.dtype == F32 and _pools_ok(k_cache, v_cache):
        return _cpp.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                           max_context_len, window)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                            max_context_len, window)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            scale: float, window: int = 0) -> torch.Tensor:
    """`kernels.reference.paged_prefill_attention`, in C++ for float32 queries over float32 or bfloat16 pools:
    no per-sequence gather of the context and no repeated K/V heads."""
    if q.dtype == F32 and _pools_ok(k_cache, v_cache):
        return _cpp.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                            window)
    return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                             window)


def rope_store_decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                                v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, scale: float, max_context_len: int | None = None,
                                window: int = 0) -> torch.Tensor:
    """`kernels.reference.rope_store_decode_attention` as one C++ call for float32: what a decode step does per
    layer between two matmuls, without the Python-side views and calls of three kernels."""
    if qkv.dtype == F32 and cos.dtype == F32 and _pools_ok(k_cache, v_cache):
        return _cpp.rope_store_decode_attention(qkv, cos, sin, k_cache, v_cache, slot_mapping, block_tables,
                                                context_lens, scale, window)
    return reference.rope_store_decode_attention(qkv, cos, sin, k_cache, v_cache, slot_mapping, block_tables,
                                                 context_lens, scale, max_context_len, window)


class DecodeStep:
    """`_cpp.DecodeLayers` for one model and KV pool: a plain decode step's every layer in one C++ call (one
    OpenMP region, the GIL released), instead of ~10 Python-level kernel calls a layer."""

    def __init__(self, fused: "_cpp.DecodeLayers") -> None:
        self.fused = fused

    @property
    def matmul_seconds(self) -> float:
        """Wall time spent in its weight matmuls so far (benchmarks.decode_cpu reads it)."""
        return self.fused.matmul_seconds

    @property
    def attention_seconds(self) -> float:
        """Wall time spent in its RoPE + KV store + attention phases so far (benchmarks.attention_cpu reads it)."""
        return self.fused.attention_seconds

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor | None:
        """Final-normed hidden states [B, hidden] of the embeddings x [B, hidden], or None outside its case:
        more rows than the matmul kernel serves (MKL then does better), or x not float32."""
        if x.dtype != F32 or not 0 < x.shape[0] <= _cpp.MAX_ROWS:
            return None
        return self.fused(x.contiguous(), cos.contiguous(), sin.contiguous(), slot_mapping, block_tables,
                          context_lens)


def decode_layers(layers: list[tuple], norm: torch.Tensor, kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
                  num_heads: int, eps: float, scale: float, windows: list[int] | None = None) -> DecodeStep | None:
    """The whole decode layer loop for these weights (`LlamaModel.layers`: ln1, wqkv, wo, ln2, wgate_up, wdown per
    layer; `windows`: each layer's attention window, 0 or None the whole context) and KV pool, or None where it
    cannot run it: activations or norms not float32, a pool neither float32
    nor bfloat16, or a weight storage the kernel does not read."""
    ln1, ln2, mats, scales = [], [], [], []
    bf16_act = isinstance(layers[0][1], Bf16MatmulWeight)
    int8_act = int8_precision(layers[0][1])
    for a, wqkv, wo, b, wgu, wdown in layers:
        ln1.append(a)
        ln2.append(b)
        for w in (wqkv, wo, wgu, wdown):
            if isinstance(w, Bf16MatmulWeight) != bf16_act or int8_precision(w) != int8_act:
                return None  # one precision for the whole loop (int8 and 4-bit weights may mix)
            if isinstance(w, PackedWeight):
                q, sc = w.q, w.scale
            elif isinstance(w, Q4Weight):
                q, sc = w.q, w.scale_min
            elif isinstance(w, Int8Weight):
                q, sc = w.q, w.scale
            else:
                q, sc = (w.w if bf16_act else w), None
            if q.dtype not in (F32, torch.bfloat16, torch.int8, torch.uint8) or not q.is_contiguous():
                return None
            mats.append(q)
            scales.append(sc)
    if norm.dtype != F32 or any(t.dtype != F32 for t in ln1 + ln2) or not all(_pools_ok(k, v) for k, v in kv_cache) \
            or len({k.dtype for k, _ in kv_cache}) != 1:
        return None
    return DecodeStep(_cpp.DecodeLayers(ln1, ln2, mats, scales, norm, [k for k, _ in kv_cache],
                                        [v for _, v in kv_cache], num_heads, eps, scale, bf16_act,
                                        list(windows or []), int8_act))


def cpp_backend() -> Backend:
    """The torch backend with the C++ kernels swapped in (each falls back to the reference outside float32)."""
    return replace(BACKENDS["torch"]("cpu"), name="cpp", linear=linear, pack_weight=pack, silu_mul=silu_mul,
                   rms_norm=rms_norm,
                   add_rms_norm=add_rms_norm, apply_rope=apply_rope, store_kv=store_kv,
                   paged_decode_attention=paged_decode_attention, paged_prefill_attention=paged_prefill_attention,
                   rope_store_decode_attention=rope_store_decode_attention, decode_layers=decode_layers)
