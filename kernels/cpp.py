"""The "cpp" backend: C++ CPU kernels from csrc/cpu (module `kernels._cpp`, built by setup.py).

Weight matmuls (`linear`) and paged decode attention run in C++ for float32; everything else, and
any other dtype, is the torch reference. Importing this module raises BackendUnavailable when the
extension was not built.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from kernels import BACKENDS, Backend, BackendUnavailable, reference

try:
    from kernels import _cpp
except ImportError as e:  # not built: no compiler, torch missing at build time, or a failed build
    raise BackendUnavailable(
        f"kernel backend 'cpp' is unavailable: the C++ extension kernels._cpp is not built ({e}); "
        "rebuild with `pip install -e . --no-build-isolation` (torch must be installed first)") from e


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, max_context_len: int | None = None) -> torch.Tensor:
    """`kernels.reference.paged_decode_attention`, in C++ for float32 CPU tensors."""
    if (q.dtype == torch.float32 and k_cache.dtype == torch.float32 and v_cache.dtype == torch.float32
            and q.device.type == "cpu" and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return _cpp.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                           max_context_len)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                            max_context_len)


def cpp_backend() -> Backend:
    """The torch backend with the C++ decode attention and weight matmul swapped in."""
    return replace(BACKENDS["torch"]("cpu"), name="cpp", paged_decode_attention=paged_decode_attention,
                   linear=_cpp.linear)  # _cpp.linear falls back to at::linear outside its fp32 / few-rows case
