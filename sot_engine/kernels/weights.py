"""How the weight matrices are stored: float32, bfloat16, or int8 with a float32 scale per group of 32
weights of a row.

A CPU decode step reads every weight once, so its time is about the weights' bytes over the memory
bandwidth: bf16 halves them, int8 quarters them. Only storage changes: the activations, every
product and every sum stay in the compute dtype (float32 on CPU), the weights being widened in
registers (the C++ kernel) or just before the matmul (`kernels.reference.linear`). The matrices of
`linear` and the embedding table (the lm_head when tied) are stored this way; norms are not.

int8 scales groups of 32 consecutive weights of a row (llama.cpp's Q8_0 grouping, +12.5% bytes for
the scales), not whole rows: on SmolLM2 one scale per row moved logits by up to 1.8 and changed the
first greedy token of one prompt in eight; see `quantize_int8`.

`matmul_precision="bf16"` goes one step further (bf16 storage, `Bf16MatmulWeight`): the matmul rounds its
activations to bf16 too, so every product is exact in float32 and only the sums are float32 (AMX's
TDPBF16PS, llama.cpp's BF16 type and torch's "medium" float32 matmul precision make the same trade). What it buys is
compute, not bytes: a CPU with AMX multiplies bf16 ~20x faster than float32 FMAs, so a decode step of 8-16 rows
costs what a 1-row step does (csrc/cpu/linear_bf16.cpp) and prefill is compute-cheap too.

`matmul_precision="int8"` is the same step for int8 storage (llama.cpp's Q8_0 x Q8_0): each matmul quantizes its
activations per 32 values of a row too (`quantize_activations_int8`), so the group sums are integer dot products
(AVX2 vpmaddubsw, AVX-512 VNNI vpdpbusd: csrc/cpu/linear_int8.cpp) and only the scales are float32. Widening int8
weights to float32 makes a step of 8+ rows compute-bound on fp32 FMAs; the integer instructions do 4x the work a
cycle, so a batch-8 step goes back to streaming the weights.

`weight_dtype="gguf"` keeps a GGUF file's own quantized types instead of widening them at load time
(`engine.loader.repack`): Q8_0 and Q5_0 become int8 weights with a scale per 32, Q6_K int8 with a scale per 16,
and Q4_0, Q4_1 and Q4_K 4-bit weights (`Q4Weight`: a scale and a min per 32); each exactly the values the file
holds, multiplied at int8 precision (activations quantized per 32, as llama.cpp does).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

WEIGHT_DTYPES = ("fp32", "bf16", "int8", "gguf")
MATMUL_PRECISIONS = ("fp32", "bf16", "int8")
INT8_GROUP = 32  # weights per int8 scale


@dataclass(frozen=True, slots=True)
class Int8Weight:
    """Symmetric int8 per group of K / G consecutive weights of a row: w[n, k] ~= q[n, k] * scale[n, k // (K / G)],
    scale = max|w| / 127 over the group, q = round(w / scale)."""
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, G] float32, G groups per row (G = 1: a scale per row)
    int8_act: bool = False  # int8 matmul precision: x @ w^T quantizes x per 32 of a row too (groups of 32 only)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weights as `dtype` (each q * scale rounded once, as in the C++ kernel); `rows`: only those."""
        q, scale = (self.q, self.scale) if rows is None else (self.q[rows], self.scale[rows])
        n, k = q.shape
        return (q.view(n, scale.shape[1], -1).to(dtype) * scale[:, :, None].to(dtype)).view(n, k)


@dataclass(frozen=True, slots=True)
class Q4Weight:
    """4-bit weights with a float32 scale and min per 32 of a row: w[n, 32 g + i] = d[n, g] * v + m[n, g], v in 0..15
    (GGUF's Q4_0 with m = -8 d, Q4_1, Q4_K). Byte b of group g holds v of weight b (low nibble) and of weight b + 16
    (high nibble), Q4_0's order. Always multiplied at int8 precision (the activations quantized per 32)."""
    q: torch.Tensor  # [N, K / 2] uint8
    scale_min: torch.Tensor  # [N, 2, K / 32] float32: the groups' scales d, then their mins m

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.q.shape[0], 2 * self.q.shape[1]))

    def nibbles(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The 4-bit values v, [N, K] uint8 in weight order."""
        q = self.q if rows is None else self.q[rows]
        n = q.shape[0]
        g = q.view(n, -1, 16)
        return torch.cat([g & 0x0F, g >> 4], dim=2).view(n, -1)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weights as `dtype`: d * v + m, rounded after the product and after the sum (as gguf computes them)."""
        sm = self.scale_min if rows is None else self.scale_min[rows]
        v = self.nibbles(rows)
        n, k = v.shape
        d, m = sm[:, 0, :, None].to(dtype), sm[:, 1, :, None].to(dtype)
        return (v.view(n, -1, 32).to(dtype) * d + m).view(n, k)


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """An int8-precision matrix (Int8Weight with int8_act, or Q4Weight) in the integer kernel's packed layout: blocks
    of 8 rows interleaved 4 bytes at a time, so one 32-byte vector holds 4 weights of each of 8 rows and one
    instruction against 4 bytes of x adds into 8 lanes, one per row (csrc/cpu/linear_int8.cpp). Built by the cpp
    backend (`pack`); `unpack` gives the row-major weight back, bit for bit."""
    q: torch.Tensor  # [N / 8, K / 32, 256] int8 (chunk c of 32 bytes: bytes 4c..4c+3 of rows 0..7), or
    #                 [N / 8, K / 32, 128] uint8 (4-bit; chunk p: weights 4p..4p+3 low, 16+4p.. high, of rows 0..7)
    scale: torch.Tensor  # [N / 8, K / 32, S, 8] float32: (scale, weight sum) per 32; (two scales, two sums) per 16;
    #                      (scale, min) for 4-bit; float16 where every one is a float16 (a Q4_0 / Q4_1 / Q8_0 file's
    #                      are, but for a scale per 16)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((8 * self.q.shape[0], 32 * self.q.shape[1]))

    def unpack(self) -> "Int8Weight | Q4Weight":
        """The row-major weight."""
        return self.gather(torch.arange(self.shape[0]))

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        return (self.unpack() if rows is None else self.gather(rows)).dequantize(dtype)

    def gather(self, rows: torch.Tensor) -> "Int8Weight | Q4Weight":
        """Rows `rows` (any order, repeats allowed) as a row-major weight, picked straight out of their blocks (an
        embedding lookup reads a few rows of a large table)."""
        b, r = rows // 8, rows % 8
        g = self.q.shape[1]
        sc = self.scale[b, :, :, r].float()  # [R, G, S]
        if self.q.dtype == torch.uint8:  # bytes [R, G, p, j]: weights 4p + j (low nibble) and 16 + 4p + j (high)
            q = self.q.view(-1, g, 4, 8, 4)[b, :, :, r, :]
            return Q4Weight(q.reshape(len(rows), g * 16), sc.permute(0, 2, 1).contiguous())
        halves = sc.shape[2] // 2
        q = self.q.view(-1, g, 8, 8, 4)[b, :, :, r, :]  # [R, G, c, j]: weight 4c + j
        return Int8Weight(q.reshape(len(rows), g * 32), sc[:, :, :halves].reshape(len(rows), g * halves), int8_act=True)


def packable(w: "Weight") -> bool:
    """An int8-precision matrix whose rows come in whole 16s (so a fused gate/up splits between blocks)."""
    return isinstance(w, (Int8Weight, Q4Weight)) and int8_precision(w) and w.shape[0] % 16 == 0 \
        and w.shape[1] % 32 == 0


def pack(w: "Weight") -> "Weight":
    """The packed layout of an int8-precision Int8Weight or Q4Weight (see PackedWeight); anything else as it is."""
    if not packable(w):
        return w
    n, k = w.shape
    b, g = n // 8, k // 32
    if isinstance(w, Q4Weight):
        v = w.nibbles().view(b, 8, g, 32)
        byte = v[..., :16] | (v[..., 16:] << 4)  # [b, r, g, 16]: weights j and 16 + j of chunk p = j // 4
        q = byte.view(b, 8, g, 4, 4).permute(0, 2, 3, 1, 4).reshape(b, g, 128)
        sm = w.scale_min.view(b, 8, 2, g).permute(0, 3, 2, 1).contiguous()
        # a Q4_0 / Q4_1 file's scales and mins are float16: kept so, a step reads 1 / 9 fewer bytes (Q4_K's products
        # of two scales are not, and stay float32)
        return PackedWeight(q.contiguous(), _float16_if_exact(sm))
    q = w.q.view(b, 8, g, 8, 4).permute(0, 2, 3, 1, 4).reshape(b, g, 256)
    halves = w.scale.shape[1] // g  # 1: a scale per 32, 2: per 16
    scale = w.scale.view(b, 8, g, halves).permute(0, 2, 3, 1)
    sums = w.q.view(b, 8, g, halves, 32 // halves).sum(-1, dtype=torch.int32).float().permute(0, 2, 3, 1)
    both = torch.cat([scale, sums], dim=2).contiguous()
    # a Q8_0 file's scales are float16, and so is a group's weight sum (an integer, at most 32 * 127) in practice
    # (any within 2048 is): kept so, a step reads 1 / 10 fewer bytes of such a matrix (per 16, Q6_K, stays float32)
    return PackedWeight(q.contiguous(), _float16_if_exact(both) if halves == 1 else both)


def _float16_if_exact(t: torch.Tensor) -> torch.Tensor:
    """t as float16 where every value is a float16 value (the packed kernels widen them exactly), else t."""
    half = t.half()
    return half if torch.equal(half.float(), t) else t


@dataclass(frozen=True, slots=True)
class Bf16MatmulWeight:
    """bfloat16 weights at bf16 matmul precision: x @ w^T multiplies bf16(x) by w (exact float32 products) and sums
    in float32 (or the compute dtype, if wider)."""
    w: torch.Tensor  # [N, K] bfloat16

    @property
    def shape(self) -> torch.Size:
        return self.w.shape


Weight = torch.Tensor | Int8Weight | Q4Weight | PackedWeight | Bf16MatmulWeight


def check_weight_dtype(weight_dtype: str | None, matmul_precision: str = "fp32") -> str | None:
    """The storage these two ask for (None: keep the compute dtype); ValueError for an unknown value or a pair that
    does not go together (bf16 precision multiplies bf16 weights: storage None or "bf16")."""
    if weight_dtype is not None and weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)} (or None: the compute dtype), "
                         f"got {weight_dtype!r}")
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {matmul_precision!r}")
    if weight_dtype == "gguf" and matmul_precision != "fp32":
        raise ValueError(f"weight_dtype='gguf' keeps the file's own types, multiplied at int8 precision; "
                         f"leave matmul_precision at 'fp32', got {matmul_precision!r}")
    if matmul_precision != "fp32":  # bf16 / int8 precision multiplies weights stored so
        if weight_dtype not in (None, matmul_precision):
            raise ValueError(f"matmul_precision={matmul_precision!r} multiplies {matmul_precision} weights; "
                             f"weight_dtype must be {matmul_precision!r} or None, got {weight_dtype!r}")
        return matmul_precision
    return weight_dtype


