"""The integer-dot-product kernels for a GGUF's own weight layouts (csrc/cpu/linear_int8.cpp): 4-bit weights with a
scale and a min per 32 (`Q4Weight`: Q4_0, Q4_1, Q4_K) and int8 weights with a scale per 16 (Q6_K), the activations
quantized per 32 as for int8 precision (tests/kernels/test_int8_matmul.py covers int8 per 32).

Each instruction set this CPU runs (set_int8_isa forces the lower ones, so an AVX-512 machine checks AVX2 too):
- the integer part is exact: with unit scales, zero mins and integer x holding a +-127 per group, the output is the
  integer dot product itself (==);
- with real scales and mins the float32 sums stay within 1e-6 of a float64 oracle's scale (the same quantized
  values, `kernels.reference.linear` in float64);
- the fused decode loop runs on these layouts, mixed as a K-quant file mixes them, like the model's kernel loop.
- the packed layout (blocks of 8 rows interleaved, `weights.pack`) unpacks to the same weights bit for bit, and its
  kernels meet the same two bounds.
Shapes: 1-16 rows of x, odd numbers of weight rows (packed: multiples of 16), 1 to 48 groups.
"""
from __future__ import annotations

import pytest
import torch

from sot_engine.kernels import reference
from sot_engine.kernels.weights import (Int8Weight, PackedWeight, Q4Weight, cat_rows, pack, quantize_activations_int8,
                                        quantize_int8)
from tests.kernels.test_int8_matmul import assert_within_float32_rounding, needs_cpp
from tests.kernels.test_int8_matmul import isa  # noqa: F401 - the fixture, per instruction set

try:
    from sot_engine.kernels import _cpp
except ImportError:
    _cpp = None


