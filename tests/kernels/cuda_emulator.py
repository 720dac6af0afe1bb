"""csrc/cuda/paged_decode.cu on the CPU: compiled with g++ through cuda_emulator.cpp and called with ctypes.

`build(tmp)` returns an `Emulated` whose `paged_decode_attention` has the extension's signature and does
what csrc/cuda/bindings.cpp does around the launch (int32 metadata, partition count, workspace), on CPU
tensors. The workspace starts as NaN, so the reduce reading a partition that was never written shows.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CU = ROOT / "csrc" / "cuda" / "paged_decode.cu"
HARNESS = Path(__file__).with_name("cuda_emulator.cpp")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # sot::DType


class Args(ctypes.Structure):
    """sot::PagedDecodeArgs, field for field (checked against the C++ sizeof)."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("q", "k_cache", "v_cache", "block_tables", "context_lens",
                                                 "out", "lse", "workspace")]
                + [(n, ctypes.c_int64) for n in ("q_stride_b", "q_stride_h", "out_stride_b", "out_stride_h",
                                                  "table_stride", "k_stride_block", "k_stride_row", "k_stride_head",
                                                  "v_stride_block", "v_stride_row", "v_stride_head")]
                + [(n, ctypes.c_int) for n in ("batch", "num_heads", "num_kv_heads", "head_dim", "block_size",
                                                "partition_size", "num_partitions", "window")]
                + [("scale", ctypes.c_float), ("dtype", ctypes.c_int)])


def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (cuda_fp16.h and friends), if there is one here."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc := shutil.which("nvcc"):
        homes.append(str(Path(nvcc).resolve().parents[1]))
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_fp16.h").exists():
            return Path(home) / "include"
    return None


def unavailable() -> str:
    """Why the emulator cannot be built here ('' when it can)."""
    if shutil.which("g++") is None:
        return "g++ not found"
    if cuda_include() is None:
        return "CUDA toolkit headers (cuda_fp16.h) not found"
    return ""


class Emulated:
    device = torch.device("cpu")

    def __init__(self, lib: ctypes.CDLL, num_sms: int) -> None:
        self.lib, self.num_sms = lib, num_sms
        if lib.emu_args_size() != ctypes.sizeof(Args):
            raise RuntimeError(f"Args mirrors sot::PagedDecodeArgs badly: {ctypes.sizeof(Args)} != {lib.emu_args_size()}")

    def default_partition_size(self, batch: int, num_heads: int, num_kv_heads: int, max_context_len: int,
                               num_sms: int) -> int:
        return self.lib.emu_partition_size(batch, num_heads, num_kv_heads, max_context_len, num_sms)

    def heads_per_block(self, group: int) -> int:
        return self.lib.emu_heads_per_block(group)

    def paged_decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len,
                               partition_size=0, out=None, return_lse=False, window=0):
        b, h, d = q.shape
        tables = block_tables.to(torch.int32).contiguous()
        lens = context_lens.to(torch.int32).contiguous()
        out = torch.empty(b, h, d, dtype=q.dtype) if out is None else out
        lse = torch.full((b, h), math.nan) if return_lse else None
        max_len = min(max_context_len, window) if window else max_context_len  # as bindings.cpp
        psize = min(partition_size, max_len) if partition_size else self.default_partition_size(
            b, h, k_cache.shape[2], max_len, self.num_sms)
        parts = -(-max_len // psize)
        ws = torch.full((b * h * parts * (d + 1),), math.nan) if parts > 1 else None
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        a = Args(ptr(q), ptr(k_cache), ptr(v_cache), ptr(tables), ptr(lens), ptr(out), ptr(lse), ptr(ws),
                 q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0), *k_cache.stride()[:3],
                 *v_cache.stride()[:3], b, h, k_cache.shape[2], d, k_cache.shape[1], psize, parts, window, scale,
                 DTYPE_CODES[q.dtype])
        err = self.lib.emu_launch_paged_decode(ctypes.byref(a))
        if err:
            raise ValueError(f"launch_paged_decode returned cudaError {err}")
        return out, lse


def build(tmp: Path, num_sms: int = 132) -> Emulated:
    """Compile the kernel source into a shared library under `tmp` (about 10-20 s of g++)."""
    src = CU.read_text()
    # kernel<<<grid, block, 0, stream>>>(args); -> emu_launch(kernel, grid, block, args);
    src, n = re.subn(r"(\w+<[^<>]*>)<<<(.*?), 0, stream>>>\((.*?)\);", r"emu_launch(\1, \2, \3);", src)
    if n != 2:
        raise RuntimeError(f"expected the 2 kernel launches of {CU.name}, rewrote {n}")
    (tmp / "paged_decode_emulated.cu").write_text(src.replace("cudaGetLastError()", "cudaSuccess"))
    lib = tmp / "cuda_emulator.so"
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{tmp}", f"-I{CU.parent}",
           "-isystem", str(cuda_include()), str(HARNESS), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"building the emulator failed:\n{res.stderr[-3000:]}")
    dll = ctypes.CDLL(str(lib))
    dll.emu_launch_paged_decode.argtypes = [ctypes.POINTER(Args)]
    dll.emu_args_size.restype = ctypes.c_size_t
    return Emulated(dll, num_sms)