def quantize_int8(w: torch.Tensor, group: int = INT8_GROUP) -> Int8Weight:
    """[N, K] -> Int8Weight with groups of `group` weights (a whole row when K is not a multiple of it)."""
    n, k = w.shape
    group = group if k % group == 0 else k
    wf = w.float().view(n, k // group, group)
    amax = wf.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero group stays zero
    q = torch.round(wf / scale[:, :, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q.view(n, k), scale)


def int8_precision(w: Weight) -> bool:
    """Whether x @ w^T quantizes x per 32 of a row (int8-precision int8 weights, and 4-bit ones)."""
    return isinstance(w, (Q4Weight, PackedWeight)) or (isinstance(w, Int8Weight) and w.int8_act)


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of 32) -> (int8 values [M, K], float32 scales [M, K / 32]) as the int8-precision
    matmul quantizes its activations: per 32 of a row, scale amax / 127, values round(x * (127 / amax)) half to even,
    in float32 (an all-zero group: scale 0, values 0)."""
    m, k = x.shape
    xf = x.float().view(m, k // INT8_GROUP, INT8_GROUP)
    amax = xf.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round((xf * inv).clamp_(-127, 127)).to(torch.int8)
    return q.view(m, k), (amax / 127)[:, :, 0]


def store(w: torch.Tensor, weight_dtype: str | None, matmul_precision: str = "fp32") -> Weight:
    """A [N, K] weight matrix in `weight_dtype` storage (None: as it is) for `matmul_precision`. "gguf": the loader
    repacked the file's quantized matrices already (they pass through); a float one stays float32."""
    weight_dtype = check_weight_dtype(weight_dtype, matmul_precision)
    if not isinstance(w, torch.Tensor):  # repacked by the loader
        return w
    if weight_dtype == "gguf":
        return w.float()
    if matmul_precision == "bf16":
        return Bf16MatmulWeight(w.to(torch.bfloat16).contiguous())
    if matmul_precision == "int8":  # a row not in whole groups of 32 keeps float activations (widened weights)
        return replace(quantize_int8(w), int8_act=w.shape[1] % INT8_GROUP == 0)
    if weight_dtype is None:
        return w
    if weight_dtype == "int8":
        return quantize_int8(w)
    return w.to(torch.float32 if weight_dtype == "fp32" else torch.bfloat16)


def embedding(ids: torch.Tensor, table: Weight, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of an embedding table in any storage, as `dtype`."""
    if isinstance(table, (Int8Weight, Q4Weight, PackedWeight)):
        return table.dequantize(dtype, rows=ids)
    if isinstance(table, Bf16MatmulWeight):
        return table.w[ids].to(dtype)
    return table[ids].to(dtype)


def map_tensors(w: Weight, fn: Callable[[torch.Tensor], torch.Tensor]) -> Weight:
    """The weight with each tensor it holds replaced by fn(tensor), in the same storage class (None stays None: a
    tensor-parallel worker's absent lm_head)."""
    if w is None:
        return None
    if isinstance(w, Int8Weight):
        return Int8Weight(fn(w.q), fn(w.scale), w.int8_act)
    if isinstance(w, Q4Weight):
        return Q4Weight(fn(w.q), fn(w.scale_min))
    if isinstance(w, PackedWeight):
        return PackedWeight(fn(w.q), fn(w.scale))
    if isinstance(w, Bf16MatmulWeight):
        return Bf16MatmulWeight(fn(w.w))
    return fn(w)


def nbytes(w: Weight) -> int:
    if isinstance(w, Int8Weight):
        return w.q.nbytes + w.scale.nbytes
    if isinstance(w, Q4Weight):
        return w.q.nbytes + w.scale_min.nbytes
    if isinstance(w, PackedWeight):
        return w.q.nbytes + w.scale.nbytes
    if isinstance(w, Bf16MatmulWeight):
        return w.w.nbytes
    return w.nbytes


def cat_rows(parts: list[Weight]) -> Weight:
    """The matrices stacked by rows (fused q/k/v, gate/up), in their common storage. Parts of one class are joined
    as they are (int8 scales per 32 and per 16 meet at per 16, exactly); 4-bit parts beside int8 ones (a K-quant
    file's Q4_K q/k and Q6_K v) are re-quantized to int8 per 32, the one lossy case."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    if all(isinstance(p, Q4Weight) for p in parts):
        return Q4Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale_min for p in parts]))
    if all(isinstance(p, Int8Weight) and p.int8_act for p in parts):
        groups = {p.q.shape[1] // p.scale.shape[1] for p in parts}
        scales = [p.scale if len(groups) == 1 else p.scale.repeat_interleave(p.q.shape[1] // p.scale.shape[1] // 16, 1)
                  for p in parts]
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat(scales), int8_act=True)
    if all(isinstance(p, (Int8Weight, Q4Weight)) and int8_precision(p) for p in parts):
        return replace(quantize_int8(torch.cat([p.dequantize() for p in parts])), int8_act=True)
    raise ValueError(f"cannot stack {', '.join(type(p).__name__ for p in parts)} matrices")
