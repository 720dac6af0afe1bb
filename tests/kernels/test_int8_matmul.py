"""The int8-precision matmul (csrc/cpu/linear_int8.cpp): activations quantized per 32 of a row, integer dot products.

Each instruction set this CPU runs (scalar, AVX2, AVX-512 VNNI; `set_int8_isa` forces a lower one, so an AVX-512
machine checks the AVX2 path too) against `kernels.reference.linear` evaluated in float64 on the same quantized
values:
- the activation quantization is bit-exact (values and scales);
- the integer part is exact: with every scale 1 (x and w integers, each group holding a +-127) the output is the
  integer dot product itself, compared with ==;
- with real scales the float32 sums of the group terms stay within 1e-6 of the float64 oracle's scale.
Shapes cover 1-16 rows, odd numbers of weight rows (the 4-row blocks' tails) and K of 1 to 48 groups.
"""
from __future__ import annotations

import pytest
import torch

from sot_engine.kernels import reference
from sot_engine.kernels.weights import Int8Weight, int8_precision, quantize_activations_int8, quantize_int8, store

try:
    from sot_engine.kernels import _cpp
except ImportError:
    _cpp = None
needs_cpp = pytest.mark.skipif(_cpp is None, reason="the C++ extension is not built")


def isas() -> list[str]:
    """The instruction sets this CPU runs, lowest first (the ones set_int8_isa accepts)."""
    before = _cpp.set_int8_isa("auto")
    best = _cpp.int8_isa()
    _cpp.set_int8_isa(before)
    order = ["scalar", "avx2", "avx512vnni"]
    return order[:order.index(best) + 1]


@pytest.fixture(params=["scalar", "avx2", "avx512vnni"])
def isa(request):
    if _cpp is None:
        pytest.skip("the C++ extension is not built")
    if request.param not in isas():
        pytest.skip(f"this CPU does not run {request.param}")
    before = _cpp.set_int8_isa(request.param)
    yield request.param
    _cpp.set_int8_isa(before)


