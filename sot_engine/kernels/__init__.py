"""Kernel backends behind one interface, so a reader can swap or compare them.

A backend is a bundle of functions with the signatures of `kernels.reference`. The engine asks
`get_backend(name, device)`; `None` picks the first backend in `DEFAULT_ORDER` for the device whose
toolchain is installed. Backends register here under their own names with a lazy factory, so a
missing optional toolchain (triton, a C++ build) only matters when that backend is asked for.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from sot_engine.kernels import cascade, reference


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    rms_norm: Callable
    add_rms_norm: Callable
    apply_rope: Callable
    store_kv: Callable
    paged_prefill_attention: Callable
    paged_decode_attention: Callable
    # shared-prefix decode, signature of `kernels.cascade.cascade_decode_attention`; None: not offered
    cascade_decode_attention: Callable | None = None
    # weight matmul `linear(x [M, K], w) -> [M, N]` for w in any `kernels.weights` storage; None: the reference
    linear: Callable | None = None
    # `pack_weight(w) -> w'`: a weight matrix in the layout this backend's `linear` reads fastest (the same values;
    # `kernels.weights.pack`), applied once when the model is built; None: as stored
    pack_weight: Callable | None = None
    # SwiGLU activation `silu_mul(x [T, 2F]) -> [T, F]`; None: the reference
    silu_mul: Callable | None = None
    # the decode half of a layer's attention in one call, signature of `kernels.cpp.rope_store_decode_attention`
    # (RoPE on the fused qkv's q/k heads, K/V stored, paged decode attention); None: those three kernels in turn
    rope_store_decode_attention: Callable | None = None
    # the decode step's whole layer loop in one call, signature of `kernels.cpp.decode_layers`: built once for a
    # model's weights and KV pool, returns `step(x, cos, sin, slot_mapping, block_tables, context_lens) -> hidden`
    # (None where it does not apply); None: the model's loop over the functions above
    decode_layers: Callable | None = None


class BackendUnavailable(ValueError):
    """The backend cannot run here (toolchain missing, wrong device); `get_backend(None, ...)` skips it."""


def _torch_backend(device: str) -> Backend:
    return Backend(
        name="torch",
        rms_norm=reference.rms_norm,
        add_rms_norm=reference.add_rms_norm,
        apply_rope=reference.apply_rope,
        store_kv=reference.store_kv,
        paged_prefill_attention=reference.paged_prefill_attention,
        paged_decode_attention=reference.paged_decode_attention,
        cascade_decode_attention=cascade.cascade_decode_attention,
    )


def _triton_backend(device: str) -> Backend:
    if importlib.util.find_spec("triton") is None:
        raise BackendUnavailable("kernel backend 'triton' is unavailable: triton is not installed "
                                 "(pip install triton)")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # without it triton looks for a GPU driver at the first kernel launch, deep in a forward pass
        raise BackendUnavailable("kernel backend 'triton' on CPU runs only in Triton's interpreter: set "
                                 "TRITON_INTERPRET=1 before triton is imported (for tests; far too slow to serve)")
    from sot_engine.kernels.triton import triton_backend
    return triton_backend()


def _cpp_backend(device: str) -> Backend:
    if device != "cpu":
        raise BackendUnavailable(f"kernel backend 'cpp' runs on CPU only, not {device!r}")
    from sot_engine.kernels.cpp import cpp_backend  # raises BackendUnavailable when the extension is not built
    return cpp_backend()


def _cuda_backend(device: str) -> Backend:
    if device != "cuda":
        raise BackendUnavailable(f"kernel backend 'cuda' runs on CUDA GPUs only, not {device!r}")
    from sot_engine.kernels.cuda import cuda_backend  # raises BackendUnavailable: no GPU, no build, no nvcc to build it
    return cuda_backend()


# name -> factory(device type); factories import lazily and raise BackendUnavailable when they cannot run
BACKENDS: dict[str, Callable[[str], Backend]] = {"torch": _torch_backend, "triton": _triton_backend,
                                                   "cpp": _cpp_backend, "cuda": _cuda_backend}
# preference order per device type when the user names no backend: the first available one wins.
# CPU: the C++ kernels when built (else torch, with a warning); Triton there is its interpreter, a test vehicle.
# CUDA: Triton; the hand-written "cuda" decode kernel (csrc/cuda) is asked for by name until numbers say otherwise.
DEFAULT_ORDER: dict[str, list[str]] = {"cpu": ["cpp", "torch"], "cuda": ["triton", "torch"]}


def available_backends() -> list[str]:
    return list(BACKENDS)


def get_backend(name: str | None, device: torch.device | str) -> Backend:
    """The backend `name` (ValueError if unknown or unable to run here), or with `None` the first one in
    the device's `DEFAULT_ORDER` that can run."""
    dev = torch.device(device).type
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown kernel backend {name!r}; available: {', '.join(BACKENDS)}")
        return BACKENDS[name](dev)
    skipped = []
    for candidate in DEFAULT_ORDER.get(dev, ["torch"]):
        try:
            backend = BACKENDS[candidate](dev)
        except BackendUnavailable as e:
            skipped.append(str(e))
            continue
        break
    else:
        backend = _torch_backend(dev)
    if skipped:  # a preferred backend could not run: say so once, then run on the next one
        warnings.warn(f"using kernel backend {backend.name!r}: " + "; ".join(skipped), RuntimeWarning, stacklevel=2)
    return backend
