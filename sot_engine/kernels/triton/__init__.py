"""Triton kernels with the signatures of `kernels.reference`; on CPU they run in Triton's interpreter.

The GPU path: the elementwise kernels (`elementwise.py`: RMSNorm, fused add + RMSNorm, RoPE, KV store)
are one program per token, each reading its row once; the attention kernels (`decode.py`, `prefill.py`)
read K/V straight from the paged pool through the block tables.
Every kernel accumulates in float32 and stores in the activation dtype.

On a machine without CUDA, the same code runs in Triton's interpreter (`TRITON_INTERPRET=1`, set before
triton is imported), which is how the tests check it against the torch reference: exact enough for
token-for-token agreement, far too slow to serve, so `get_backend` never picks it by default on CPU.
"""
from __future__ import annotations

from sot_engine.kernels import Backend


def triton_backend() -> Backend:
    """The Triton kernels as a `Backend`; imported here, so importing `kernels` never needs triton."""
    from sot_engine.kernels.triton.cascade import cascade_decode_attention
    from sot_engine.kernels.triton.decode import paged_decode_attention
    from sot_engine.kernels.triton.elementwise import add_rms_norm, apply_rope, rms_norm, store_kv
    from sot_engine.kernels.triton.prefill import paged_prefill_attention
    return Backend(
        name="triton",
        rms_norm=rms_norm,
        add_rms_norm=add_rms_norm,
        apply_rope=apply_rope,
        store_kv=store_kv,
        paged_prefill_attention=paged_prefill_attention,
        paged_decode_attention=paged_decode_attention,
        cascade_decode_attention=cascade_decode_attention,
    )
