"""Which GPU architecture a Triton launcher chooses its launch configuration for.

The tiles and warps that suit an H100 (sm_90) do not all fit the Ampere parts the design names: an A100 (sm_80)
and an RTX 3090 (sm_86, 99 KB of shared memory a block against the H100's 227 KB) lay `tl.dot` operands out for
mma.sync instead of wgmma, and some configurations spill there or need more shared memory than the SM has.
The launchers (prefill's `_launch_config`, decode's warps) are the one place that chooses, from
`capability(device)`; they call it through this module (`arch.capability(...)`), so that
tests/kernels/test_triton_compile.py can drive them for sm_80, sm_86 and sm_90 on a machine without a GPU by
replacing it.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None elsewhere (Triton's CPU interpreter, where the
    launchers keep the H100 choice: there tile sizes cost only time)."""
    if device.type != "cuda":
        return None
    return _cuda_capability(torch.cuda.current_device() if device.index is None else device.index)


def is_sm8x(cap: tuple[int, int] | None) -> bool:
    """sm_8x (A100 sm_80, RTX 30xx sm_86, Ada sm_89): mma.sync dot layouts, and on all but sm_80/sm_87
    99 KB of shared memory a block."""
    return cap is not None and cap[0] == 8
