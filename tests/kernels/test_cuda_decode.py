"""The hand-written CUDA paged decode kernel (csrc/cuda, backend "cuda") against the float64 torch reference.

Each kernel case runs two ways:
- "gpu": the compiled extension on a CUDA device (skipped without one; on the GPU check, where
  SOT_REQUIRE_CUDA_EXT=1, a build that fails is a test failure instead);
- "emulated": the same .cu compiled with g++ for the CPU (tests/kernels/cuda_emulator.cpp: every CUDA
  thread an OS thread), so indexing, masking, the online softmax and both merges are checked without a GPU
  (skipped without g++ or the CUDA toolkit's headers).
Inputs are poisoned as in test_triton_decode: pool slots outside every context hold NaN, table entries past
each sequence's pages hold ids far outside the pool, `out` (and the emulator's workspace) start as NaN;
block tables are shuffled ids. Tolerances: fp32 math in the kernel, then one rounding of the output to
its dtype (fp16: 2^-11 relative, bf16: 2^-8), so rtol is about twice that.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from sot_engine import kernels
from sot_engine.kernels import BackendUnavailable, get_backend
from sot_engine.kernels import reference as ref
from sot_engine.kernels.cascade import attention_lse
from tests.kernels import cuda_emulator
from tests.kernels.test_triton_decode import expected, paged_inputs

HAS_CUDA = torch.cuda.is_available()
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-4),
       torch.bfloat16: dict(rtol=8e-3, atol=1e-3)}
DTYPES = list(TOL)


class Gpu:
    """The compiled extension, with the device and SM count the tests need beside its functions."""
    device = torch.device("cuda")

    def __init__(self, ext) -> None:
        self.ext = ext
        self.num_sms = torch.cuda.get_device_properties(0).multi_processor_count

    def __getattr__(self, name):
        return getattr(self.ext, name)


def gpu_impl() -> Gpu:
    if not HAS_CUDA:
        pytest.skip("no CUDA GPU: the compiled kernel cannot run here (the emulated variant checks its logic)")
    from sot_engine.kernels import cuda
    try:
        return Gpu(cuda.load_extension())
    except BackendUnavailable as e:
        if os.environ.get("SOT_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"the CUDA extension is required here (SOT_REQUIRE_CUDA_EXT=1) but: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="module", params=["gpu", "emulated"])
def impl(request, tmp_path_factory):
    """The kernel's entry point with the extension's signature: the real one on a GPU, else the CPU emulation."""
    if request.param == "gpu":
        return gpu_impl()
    if HAS_CUDA:
        pytest.skip("the compiled kernel runs here: no need for its emulation")
    if why := cuda_emulator.unavailable():
        pytest.skip(f"CUDA kernel emulation: {why}")
    return cuda_emulator.build(tmp_path_factory.mktemp("cuda_emulator"))


@pytest.fixture(scope="module")
def gpu() -> Gpu:
    return gpu_impl()


def run(impl, q, k_bad, v_bad, table, lens, scale, partition_size=0, max_context_len=None,
        len_dtype=torch.int64, return_lse=False):
    """The kernel on impl's device, writing into a NaN-filled `out`; results back on the CPU."""
    dev = impl.device
    out = torch.full(q.shape, math.nan, dtype=q.dtype, device=dev)
    res, lse = impl.paged_decode_attention(
        q.to(dev), k_bad.to(dev), v_bad.to(dev), table.to(dev), torch.tensor(lens, dtype=len_dtype, device=dev),
        scale, max_context_len or max(lens), partition_size, out, return_lse)
    assert res is out and (lse is not None) == return_lse
    return (res.cpu(), lse.cpu()) if return_lse else res.cpu()


def check(out, q, k, v, oracle_table, lens, scale, want=None):
    assert not out.isnan().any()
    want = expected(q, k, v, oracle_table, lens, scale) if want is None else want
    torch.testing.assert_close(out.double(), want.cpu(), **TOL[q.dtype])


