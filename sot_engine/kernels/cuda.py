"""The "cuda" backend: the Triton backend with paged decode attention swapped for the hand-written CUDA
kernel of csrc/cuda (module `sot_engine.kernels._cuda`), a second GPU implementation to compare and experiment with.

The module is the one setup.py built (when torch has CUDA and nvcc was found at install time) or, when
that is missing, compiled on first use by torch's JIT loader into a cache folder: about a minute, once per
machine, torch version and GPU architecture. That is the path a source checkout run with PYTHONPATH=.
takes. Anything that stops it (no GPU, no nvcc, no ninja, a compile error) raises BackendUnavailable with
the reason, so `get_backend(None, ...)` would fall back with one warning; the failure is remembered, so
a failed build is not retried in the same process.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import torch

from sot_engine.kernels import BACKENDS, Backend, BackendUnavailable

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cuda"  # a source checkout; a wheel has no csrc
JIT_NAME = "sot_cuda_kernels"
STALE_LOCK_S = 900  # torch waits forever on the lock file of a build that was killed; none takes this long
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_ext: ModuleType | None = None
_failure: BackendUnavailable | None = None


def build_dir() -> Path:
    """The JIT build folder: $SOT_CUDA_BUILD_DIR, else one per torch build and GPU architecture under
    $XDG_CACHE_HOME (~/.cache), so a module is never loaded by a torch or a GPU it was not built for."""
    if os.environ.get("SOT_CUDA_BUILD_DIR"):
        return Path(os.environ["SOT_CUDA_BUILD_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    major, minor = torch.cuda.get_device_capability()
    return cache / "sot-engine" / f"cuda-torch{torch.__version__}-cu{torch.version.cuda}-sm{major}{minor}"


def jit_build(verbose: bool = False) -> ModuleType:
    """Compile csrc/cuda for this GPU with `torch.utils.cpp_extension.load` (ninja, -O3, no precompiled
    headers); a build already in the folder with the same sources and flags is loaded without compiling."""
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        raise BackendUnavailable("kernel backend 'cuda' is unavailable: sot_engine.kernels._cuda is not built and nvcc was not "
                                 "found to build it (set CUDA_HOME or put nvcc on PATH)")
    sources = sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.cu"))
    if not sources:
        raise BackendUnavailable(f"kernel backend 'cuda' is unavailable: no CUDA sources in {CSRC}")
    path = build_dir()
    path.mkdir(parents=True, exist_ok=True)
    lock = path / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    major, minor = torch.cuda.get_device_capability()
    arch_env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_env or f"{major}.{minor}"  # this GPU's architecture only
    print(f"sot_engine.kernels.cuda: loading the CUDA extension from {path} (compiled there first if needed: about a minute)",
          file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(JIT_NAME, [str(s) for s in sources], extra_cflags=["-O3"],
                                  extra_cuda_cflags=["-O3", "-lineinfo"], build_directory=str(path),
                                  verbose=verbose or os.environ.get("SOT_CUDA_VERBOSE") == "1")
    finally:
        if arch_env is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def _import_or_build() -> ModuleType:
    if not torch.cuda.is_available():
        raise BackendUnavailable("kernel backend 'cuda' is unavailable: no CUDA GPU (torch.cuda.is_available() "
                                 "is False)")
    try:
        from sot_engine.kernels import _cuda
        return _cuda
    except ImportError as e:
        if os.environ.get("SOT_CUDA_JIT", "1") == "0":
            raise BackendUnavailable(f"kernel backend 'cuda' is unavailable: sot_engine.kernels._cuda is not built ({e}) "
                                     "and SOT_CUDA_JIT=0 forbids building it now") from e
    return jit_build()


def load_extension() -> ModuleType:
    """The compiled module (imported, or JIT-built once per process); BackendUnavailable when it cannot be had."""
    global _ext, _failure
    if _ext is not None:
        return _ext
    if _failure is not None:
        raise _failure
    try:
        _ext = _import_or_build()
    except BackendUnavailable as e:
        _failure = e
        raise
    except Exception as e:  # noqa: BLE001 - a compiler error, ninja missing, an ABI mismatch: all mean "unavailable"
        lines = str(e).strip().splitlines()
        _failure = BackendUnavailable(f"kernel backend 'cuda' is unavailable: building sot_engine.kernels._cuda failed "
                                      f"({type(e).__name__}: {' | '.join(lines[-3:])[:500]}); "
                                      "SOT_CUDA_VERBOSE=1 shows the compiler output")
        raise _failure from e
    return _ext


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the CUDA kernel is compiled for these inputs (one float dtype, a compiled head_dim)."""
    return (q.dtype in DTYPES and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and q.shape[-1] in load_extension().HEAD_DIMS)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None, window: int = 0, *,
                           partition_size: int | None = None, out: torch.Tensor | None = None,
                           return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`kernels.triton.decode.paged_decode_attention` (same arguments and results) in the CUDA kernel.

    Inputs it is not compiled for (another head_dim, mixed dtypes) go to the Triton kernel, as the rest of
    this backend does. Every `context_lens[s] >= 1`; `max_context_len` (if given) at least their max;
    `partition_size` (tokens) overrides the split-K partitioning the kernel picks for this GPU.
    """
    if not supports(q, k_cache, v_cache):
        from sot_engine.kernels.triton.decode import paged_decode_attention as triton_decode
        return triton_decode(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len,
                             partition_size=partition_size, out=out, return_lse=return_lse, window=window)
    if partition_size is not None and partition_size < 1:
        raise ValueError(f"partition_size must be positive, got {partition_size}")
    max_len = max_context_len or (int(context_lens.max()) if context_lens.numel() else 1)
    o, lse = load_extension().paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                     max_len, partition_size or 0, out, return_lse, window)
    return (o, lse) if return_lse else o


def cuda_backend() -> Backend:
    """The Triton backend with the CUDA decode attention swapped in; raises BackendUnavailable first when the
    extension cannot be had, so the choice of backend is made before any forward pass."""
    load_extension()
    return replace(BACKENDS["triton"]("cuda"), name="cuda", paged_decode_attention=paged_decode_attention)