@needs_cpp
@pytest.mark.parametrize("m, k", [(1, 32), (5, 96), (16, 576)])
def test_activation_quantization_is_bit_exact(isa, m, k):
    """On each ISA's quantizer (AVX2 vectorizes it; the scalar one is the others' fallback)."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g) * torch.rand(m, k // 32, 1, generator=g).repeat_interleave(32, 2).view(m, k)
    x[0, :32] = 0  # an all-zero group: scale 0, values 0
    x[-1, -32:] = torch.arange(-16, 16) / 2  # ties of x * 127 / amax at .5 land on even integers
    q, s, _ = _cpp.quantize_int8_activations(x)  # the scaled sums: tests/kernels/test_quant_matmul.py
    qr, sr = quantize_activations_int8(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert int(q.abs().max()) <= 127 and (q.view(m, -1, 32).abs().amax(2) == 127).sum() >= m * k // 32 - 1


@needs_cpp
@pytest.mark.parametrize("m, n, k", [(1, 7, 32), (3, 13, 256), (8, 4, 1024), (16, 9, 96)])
def test_integer_part_is_exact(isa, m, n, k):
    """Unit scales: x and w are integers with a +-127 in every group, so the output is the exact integer dot."""
    g = torch.Generator().manual_seed(m * n + k)
    xi = torch.randint(-127, 128, (m, k), generator=g)
    wi = torch.randint(-127, 128, (n, k), generator=g)
    for t in (xi, wi):  # a +-127 in each group: its scale is exactly 1
        t.view(t.shape[0], -1, 32)[:, :, 0] = 127 * (1 - 2 * torch.randint(0, 2, t.shape[:1] + (k // 32,), generator=g))
    w = Int8Weight(wi.to(torch.int8), torch.ones(n, k // 32), int8_act=True)
    got = _cpp.linear_int8(xi.float(), w.q, w.scale)
    want = (xi.long() @ wi.long().T).float()  # |sum| < 2^24 for K <= 1024: exact in float32
    assert torch.equal(got, want)


@needs_cpp
@pytest.mark.parametrize("m, n, k", [(1, 1, 32), (1, 49, 576), (2, 5, 64), (4, 17, 1536), (7, 33, 160),
                                     (16, 8, 576)])
def test_matches_float64_on_the_quantized_values(isa, m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g) * 3
    w = quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    w = Int8Weight(w.q, w.scale, int8_act=True)
    for got in (_cpp.linear_int8(x, w.q, w.scale), _cpp.linear_int8(x[:, None].expand(m, 2, k)[:, 0], w.q, w.scale)):
        assert_within_float32_rounding(got, x, w)


def assert_within_float32_rounding(got: torch.Tensor, x: torch.Tensor, w) -> None:
    """got (an int8-precision kernel's x @ w^T) within 1e-6 of the float64 oracle on the same quantized values (x
    quantized as float32 does, then float64 sums), relative to the sum of the terms' magnitudes: the scale of the
    float32 rounding error."""
    m, k = x.shape
    want = reference.linear(x.double(), w)
    xq, xs = quantize_activations_int8(x)
    terms = (xq.double().view(m, -1, 32).abs() * xs.double()[:, :, None]).view(m, k) @ \
        w.dequantize(torch.float64).abs().T
    assert ((got.double() - want).abs() <= 1e-6 * terms + 1e-30).all()


@needs_cpp
def test_isa_switch_and_bad_arguments():
    assert _cpp.int8_isa() in ("scalar", "avx2", "avx512vnni")
    with pytest.raises(RuntimeError, match="not one this CPU and kernel variant run"):
        _cpp.set_int8_isa("neon")
    w = quantize_int8(torch.randn(4, 64))
    with pytest.raises(RuntimeError, match="scale per 32"):
        _cpp.linear_int8(torch.randn(2, 64), w.q, w.scale[:, :1])
    with pytest.raises(RuntimeError, match="float32"):
        _cpp.linear_int8(torch.randn(2, 64).double(), w.q, w.scale)


def test_storage_and_reference():
    """matmul_precision="int8" stores int8 weights that quantize their activations (not a row outside whole
    groups of 32), and refuses another storage."""
    w = torch.randn(6, 64)
    s = store(w, None, "int8")
    assert isinstance(s, Int8Weight) and s.int8_act
    assert not store(torch.randn(6, 40), "int8", "int8").int8_act  # K = 40: widened weights, float activations
    with pytest.raises(ValueError, match="weight_dtype must be 'int8' or None"):
        store(w, "bf16", "int8")
    x = torch.randn(3, 64)
    xq, xs = quantize_activations_int8(x)
    xd = (xq.float().view(3, 2, 32) * xs[:, :, None]).view(3, 64)
    torch.testing.assert_close(reference.linear(x, s), xd @ s.dequantize().T, rtol=1e-6, atol=1e-6)


@needs_cpp
@pytest.mark.parametrize("lens", [[5], [1, 7, 40, 3, 9, 2, 11, 20]])
def test_decode_layers_at_int8_precision_match_the_layer_loop(lens):
    """The fused decode loop multiplies on the int8 kernel like the model's loop over `cpp.linear`."""
    from tests.kernels.test_cpp_cpu import fused_and_loop, random_model
    heads, kvh, d = 4, 2, 16
    model = random_model(heads, kvh, d, "int8-matmul", seed=2, hidden=64, ffn=96)
    assert all(int8_precision(w) for layer in model.layers for w in layer[1:3] + layer[4:6])
    got, want, *_ = fused_and_loop(model, lens, kvh, d, seed=3)
    # the same quantized products; the fused loop sums a row's groups in another order only where its threads
    # split differently, and a rounding flip of one activation's int8 value moves a layer's output by one step
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