# (heads, kv_heads, head_dim, block_size, context lens, partition size (0: the kernel's own choice), dtype).
# GQA groups 1/2/3/4/5/7/8/16 (16: two thread blocks per KV head), head_dim 64/128, pages of 16/32 and 5,
# ragged batches, partitions that split pages (40, 48) and hold several block steps (128). On a GPU every
# case runs in every dtype; emulated (slow: OS threads), in the dtype named here.
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = {
    "mha-d64-bs16-ragged-one-partition": (4, 4, 64, 16, [1, 17, 70, 33], 0, F32),
    "gqa3-d64-bs16-ragged-split40": (6, 2, 64, 16, [1, 17, 70, 33, 130], 40, F16),
    "gqa4-d128-bs32-split64": (8, 2, 128, 32, [200, 31, 64], 64, BF16),
    "gqa8-d128-bs16-one-partition": (8, 1, 128, 16, [200, 3], 0, F16),
    "gqa8-d64-bs32-split128": (8, 1, 64, 32, [190, 1, 129], 128, BF16),
    "mha-d128-bs32-split48": (2, 2, 128, 32, [97, 48, 49], 48, F32),
    "gqa16-d64-bs16-split32": (16, 1, 64, 16, [50, 77], 32, BF16),
    "gqa5-d128-bs5-split8": (10, 2, 128, 5, [23, 1, 11], 8, F16),
    "gqa7-d64-bs16-split16": (7, 1, 64, 16, [40, 16], 16, F32),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_reference(impl, case):
    heads, kvh, d, bs, lens, psize, dtype = case
    for dt in DTYPES if impl.device.type == "cuda" else [dtype]:
        q, k, v, k_bad, v_bad, table, oracle = paged_inputs(lens, heads, kvh, d, bs, seed=heads * 1000 + d + bs,
                                                            dtype=dt)
        scale = d ** -0.5
        check(run(impl, q, k_bad, v_bad, table, lens, scale, psize), q, k, v, oracle, lens, scale)


def test_every_dtype(impl):
    """fp32, fp16 and bf16 on one split GQA case (each dtype's loads, conversions and output rounding)."""
    lens = [33, 70]
    for dt in DTYPES:
        q, k, v, k_bad, v_bad, table, oracle = paged_inputs(lens, 4, 2, 64, 16, seed=21, dtype=dt)
        check(run(impl, q, k_bad, v_bad, table, lens, 0.125, 32), q, k, v, oracle, lens, 0.125)


@pytest.mark.parametrize("lens, bs", [([1], 16), ([16], 16), ([5], 32), ([1, 1, 1], 32)],
                         ids=["context1", "one-full-block", "one-partial-block", "batch-of-context1"])
def test_tiny_contexts(impl, lens, bs):
    q, k, v, k_bad, v_bad, table, oracle = paged_inputs(lens, 8, 2, 64, bs, seed=sum(lens) + bs)
    out = run(impl, q, k_bad, v_bad, table, lens, 0.125, partition_size=4)  # splits the 16- and 5-token contexts
    check(out, q, k, v, oracle, lens, 0.125)
    if lens == [1]:  # one token: the output is its V row, whatever the scores
        torch.testing.assert_close(out[0], v[table[0, 0], 0].repeat_interleave(4, dim=0), rtol=0, atol=0)


@pytest.mark.parametrize("psize", [0, 24], ids=["one-partition", "split"])
def test_lse_int32_metadata_loose_max_len(impl, psize):
    """int32 tables/lens, a max_context_len above the true max (extra partitions), and the log-sum-exp."""
    lens = [70, 9, 33]
    q, k, v, k_bad, v_bad, table, oracle = paged_inputs(lens, 4, 1, 128, 16, seed=3, table_dtype=torch.int32)
    out, lse = run(impl, q, k_bad, v_bad, table, lens, 0.1, psize, max_context_len=150, len_dtype=torch.int32,
                   return_lse=True)
    check(out, q, k, v, oracle, lens, 0.1)
    for s, n in enumerate(lens):
        kk, vv = ref.gather_kv(k.double(), oracle[s], n), ref.gather_kv(v.double(), oracle[s], n)
        want = attention_lse(q[s:s + 1].double(), kk, vv, 0.1)[1][0]
        torch.testing.assert_close(lse[s].double(), want, rtol=1e-5, atol=1e-5)


def test_strided_q_and_out(impl):
    """q as the model passes it (a view into the fused qkv rows) and an `out` that is a view too."""
    lens, heads, kvh, d = [20, 50], 4, 2, 128
    q, k, v, k_bad, v_bad, table, oracle = paged_inputs(lens, heads, kvh, d, 16, seed=9, dtype=torch.float16)
    qkv = torch.randn(len(lens), heads + 2 * kvh, d).half()
    qkv[:, :heads] = q
    dev = impl.device
    big = torch.full((len(lens), heads + 3, d), math.nan, dtype=q.dtype, device=dev)
    out = big[:, 1:1 + heads]
    res, _ = impl.paged_decode_attention(qkv[:, :heads].to(dev), k_bad.to(dev), v_bad.to(dev), table.to(dev),
                                         torch.tensor(lens, device=dev), 0.2, max(lens), 16, out, False)
    check(res.cpu(), q, k, v, oracle, lens, 0.2)
    assert big[:, 0].isnan().all() and big[:, 1 + heads:].isnan().all()  # nothing written outside `out`


def test_automatic_partitions(impl):
    """The kernel's own split for a small batch with long contexts: several partitions, merged exactly."""
    lens, heads, kvh, d = [1, 600, 300, 77], 4, 1, 64
    q, k, v, k_bad, v_bad, table, oracle = paged_inputs(lens, heads, kvh, d, 16, seed=13, dtype=torch.bfloat16)
    assert -(-600 // impl.default_partition_size(4, heads, kvh, 600, impl.num_sms)) > 1  # the case does split
    check(run(impl, q, k_bad, v_bad, table, lens, d ** -0.5), q, k, v, oracle, lens, d ** -0.5)


def test_heads_per_block_and_partition_size(impl):
    assert [impl.heads_per_block(g) for g in (1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 16, 24)] == \
        [1, 2, 3, 4, 5, 7, 8, 3, 1, 6, 8, 8]
    sms = 132
    for batch, heads, kvh, max_len in [(1, 32, 32, 8192), (8, 32, 8, 2048), (1, 9, 3, 512), (32, 32, 32, 8192),
                                       (3, 32, 8, 1000), (1, 8, 1, 100)]:
        size = impl.default_partition_size(batch, heads, kvh, max_len, sms)
        blocks = batch * heads // impl.heads_per_block(heads // kvh)
        parts = -(-max_len // size)
        assert size % 64 == 0 and size >= 256
        assert parts == 1 or blocks * parts >= sms or size == 256  # a wave at least, unless partitions are minimal
        assert blocks * (parts - 1) < 2 * sms  # no more partitions than two waves need


# ------------------------------------------------------------------------------------- GPU only
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads, kvh", [(32, 32), (32, 8), (32, 4)], ids=["mha", "gqa4", "gqa8"])
def test_long_ragged_batch_on_gpu(gpu, dtype, heads, kvh):
    """Long contexts: the kernel's own split (several partitions), forced ones, and one partition of 4096."""
    lens = [1, 300, 1000, 77, 4096, 2049]
    q, k, v, k_bad, v_bad, table, oracle = paged_inputs(lens, heads, kvh, 128, 16, seed=5, dtype=dtype)
    want = ref.paged_decode_attention(q.cuda().double(), k.cuda().double(), v.cuda().double(), oracle.cuda(),
                                      torch.tensor(lens).cuda(), 128 ** -0.5)  # float64 oracle, on the GPU for speed
    for psize in (0, 256, 1000, 4096):
        check(run(gpu, q, k_bad, v_bad, table, lens, 128 ** -0.5, psize), q, k, v, oracle, lens, 128 ** -0.5, want)


@needs_gpu
def test_bad_arguments_raise(gpu):
    dev = "cuda"
    q, k, v, _, _, table, _ = paged_inputs([40], 4, 2, 64, 16, seed=1, dtype=torch.float16)
    q, k, v, table, lens = q.to(dev), k.to(dev), v.to(dev), table.to(dev), torch.tensor([40], device=dev)
    call = gpu.paged_decode_attention
    with pytest.raises(ValueError, match="share a dtype"):
        call(q.float(), k, v, table, lens, 0.1, 40)
    with pytest.raises(ValueError, match="head_dim 32 is not compiled"):
        call(q[..., :32], k[..., :32].contiguous(), v[..., :32].contiguous(), table, lens, 0.1, 40)
    with pytest.raises(ValueError, match="KV heads"):
        call(q[:, :3], k, v, table, lens, 0.1, 40)
    with pytest.raises(ValueError, match="16 bytes"):
        flat = torch.zeros(k.numel() + 1, dtype=k.dtype, device=dev)[1:].view(k.shape)  # base off by 2 bytes
        call(q, flat, v, table, lens, 0.1, 40)
    with pytest.raises(ValueError, match="out must be"):
        call(q, k, v, table, lens, 0.1, 40, 0, torch.empty(1, 4, 32, dtype=q.dtype, device=dev))
    with pytest.raises(ValueError, match="CUDA tensor"):
        call(q.cpu(), k, v, table, lens, 0.1, 40)
    with pytest.raises(ValueError, match="must be on"):
        call(q, k.cpu(), v, table, lens, 0.1, 40)


@needs_gpu
def test_backend_wrapper_and_fallback(gpu):
    """The backend's entry: the CUDA kernel for what it is compiled for, Triton's for the rest (head_dim 32)."""
    from sot_engine.kernels import cuda
    b = get_backend("cuda", "cuda")
    assert b.name == "cuda" and b.paged_decode_attention is cuda.paged_decode_attention
    assert b.rms_norm is get_backend("triton", "cuda").rms_norm  # everything else is the Triton backend
    for d in (64, 32):
        lens = [5, 40]
        q, k, v, _, _, table, oracle = paged_inputs(lens, 4, 2, d, 16, seed=d)
        got = b.paged_decode_attention(q.cuda(), k.cuda(), v.cuda(), table.cuda(), torch.tensor(lens).cuda(),
                                       d ** -0.5)
        torch.testing.assert_close(got.cpu().double(), expected(q, k, v, oracle, lens, d ** -0.5), **TOL[q.dtype])
        out, lse = b.paged_decode_attention(q.cuda(), k.cuda(), v.cuda(), table.cuda(), torch.tensor(lens).cuda(),
                                            d ** -0.5, max(lens), partition_size=16, return_lse=True)
        assert lse.shape == (2, 4) and lse.dtype == torch.float32 and torch.isfinite(lse).all()
        torch.testing.assert_close(out, got, rtol=1e-5, atol=1e-6)


@needs_gpu
def test_engine_cuda_matches_triton_token_for_token(gpu, tmp_path, monkeypatch):
    """A tiny random LLaMA with head_dim 64 (the kernel's, unlike the shared 'tiny' shape's 32), fp32, greedy:
    the cuda backend generates what the triton backend does, and its decode steps did run the CUDA kernel."""
    from sot_engine.engine import LLM, SamplingParams
    from sot_engine.engine.config import shape
    from sot_engine.kernels import cuda
    from tests.conftest import make_hf_model, save_hf
    folder = save_hf(make_hf_model(shape("tiny", hidden_size=256), seed=17), tmp_path / "tiny_d64")
    calls = []
    real = cuda.load_extension().paged_decode_attention
    monkeypatch.setattr(cuda.load_extension(), "paged_decode_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw), raising=False)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    g = torch.Generator().manual_seed(11)
    batch = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 5, 17, 40)]
    out = {}
    for name in ("triton", "cuda"):
        llm = LLM(str(folder), backend=name, device="cuda", dtype=torch.float32, block_size=16)
        assert llm.engine.backend.name == name and llm.engine.config.head_dim == 64
        out[name] = [o.token_ids for o in llm.generate(batch, greedy)]
    assert out["cuda"] == out["triton"]
    assert all(len(t) == greedy.max_tokens for t in out["cuda"])
    assert len(calls) >= 2 * (greedy.max_tokens - 1)  # every layer of every decode step


# ------------------------------------------------------------------------------------- any machine
def test_unavailable_without_gpu_or_build(monkeypatch):
    from sot_engine.kernels import cuda
    with pytest.raises(BackendUnavailable, match="CUDA GPUs only"):
        get_backend("cuda", "cpu")
    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(cuda, "_failure", None)
    attempts = []

    def failing_build():
        attempts.append(1)
        raise RuntimeError("Error building extension 'sot_cuda_kernels'\npaged_decode.cu(1): error: simulated")
    monkeypatch.setattr(cuda, "_import_or_build", failing_build)
    for _ in range(2):  # the failure is remembered: no second build
        with pytest.raises(BackendUnavailable, match="building sot_engine.kernels._cuda failed.*simulated"):
            get_backend("cuda", "cuda")
    assert attempts == [1]
    monkeypatch.setitem(kernels.DEFAULT_ORDER, "cuda", ["cuda", "torch"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert get_backend(None, "cuda").name == "torch"  # a failed build falls back, with one warning
    assert len(caught) == 1 and "simulated" in str(caught[0].message)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only message")
def test_no_gpu_message(monkeypatch):
    from sot_engine.kernels import cuda
    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(cuda, "_failure", None)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        get_backend("cuda", "cuda")
    assert kernels.DEFAULT_ORDER["cuda"][0] == "triton"  # never picked unasked
