"""GGUF tensors to float32 in torch, for the types llama.cpp's own small files use (F32, F16, BF16, Q8_0, Q4_0,
Q4_1); any other type goes to `gguf.quants.dequantize`, which is also the test oracle (the results are equal bit
for bit: the same fp32 products and sums, in the same order). Why: gguf's numpy path works row group by row group
on one core, 1.0 s of SmolLM2's start; whole-tensor torch ops on every core take a tenth of that."""
from __future__ import annotations

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
QK = 32  # weights per block of the 32-wide types below


def _blocks(raw: np.ndarray, block_bytes: int) -> torch.Tensor:
    """The raw bytes as a [blocks, block_bytes] uint8 tensor (no copy: it maps the file)."""
    return torch.from_numpy(raw.reshape(-1).view(np.uint8)).view(-1, block_bytes)


def _nibbles(qs: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """[blocks, 16] packed bytes -> [blocks, 32] float32 values 0..15 minus `offset`: the low nibbles are weights
    0-15 of a block, the high ones 16-31. Written in place, so the caller's scaling runs in place too."""
    out = torch.empty(qs.shape[0], QK, dtype=torch.float32)
    out[:, :QK // 2] = qs & 0x0F
    out[:, QK // 2:] = qs >> 4
    return out.sub_(offset) if offset else out


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[blocks, 2] bytes -> [blocks, 1] float32 of the little-endian fp16 they hold."""
    return b.contiguous().view(torch.float16).float()


def dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor of `shape` (row-major, [out, in]) from a GGUF tensor's raw data."""
    if qtype == Q.F32:
        return torch.from_numpy(np.asarray(raw, dtype=np.float32)).reshape(shape).clone()
    if qtype in (Q.F16, Q.BF16):
        dt = torch.float16 if qtype == Q.F16 else torch.bfloat16
        return torch.from_numpy(raw.reshape(-1).view(np.uint8)).view(dt).float().reshape(shape)
    if qtype == Q.Q8_0:
        b = _blocks(raw, 2 + QK)
        return (b[:, 2:].view(torch.int8).float() * _f16(b[:, :2])).reshape(shape)
    if qtype == Q.Q4_0:  # d * (q - 8)
        b = _blocks(raw, 2 + QK // 2)
        return _nibbles(b[:, 2:], offset=8).mul_(_f16(b[:, :2])).reshape(shape)
    if qtype == Q.Q4_1:  # d * q + m, rounded after the product as gguf does (no fused multiply-add)
        b = _blocks(raw, 4 + QK // 2)
        return _nibbles(b[:, 4:]).mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4])).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)).reshape(shape)
