"""A GGUF file's quantized matrices in the integer kernels' layouts (`kernels.weights`), without widening them:
`weight_dtype="gguf"`. Each layout holds exactly the values the file does (the tests compare `dequantize()` with
gguf's own dequantization, bit for bit):

    Q8_0  -> Int8Weight, a scale per 32        Q4_0 -> Q4Weight, min = -8 * scale
    Q5_0  -> Int8Weight, a scale per 32        Q4_1 -> Q4Weight
    Q6_K  -> Int8Weight, a scale per 16        Q4_K -> Q4Weight, its 6-bit sub-block scales and mins multiplied out

The block scales become float32 beside the values (Q4_K's and Q6_K's products of a float16 and a 6-/8-bit integer
are not float16 any more), so a repacked matrix is 6-20% larger than in the file. Other quantized types (Q5_1,
Q2_K, Q3_K, Q5_K, the IQ types) are widened and quantized again as int8 per 32 (`requantized`): close, not exact.
"""
from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import torch

from sot_engine.engine.loader.dequant import dequantize
from sot_engine.kernels.weights import Int8Weight, Q4Weight, Weight, quantize_int8

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
EXACT_TYPES = (Q.Q8_0, Q.Q5_0, Q.Q6_K, Q.Q4_0, Q.Q4_1, Q.Q4_K)


def _blocks(raw: np.ndarray, qtype: Q, rows: int) -> torch.Tensor:
    """The raw bytes as [rows, blocks a row, bytes a block] uint8 (a view of the mapped file)."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    return torch.from_numpy(raw.reshape(-1).view(np.uint8)).view(rows, -1, size)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> [...] float32 of the little-endian float16 they hold."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def _pack4(v: torch.Tensor) -> torch.Tensor:
    """[..., 32] values 0..15 -> [..., 16] bytes, weight b in the low nibble of byte b and b + 16 in its high one."""
    return v[..., :16] | (v[..., 16:] << 4)


def _q4(rows: int, qs: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> Q4Weight:
    """From per-32 packed bytes qs [rows, G, 16] and float32 scales and mins [rows, G]."""
    return Q4Weight(qs.reshape(rows, -1).contiguous(), torch.stack([scale, minimum], dim=1).contiguous())


def _int8(rows: int, values: torch.Tensor, scale: torch.Tensor) -> Int8Weight:
    """From int8 values (any shape of rows x K) and float32 scales [rows, groups]."""
    return Int8Weight(values.reshape(rows, -1).contiguous(), scale.reshape(rows, -1).contiguous(), int8_act=True)


def repack(raw: np.ndarray, qtype: Q, shape: tuple[int, int]) -> Weight:
    """A [N, K] matrix of type `qtype` (raw: its bytes, rows of whole blocks) in the kernels' layout; a float32
    tensor for the float types; int8 per 32 re-quantized from the widened values for the types not listed above."""
    n, k = shape
    if qtype in FLOAT_TYPES:
        return dequantize(raw, qtype, shape)
    if qtype not in EXACT_TYPES:
        if k % 32:
            raise ValueError(f"a {qtype.name} matrix of {k} columns is not in groups of 32")
        return requantized(raw, qtype, shape)
    b = _blocks(raw, qtype, n)
    if qtype == Q.Q8_0:  # d, 32 x int8
        return _int8(n, b[..., 2:].view(torch.int8), _f16(b[..., :2]))
    if qtype == Q.Q5_0:  # d, 32 high bits, 16 bytes of low nibbles: d * (v - 16)
        high = (b[..., 2:6].contiguous().view(torch.int32) >> torch.arange(32, dtype=torch.int32)) & 1
        low = torch.cat([b[..., 6:] & 0x0F, b[..., 6:] >> 4], dim=-1)
        return _int8(n, (low.to(torch.int32) | (high << 4)).sub_(16).to(torch.int8), _f16(b[..., :2]))
    if qtype == Q.Q4_0:  # d, 16 bytes: d * (v - 8)
        d = _f16(b[..., :2])
        return _q4(n, b[..., 2:], d, d * -8)
    if qtype == Q.Q4_1:  # d, m, 16 bytes: d * v + m
        return _q4(n, b[..., 4:], _f16(b[..., :2]), _f16(b[..., 2:4]))
    if qtype == Q.Q4_K:  # per 256: d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit values
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        s = b[..., 4:16].reshape(n, -1, 3, 4)
        lo, mid, hi = s[..., 0, :], s[..., 1, :], s[..., 2, :]
        sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1).float()  # [n, blocks, 8]
        mn = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=-1).float()
        qs = b[..., 16:].reshape(n, -1, 4, 1, 32)  # sub-blocks 2i and 2i + 1: the low and high nibbles of 32 bytes
        v = torch.cat([qs & 0x0F, qs >> 4], dim=3).reshape(n, -1, 32)
        return _q4(n, _pack4(v), (d[..., None] * sc).reshape(n, -1), -(dmin[..., None] * mn).reshape(n, -1))
    # Q6_K, per 256: 128 bytes of low nibbles, 64 of 2-bit high parts, 16 int8 scales, d: d * scale * (v - 32)
    ql, qh = b[..., :128].reshape(n, -1, 2, 1, 64), b[..., 128:192].reshape(n, -1, 2, 1, 32)
    low = (ql >> torch.tensor([0, 4], dtype=torch.uint8).view(2, 1)) & 0x0F
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)) & 0x03
    v = (low.reshape(n, -1, 8, 32) | (high.reshape(n, -1, 8, 32) << 4)).to(torch.int8) - 32
    scale = _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(torch.int8).float()
    return _int8(n, v, scale)


def requantized(raw: np.ndarray, qtype: Q, shape: tuple[int, int]) -> Int8Weight:
    """A type without an exact layout here, widened (gguf's dequantization) and quantized as int8 per 32."""
    return replace(quantize_int8(dequantize(raw, qtype, shape)), int8_act=True)