def quantize_q4(w: torch.Tensor) -> Q4Weight:
    """[N, K] -> 4-bit with a scale and min per 32 (Q4_1's asymmetric rounding: d = (max - min) / 15, m = min)."""
    n, k = w.shape
    g = w.float().view(n, k // 32, 32)
    lo, hi = g.amin(2), g.amax(2)
    d = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo))
    v = torch.round((g - lo[:, :, None]) / d[:, :, None]).clamp_(0, 15).to(torch.uint8)
    return Q4Weight((v[:, :, :16] | (v[:, :, 16:] << 4)).reshape(n, k // 2), torch.stack([d, lo], 1))


def random_q4(n: int, k: int, g: torch.Generator, f16: bool = False) -> Q4Weight:
    """f16: scales and mins that are float16 values, as a Q4_0 / Q4_1 file's (packed, they stay float16)."""
    sm = torch.stack([torch.rand(n, k // 32, generator=g) * 0.02, torch.randn(n, k // 32, generator=g) * 0.1], 1)
    q = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    return Q4Weight(q, sm.half().float() if f16 else sm)


def test_q4_layout_and_reference():
    """Nibble order (byte b: weight b low, b + 16 high), d * v + m, and the reference's quantized x."""
    q = torch.tensor([[0x21, 0x43] + [0] * 14])  # weights 0, 1 = 1, 3; weights 16, 17 = 2, 4
    w = Q4Weight(q.to(torch.uint8), torch.tensor([[[0.5], [-1.0]]]))
    v = w.nibbles()[0]
    assert v[:2].tolist() == [1, 3] and v[16:18].tolist() == [2, 4] and v[2:16].eq(0).all()
    assert w.dequantize()[0, [0, 1, 2, 16, 17]].tolist() == [-0.5, 0.5, -1.0, 0.0, 1.0]
    assert w.shape == (1, 32)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=g), random_q4(5, 64, g)
    xq, xs = quantize_activations_int8(x)
    want = (xq.double().view(3, 2, 32) * xs.double()[:, :, None]).view(3, 64) @ w.dequantize(torch.float64).T
    torch.testing.assert_close(reference.linear(x.double(), w), want)


@needs_cpp
def test_activation_sums():
    """The third output: each group's scale times the sum of its int8 values (the 4-bit min term's factor)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 96, generator=g)
    q, s, sums = _cpp.quantize_int8_activations(x)
    qr, sr = quantize_activations_int8(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert torch.equal(sums, s * q.view(4, 3, 32).sum(2, dtype=torch.int32).float())


@needs_cpp
@pytest.mark.parametrize("m, n, k", [(1, 7, 32), (3, 13, 256), (8, 4, 1024), (16, 9, 96)])
def test_q4_integer_part_is_exact(isa, m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    xi = torch.randint(-127, 128, (m, k), generator=g)
    xi.view(m, -1, 32)[:, :, 0] = 127 * (1 - 2 * torch.randint(0, 2, (m, k // 32), generator=g))  # scale 1
    w = Q4Weight(torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8),
                 torch.stack([torch.ones(n, k // 32), torch.zeros(n, k // 32)], 1))
    got = _cpp.linear_q4(xi.float(), w.q, w.scale_min)
    assert torch.equal(got, (xi.long() @ w.nibbles().long().T).float())  # |sum| < 2^24: exact in float32


@needs_cpp
@pytest.mark.parametrize("m, n, k", [(1, 7, 32), (3, 13, 256), (16, 9, 96)])
def test_int8_per16_integer_part_is_exact(isa, m, n, k):
    """A scale per 16 weights (Q6_K): scales of 1 and 2 alternating, so each 32-group's halves are scaled apart."""
    g = torch.Generator().manual_seed(m + n * k)
    xi = torch.randint(-127, 128, (m, k), generator=g)
    xi.view(m, -1, 32)[:, :, 0] = 127
    wi = torch.randint(-32, 32, (n, k), generator=g)
    scale = torch.tensor([1.0, 2.0]).repeat(n, k // 32)
    got = _cpp.linear_int8(xi.float(), wi.to(torch.int8), scale)
    want = xi.long() @ (wi * scale.repeat_interleave(16, 1).long()).T
    assert torch.equal(got, want.float())


@needs_cpp
@pytest.mark.parametrize("m, n, k", [(1, 1, 32), (1, 49, 576), (2, 5, 64), (4, 17, 1536), (7, 33, 160),
                                     (16, 8, 576)])
def test_match_float64_on_the_quantized_values(isa, m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g) * 3
    w4 = random_q4(n, k, g)
    w16 = Int8Weight(torch.randint(-32, 32, (n, k), generator=g, dtype=torch.int8),
                     torch.rand(n, k // 16, generator=g) * 0.01, int8_act=True)
    for w, got in ((w4, _cpp.linear_q4(x, w4.q, w4.scale_min)), (w16, _cpp.linear_int8(x, w16.q, w16.scale))):
        assert_within_float32_rounding(got, x, w)


def random_int8(n: int, k: int, g: torch.Generator, per16: bool = False, f16: bool = False) -> Int8Weight:
    """f16: scales that are float16 values and weights within +-63 (every group's sum within 2048: packed, the
    scales and sums stay float16, as a Q8_0 file's)."""
    lim = 32 if per16 else 64 if f16 else 128
    scale = torch.rand(n, k // (16 if per16 else 32), generator=g) * 0.01
    return Int8Weight(torch.randint(-lim + 1, lim, (n, k), generator=g, dtype=torch.int8),
                      scale.half().float() if f16 else scale, int8_act=True)


KINDS = ["q4", "q4/f16", "int8", "int8/f16", "int8/16"]
HALF = {"q4/f16", "int8/f16"}  # the kinds packed with float16 scales


def weight_of(kind: str, n: int, k: int, g: torch.Generator) -> Q4Weight | Int8Weight:
    """"q4": float32 scales and mins (Q4_K's products); "q4/f16": float16 ones (Q4_0, Q4_1); "int8": a scale per 32,
    float32 (int8 matmul precision's own quantization); "int8/f16": float16 (Q8_0); "int8/16": per 16 (Q6_K)."""
    if kind.startswith("q4"):
        return random_q4(n, k, g, f16=kind == "q4/f16")
    return random_int8(n, k, g, per16=kind == "int8/16", f16=kind == "int8/f16")


@pytest.mark.parametrize("kind", KINDS)
def test_pack_round_trip(kind):
    g = torch.Generator().manual_seed(7)
    w = weight_of(kind, 48, 96, g)
    p = pack(w)
    assert isinstance(p, PackedWeight) and p.shape == w.shape and p.q.shape[:2] == (6, 3)
    assert p.scale.dtype == (torch.float16 if kind in HALF else torch.float32)
    u = p.unpack()
    q4 = kind.startswith("q4")
    assert type(u) is type(w) and all(torch.equal(a, b) for a, b in zip(
        (u.q, u.scale_min if q4 else u.scale), (w.q, w.scale_min if q4 else w.scale)))
    assert (u.scale_min if q4 else u.scale).dtype == torch.float32
    rows = torch.tensor([47, 0, 9, 9, 31])
    assert torch.equal(p.dequantize(rows=rows), w.dequantize(rows=rows))
    picked = p.gather(rows)  # an embedding lookup: the rows straight out of their blocks
    assert type(picked) is type(w) and torch.equal(picked.q, w.q[rows])
    assert torch.equal(picked.scale_min if q4 else picked.scale, (w.scale_min if q4 else w.scale)[rows])
    assert p.gather(rows[:0]).shape == (0, 96)
    if not q4:  # the weight sums VNNI's offset trick subtracts
        sums = p.scale[:, :, p.scale.shape[2] // 2:].permute(0, 3, 1, 2).reshape(48, -1)
        assert torch.equal(sums.float(), w.q.view(48, sums.shape[1], -1).sum(2).float())
    # not packed: rows not in 16s, float activations, other storage
    for other in (random_q4(24, 96, g), quantize_int8(torch.randn(16, 64)), torch.randn(16, 64)):
        assert pack(other) is other


def test_int8_sums_beyond_float16_keep_float32():
    """float16 scales, but one group's weight sum (31 * 127 + 126, odd and above 2048) is no float16 value: scales
    and sums stay float32."""
    w = random_int8(16, 64, torch.Generator().manual_seed(1), f16=True)
    w.q[3, 32:] = 127
    w.q[3, 63] = 126
    p = pack(w)
    assert p.scale.dtype == torch.float32 and torch.equal(p.unpack().q, w.q)


@needs_cpp
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m, n, k", [(1, 16, 32), (3, 48, 256), (8, 32, 576), (15, 32, 160), (16, 16, 96)])
def test_packed_kernels(isa, kind, m, n, k):
    """Unit scales first (the integer part, ==), then real ones against the float64 oracle. 15 rows: a tile of 8, 4, 2
    and 1 (AVX2 4-bit; 4, 2 and 1 otherwise)."""
    g = torch.Generator().manual_seed(m * n + k)
    xi = torch.randint(-127, 128, (m, k), generator=g)
    xi.view(m, -1, 32)[:, :, 0] = 127
    w = weight_of(kind, n, k, g)
    q4 = kind.startswith("q4")
    run = lambda x, p: (_cpp.linear_q4 if q4 else _cpp.linear_int8)(x, p.q, p.scale)  # noqa: E731
    if q4:
        unit = Q4Weight(w.q, torch.stack([torch.ones(n, k // 32), torch.zeros(n, k // 32)], 1))
        ints = unit.nibbles().long()
    else:
        unit = Int8Weight(w.q, torch.ones_like(w.scale), int8_act=True)
        ints = w.q.long()
    pu = pack(unit)
    if kind in HALF:  # ones (and zeros, the sums) are float16 values: packed with float16 scales
        assert pu.scale.dtype == torch.float16
    else:  # the other kinds run the float32 ones
        pu = PackedWeight(pu.q, pu.scale.float())
    assert torch.equal(run(xi.float(), pu), (xi.long() @ ints.T).float())
    x = torch.randn(m, k, generator=g) * 3
    assert_within_float32_rounding(run(x, pack(w)), x, w)


@needs_cpp
def test_bad_arguments():
    w = random_q4(4, 64, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="scale_min"):
        _cpp.linear_q4(torch.randn(2, 64), w.q, w.scale_min[:, :1])
    with pytest.raises(RuntimeError, match="twice"):
        _cpp.linear_q4(torch.randn(2, 96), w.q, w.scale_min)
    with pytest.raises(RuntimeError, match="per 16"):
        _cpp.linear_int8(torch.randn(2, 64), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3))


def test_cat_rows():
    """Fused q/k/v and gate/up: one class joins as is; int8 per 32 and per 16 meet at per 16 exactly; 4-bit with int8
    re-quantizes to int8 per 32 (close)."""
    g = torch.Generator().manual_seed(3)
    a, b = random_q4(3, 64, g), random_q4(2, 64, g)
    ab = cat_rows([a, b])
    assert isinstance(ab, Q4Weight) and torch.equal(ab.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    c = Int8Weight(torch.randint(-127, 128, (2, 64), generator=g, dtype=torch.int8), torch.rand(2, 2), True)
    d = Int8Weight(torch.randint(-32, 32, (3, 64), generator=g, dtype=torch.int8), torch.rand(3, 4), True)
    cd = cat_rows([c, d])
    assert cd.scale.shape == (5, 4) and torch.equal(cd.dequantize(), torch.cat([c.dequantize(), d.dequantize()]))
    mixed = cat_rows([a, d])
    want = torch.cat([a.dequantize(), d.dequantize()])
    assert isinstance(mixed, Int8Weight) and mixed.int8_act and mixed.scale.shape == (6, 2)
    assert (mixed.dequantize() - want).abs().max() <= want.abs().max() / 127
    assert torch.equal(cat_rows([torch.ones(1, 4), torch.zeros(2, 4)]), torch.tensor([[1.0] * 4] + [[0.0] * 4] * 2))
    with pytest.raises(ValueError, match="cannot stack"):
        cat_rows([a, quantize_int8(torch.randn(2, 64))])  # an int8 matrix with float activations


@needs_cpp
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("lens", [[5], [1, 7, 40, 3, 9, 2, 11, 20]])
def test_decode_layers_on_gguf_layouts_match_the_layer_loop(lens, packed):
    """4-bit and int8 (per 32 and per 16) matrices mixed in one model, packed by the cpp backend or row-major: the
    fused decode loop multiplies them like the model's Python loop over `cpp.linear`."""
    from tests.kernels.test_cpp_cpu import fused_and_loop, random_model
    heads, kvh, d = 4, 2, 16
    model = random_model(heads, kvh, d, "gguf", seed=5, hidden=64, ffn=96, pack=packed)
    mats = [w.unpack() if isinstance(w, PackedWeight) else w
            for layer in model.layers for w in (layer[1], layer[2], layer[4], layer[5])]
    kinds = {type(w).__name__ + ("16" if isinstance(w, Int8Weight) and w.scale.shape[1] * 16 == w.q.shape[1] else "")
             for w in mats}
    assert kinds == {"Q4Weight", "Int8Weight", "Int8Weight16"}
    assert all(isinstance(w, PackedWeight) == packed for layer in model.layers for w in layer[1:3] + layer[4:6])
    if packed:  # layer 0's 4-bit matrices and o have float16 scales (Q4_1, Q8_0), the others float32 (Q4_K, int8)
        for i in (1, 2):
            assert [layer[i].scale.dtype for layer in model.layers] == [torch.float16, torch.float32, torch.float32]
    got, want, *_ = fused_and_loop(model, lens, kvh, d, seed=6)
    # the same quantized products; a rounding flip of one activation's int8 value moves a layer by one step
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
