"""Triton row kernels against the torch reference run in float64 on the same random inputs.

On a machine without CUDA they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET).
The wrappers allocate their outputs with `torch.empty`; the tests make that allocation NaN so a row or
column the kernel forgets to write cannot pass by luck.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

pytest.importorskip("triton")

from sot_engine.kernels import reference as ref  # noqa: E402
from sot_engine.kernels.triton import elementwise as tk  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter truncates float32 -> bfloat16 casts instead of rounding them, so bf16 runs on a GPU only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
EPS = 1e-5


@contextlib.contextmanager
def nan_outputs():
    """Every `torch.empty` inside is NaN-filled: outputs the kernel does not fully write show up."""
    real = torch.empty

    def poisoned(*args, **kwargs):
        return real(*args, **kwargs).fill_(math.nan)
    torch.empty = poisoned
    try:
        yield
    finally:
        torch.empty = real


def randn(*shape: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEV)


def check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 128, 576])
@pytest.mark.parametrize("t", [1, 13])
def test_rms_norm(t, hidden, dtype):
    x = randn(t, hidden, seed=hidden + t, dtype=dtype)
    w = 1 + 0.1 * randn(hidden, seed=1, dtype=dtype)
    with nan_outputs():
        got = tk.rms_norm(x, w, EPS)
    check(got, ref.rms_norm(x.double(), w.double(), EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 128, 576])
@pytest.mark.parametrize("t", [1, 13])
def test_add_rms_norm(t, hidden, dtype):
    x = randn(t, hidden, seed=hidden + t, dtype=dtype)
    res = randn(t, hidden, seed=hidden + t + 1, dtype=dtype)
    w = 1 + 0.1 * randn(hidden, seed=2, dtype=dtype)
    x_in, res_in = x.clone(), res.clone()
    with nan_outputs():
        normed, new_res = tk.add_rms_norm(x, res, w, EPS)
    want_normed, want_res = ref.add_rms_norm(x.double(), res.double(), w.double(), EPS)
    check(new_res, want_res, dtype)
    check(normed, want_normed, dtype)
    assert torch.equal(x, x_in) and torch.equal(res, res_in), "inputs must not be modified"


def test_norms_take_strided_rows():
    """Rows of a wider tensor (row stride > hidden) are read in place, not assumed contiguous."""
    wide = randn(5, 200, seed=3, dtype=torch.float32)
    x, res = wide[:, :128], wide[:, 64:192]
    w = randn(128, seed=4, dtype=torch.float32)
    check(tk.rms_norm(x, w, EPS), ref.rms_norm(x.double(), w.double(), EPS), torch.float32)
    normed, new_res = tk.add_rms_norm(x, res, w, EPS)
    want_normed, want_res = ref.add_rms_norm(x.double(), res.double(), w.double(), EPS)
    check(normed, want_normed, torch.float32)
    check(new_res, want_res, torch.float32)


def rope_tables(t: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, D/2] float32 (as the model keeps them) at random positions."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4096, (t,), generator=g).double()
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.outer(pos, inv)
    return ang.cos().float().to(DEV), ang.sin().float().to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [3, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("t", [1, 9])
def test_apply_rope(t, d, heads, dtype):
    x = randn(t, heads, d, seed=heads * d + t, dtype=dtype)
    cos, sin = rope_tables(t, d, seed=t)
    x_in = x.clone()
    with nan_outputs():
        got = tk.apply_rope(x, cos, sin)
    # oracle: the reference in float64 from cos/sin rounded to x's dtype, as HF and the kernel do
    want = ref.apply_rope(x.double(), cos.to(dtype).double(), sin.to(dtype).double())
    check(got, want, dtype)
    assert torch.equal(x, x_in)


def test_apply_rope_on_a_fused_qkv_view():
    """The model's call: q and k heads as a strided view of the fused qkv rows."""
    t, h, kvh, d = 6, 4, 2, 64
    qkv = randn(t, h + 2 * kvh, d, seed=5, dtype=torch.float32)
    cos, sin = rope_tables(t, d, seed=6)
    view = qkv[:, :h + kvh]
    got = tk.apply_rope(view, cos, sin)
    check(got, ref.apply_rope(view.double(), cos.double(), sin.double()), torch.float32)


@pytest.mark.parametrize("kvh", [3, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("t", [1, 11])
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_exactly_its_slots(dtype, t, d, kvh):
    num_blocks, bs = 8, 16
    g = torch.Generator().manual_seed(t * d + kvh)
    slots = torch.randperm(num_blocks * bs, generator=g)[:t]
    if t > 1:
        slots[[1, t - 2]] = -1  # padding tokens: skipped
    slots = slots.to(DEV)
    # k as the model passes it: a strided view (rotated heads after the query heads)
    k = randn(t, 2 + kvh, d, seed=7, dtype=dtype)[:, 2:]
    v = randn(t, kvh, d, seed=8, dtype=dtype)
    k_cache = torch.full((num_blocks, bs, kvh, d), math.nan, dtype=dtype, device=DEV)
    v_cache = torch.full_like(k_cache, math.nan)
    tk.store_kv(k, v, k_cache, v_cache, slots)
    kept = slots >= 0
    for cache, src in ((k_cache, k), (v_cache, v)):
        flat = cache.view(-1, kvh, d)
        assert torch.equal(flat[slots[kept]], src[kept]), "stored rows differ from the new K/V"
        others = torch.ones(num_blocks * bs, dtype=torch.bool, device=DEV)
        others[slots[kept]] = False
        assert flat[others].isnan().all(), "a slot outside slot_mapping was written"


def test_store_kv_casts_to_the_pool_dtype():
    k = randn(3, 2, 64, seed=9, dtype=torch.float32)
    v = randn(3, 2, 64, seed=10, dtype=torch.float32)
    k_cache = torch.full((2, 4, 2, 64), math.nan, dtype=torch.float16, device=DEV)
    v_cache = torch.full_like(k_cache, math.nan)
    slots = torch.tensor([6, 0, 3], device=DEV)
    tk.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 2, 64)[slots], k.half())
    assert torch.equal(v_cache.view(-1, 2, 64)[slots], v.half())


def test_bad_shapes_raise():
    x = randn(2, 4, 64, seed=11, dtype=torch.float32)
    cos, sin = rope_tables(2, 32, seed=1)  # for D = 32, not 64
    with pytest.raises(ValueError, match="cos/sin"):
        tk.apply_rope(x, cos, sin)
    with pytest.raises(ValueError, match="residual"):
        tk.add_rms_norm(x[:, 0], x[:1, 0], torch.ones(64, device=DEV), EPS)
    cache = torch.zeros(2, 4, 4, 64, device=DEV)
    with pytest.raises(ValueError, match="slot_mapping"):
        tk.store_kv(x, x, cache, cache.clone(), torch.tensor([0], device=DEV))
