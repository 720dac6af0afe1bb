"""The C++ CPU kernels (csrc/cpu, module kernels._cpp): each against a float64 oracle, the "cpp"
backend end to end against torch token for token, and the fallback when the extension is missing.

Skipped where the extension is not built (`pip install -e . --no-build-isolation` builds it; CI's
scripts/install.sh does), except the fallback test, which needs no build.
"""
from __future__ import annotations

import builtins
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import BackendUnavailable, get_backend, reference

try:
    from kernels import _cpp
except ImportError as e:
    _cpp, _why = None, f"C++ extension kernels._cpp not built ({e})"
else:
    _why = ""
needs_cpp = pytest.mark.skipif(_cpp is None, reason=_why or "built")


# ---------------------------------------------------------------------------------------------- linear
@needs_cpp
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(37, 77), (130, 576), (5, 3), (64, 8)])
def test_linear_kernel_matches_float64(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    want = F.linear(x.double(), w.double())
    tol = 1e-5 * k ** 0.5
    torch.testing.assert_close(_cpp.linear_rows(x, w).double(), want, rtol=0, atol=tol)
    torch.testing.assert_close(_cpp.linear(x, w).double(), want, rtol=0, atol=tol)  # the dispatching entry


@needs_cpp
def test_linear_falls_back_outside_its_case():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 20, generator=g)
    for x in (torch.randn(40, 20, generator=g), torch.randn(3, 20, generator=g).double(),
              torch.randn(2, 3, 20, generator=g)):
        torch.testing.assert_close(_cpp.linear(x, w.to(x.dtype)), F.linear(x, w.to(x.dtype)))
    xt = torch.randn(20, 4, generator=g).t()  # non-contiguous rows
    torch.testing.assert_close(_cpp.linear(xt, w), F.linear(xt, w))
    with pytest.raises(RuntimeError, match="linear_rows"):
        _cpp.linear_rows(torch.randn(2, 20, generator=g).double(), w.double())


# ---------------------------------------------------------------------------------------- paged decode
def make_pool(lens, heads, kvh, d, bs, seed):
    """Random q and pools with each sequence's blocks scattered (shuffled) through the pool."""
    g = torch.Generator().manual_seed(seed)
    nblk = [(n + bs - 1) // bs for n in lens]
    total = sum(nblk) + 3
    k_cache = torch.randn(total, bs, kvh, d, generator=g)
    v_cache = torch.randn(total, bs, kvh, d, generator=g)
    perm = torch.randperm(total, generator=g)
    tables = torch.zeros(len(lens), max(nblk), dtype=torch.int64)
    at = 0
    for s, nb in enumerate(nblk):
        tables[s, :nb] = perm[at:at + nb]
        at += nb
    q = torch.randn(len(lens), heads, d, generator=g)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int64)


@needs_cpp
@pytest.mark.parametrize("bs", [4, 16])
@pytest.mark.parametrize("heads,kvh", [(4, 4), (6, 2), (8, 2), (9, 3)])
def test_paged_decode_matches_reference(bs, heads, kvh):
    lens = [1, 5, bs, bs + 1, 3 * bs - 1, 50]
    q, kc, vc, tables, ctx = make_pool(lens, heads, kvh, 32, bs, seed=bs + heads)
    want = reference.paged_decode_attention(q.double(), kc.double(), vc.double(), tables, ctx, 0.17)
    got = _cpp.paged_decode_attention(q, kc, vc, tables, ctx, 0.17, max(lens))
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    from kernels.cpp import paged_decode_attention  # the backend's wrapper, int32 lengths too
    got = paged_decode_attention(q, kc, vc, tables.int(), ctx.int(), 0.17)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


@needs_cpp
def test_paged_decode_other_dtypes_use_the_reference():
    from kernels.cpp import paged_decode_attention
    q, kc, vc, tables, ctx = make_pool([3, 9], 4, 2, 16, 4, seed=5)
    q, kc, vc = q.double(), kc.double(), vc.double()
    torch.testing.assert_close(paged_decode_attention(q, kc, vc, tables, ctx, 0.25),
                               reference.paged_decode_attention(q, kc, vc, tables, ctx, 0.25))


# -------------------------------------------------------------------------------------------- engine
@needs_cpp
def test_backend_registry():
    b = get_backend("cpp", "cpu")
    assert b.name == "cpp" and b.linear is _cpp.linear
    assert b.paged_decode_attention.__module__ == "kernels.cpp"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # built: the CPU default, picked without a warning
        assert get_backend(None, "cpu").name == "cpp"
    with pytest.raises(BackendUnavailable, match="CPU only"):
        get_backend("cpp", "cuda")


@needs_cpp
def test_engine_matches_torch_token_for_token(tiny_dir):
    from engine import LLM, SamplingParams
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    g = torch.Generator().manual_seed(11)
    batch = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 5, 17, 40)]
    out = {}
    for name in ("torch", "cpp"):
        llm = LLM(str(tiny_dir), backend=name, device="cpu", dtype=torch.float32, block_size=16)
        assert llm.engine.backend.name == name
        out[name] = [o.token_ids for o in llm.generate(batch, greedy)]
    assert out["cpp"] == out["torch"]
    assert all(len(t) == greedy.max_tokens for t in out["cpp"])


# ------------------------------------------------------------------------------------------ fallback
def test_missing_extension_falls_back_to_torch_with_one_warning(monkeypatch):
    real_import = builtins.__import__

    def no_cpp(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "kernels._cpp" or (name == "kernels" and fromlist and "_cpp" in fromlist):
            raise ImportError("simulated: not built")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_cpp)
    for mod in ("kernels._cpp", "kernels.cpp"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    monkeypatch.delattr(kernels, "_cpp", raising=False)
    monkeypatch.delattr(kernels, "cpp", raising=False)
    monkeypatch.setitem(kernels.DEFAULT_ORDER, "cpu", ["cpp", "torch"])
    with pytest.raises(BackendUnavailable, match="not built"):
        get_backend("cpp", "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = get_backend(None, "cpu")
    assert b.name == "torch" and b.linear is None
    assert len(caught) == 1 and "kernels._cpp is not built" in str(caught[0].message)
