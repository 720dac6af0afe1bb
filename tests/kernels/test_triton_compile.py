"""Every Triton kernel compiled ahead of time for the design's GPUs, without a GPU: A100 (sm_80), RTX 3090
(sm_86) and H100 (sm_90), each checked against its architecture's limits.

The other kernel tests run in Triton's CPU interpreter, which executes a kernel's Python but never lowers it,
so it cannot see what only the compiler rejects: `tl.dot` shapes and dtypes, the half-precision dot paths it
never takes (the interpreter upcasts), layouts, register pressure. Here a subprocess without
TRITON_INTERPRET calls each launcher on CPU tensors with its kernel launches captured instead of run, once
per architecture with `kernels.triton.arch.capability` answering that architecture's compute capability (the
launchers choose their tiles and warps from it, as they do on a GPU), and compiles every captured launch for
that architecture with the arguments, constexprs and options the launcher chose: TTIR -> TTGIR -> LLIR -> PTX
-> cubin (Triton's bundled ptxas). Each kernel must then fit its architecture (LIMITS): the shared memory the
compiler reserved (`metadata.shared`, what Triton checks against the device when it loads a kernel) within what
a block may use there, at most 255 registers a thread (cuobjdump) and the block's registers within the 64K
register file, and no local memory (spills) but the known ones (SPILLS_KNOWN). Skipped when the installed
Triton cannot compile for CUDA here.

`python tests/kernels/test_triton_compile.py --table` prints, per architecture and kernel, the configuration the
launcher chose, registers, shared memory and local memory (run it without TRITON_INTERPRET); without --table
it prints the JSON the test reads. All compiles run in one subprocess: ~2 minutes on 2 cores with an empty
Triton cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the design's GPUs: compute capability, and the shared memory one block may use (bytes). The CUDA C++
# Programming Guide (technical specifications per compute capability, and its shared memory sections for 8.x
# and 9.0), as the Ampere and Hopper tuning guides: "maximum amount of shared memory per thread block" 163 KB
# on 8.0 (A100), 99 KB on 8.6 (RTX 3090), 227 KB on 9.0 (H100), the largest shared memory carve-out of the SM
# (164 / 100 / 228 KB) less the 1 KB the driver reserves for each block. It is what
# cudaDevAttrMaxSharedMemoryPerBlockOptin reports, and Triton checks `metadata.shared` against that when it
# loads a kernel (triton/compiler/compiler.py). On all three: 64K 32-bit registers per SM (and per block), at
# most 255 per thread.
ARCHS = {"sm80": (8, 0), "sm86": (8, 6), "sm90": (9, 0)}
LIMITS = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm90": 227 * 1024}  # shared memory per block, bytes
MAX_REGS_PER_THREAD, REGS_PER_SM = 255, 64 * 1024
# (heads, kv heads, head_dim): LLaMA-7B (MHA: decode's multiply-sum path), a GQA-4 model, SmolLM2 (GQA-3, d 64),
# Gemma 3 270M (4 heads on one KV head, d 256)
SHAPES = {"mha-d128": (32, 32, 128), "gqa4-d128": (32, 8, 128), "gqa3-d64": (9, 3, 64), "gemma-d256": (4, 1, 256)}
# launcher calls (kind, shape, dtype, block size, split): each kernel in every dtype, each dtype over different
# shapes, pages of 16 and 32. A split (partition size = one page) adds decode's reduce kernel; cascade launches
# decode on the suffixes (float32 out with its log-sum-exp), the prefix pass and the merge.
CALLS = [
    ("decode", "mha-d128", "bf16", 16, True), ("decode", "gqa4-d128", "bf16", 16, False),
    ("decode", "gqa3-d64", "fp16", 32, True), ("decode", "mha-d128", "fp16", 32, False),
    ("decode", "gqa4-d128", "fp32", 16, True),
    ("cascade", "mha-d128", "bf16", 16, True), ("cascade", "gqa4-d128", "bf16", 16, True),
    ("cascade", "gqa3-d64", "fp16", 32, False),
    ("decode", "gemma-d256", "bf16", 16, True), ("decode", "gemma-d256", "fp32", 16, False),
    ("prefill", "gemma-d256", "bf16", 16, False), ("prefill", "gemma-d256", "fp32", 32, False),
    ("prefill", "gqa4-d128", "bf16", 16, False), ("prefill", "gqa3-d64", "bf16", 32, False),
    ("prefill", "mha-d128", "fp16", 16, False), ("prefill", "gqa4-d128", "fp32", 32, False),
    *[(kind, None, dt, None, None) for kind in ("norms", "rope-store") for dt in ("bf16", "fp16", "fp32")],
]


def call_id(call: tuple) -> str:
    kind, shape, dt, bs, split = call
    return "-".join(str(x) for x in (kind, shape, dt, bs and f"bs{bs}", split and "split") if x)


# float32 prefill (full-precision dots, done with FMAs: tl.dot's float32 "ieee" path) spills at every tile size
# tried, on every architecture (2-8 KB a thread with ptxas 13.4): float32 runs serve exact comparisons, not speed
SPILLS_KNOWN = {"prefill-gqa4-d128-fp32-bs32", "prefill-gemma-d256-fp32-bs32"}
KERNELS = {  # what each kind of call must launch, split or not
    "decode": {"_decode_partition_kernel"}, "prefill": {"_prefill_kernel"},
    "cascade": {"_decode_partition_kernel", "_prefix_kernel", "_merge_kernel"},
    "norms": {"_rms_norm_kernel"}, "rope-store": {"_rope_kernel", "_store_kv_kernel"},
}


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[dict]]:
    """All calls compiled in one subprocess (one torch/triton import), without the interpreter."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode or not proc.stdout.strip():
        pytest.fail(f"compile subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])  # Triton may print above it (ptxas failures)
    if "unavailable" in report:
        pytest.skip(report["unavailable"])
    return report["results"]


@pytest.mark.parametrize("arch,call", [(a, c) for a in ARCHS for c in CALLS],
                         ids=[f"{a}-{call_id(c)}" for a in ARCHS for c in CALLS])
def test_compiles_within_limits(compiled, arch, call):
    kernels = compiled[f"{arch}-{call_id(call)}"]
    errors = [f"{k['kernel']}: {k['error']}" for k in kernels if "error" in k]
    assert not errors, "\n\n".join(errors)
    want = KERNELS[call[0]] | ({"_decode_reduce_kernel"} if call[4] else set())
    assert {k["kernel"] for k in kernels} == want
    for k in kernels:
        assert {"ttir", "ttgir", "llir", "ptx", "cubin"} <= set(k["stages"]) and k["ptx_lines"] > 0
        assert k["shared"] <= LIMITS[arch], f"{k['kernel']}: {k['shared']} B shared memory, {arch} has {LIMITS[arch]}"
        if "regs" not in k:  # no cuobjdump
            continue
        # registers are allocated per warp in units of 256 (8 a thread)
        assert k["regs"] <= MAX_REGS_PER_THREAD and -(-k["regs"] // 8) * 8 * k["threads"] <= REGS_PER_SM, k
        if call_id(call) not in SPILLS_KNOWN:  # spills go to the stack frame
            assert k["local_bytes"] == 0 and k["stack_bytes"] == 0, f"{k['kernel']} spills on {arch}: {k}"


# ---- the subprocess: capture each call's launches, compile them ----


def _run_call(kind: str, shape: str | None, dt: str, bs: int | None, split: bool | None) -> None:
    """One launcher call on small CPU tensors shaped like the engine's (q a view of the fused qkv)."""
    import torch
    from sot_engine.kernels.cascade import find_groups
    from sot_engine.kernels.triton import cascade, decode, elementwise, prefill
    dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dt])
    if kind == "norms":
        x, w = torch.randn(3, 576, dtype=dtype), torch.randn(576, dtype=dtype)
        elementwise.rms_norm(x, w, 1e-5)
        elementwise.add_rms_norm(x, x.clone(), w, 1e-5)
        return
    if kind == "rope-store":
        qkv = torch.randn(3, 9 + 2 * 3, 64, dtype=dtype)
        elementwise.apply_rope(qkv[:, :9], torch.randn(3, 32), torch.randn(3, 32))
        pool = torch.zeros(4, 16, 3, 64, dtype=dtype)
        elementwise.store_kv(qkv[:, 9:12], qkv[:, 12:], pool, pool.clone(), torch.tensor([0, 5, 17]))
        return
    heads, kvh, d = SHAPES[shape]
    lens = [3 * bs + 5, 3 * bs + 9, 2 * bs + 1]  # rows 0 and 1 fork: they share two full blocks
    tables = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 6], [7, 8, 9, 0]])
    pool = torch.randn(10, bs, kvh, d, dtype=dtype)
    if kind == "prefill":
        qkv = torch.randn(sum(lens), heads + 2 * kvh, d, dtype=dtype)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        prefill.paged_prefill_attention(qkv[:, :heads], pool, pool.clone(), tables, cu, torch.tensor(lens), d ** -0.5)
        return
    q = torch.randn(len(lens), heads + 2 * kvh, d, dtype=dtype)[:, :heads]
    psize = bs if split else None
    if kind == "decode":
        decode.paged_decode_attention(q, pool, pool.clone(), tables, torch.tensor(lens), d ** -0.5,
                                      partition_size=psize)
    else:
        groups = find_groups(tables.tolist(), lens, bs)
        assert len(groups) == 1
        cascade.cascade_decode_attention(q, pool, pool.clone(), tables, torch.tensor(lens), d ** -0.5, groups,
                                         partition_size=psize, prefix_partition_size=psize)


def _capture_launches(call: tuple, arch: str) -> list[tuple]:
    """(kernel, bound arguments, options) of every launch the call makes, with the launchers choosing for
    `arch`; nothing runs."""
    import inspect
    from triton.runtime.jit import JITFunction
    from sot_engine.kernels.triton import arch as kernel_arch
    launches = []

    def capture(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in list(kwargs) if k not in self.arg_names}
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        bound.apply_defaults()
        launches.append((self, bound.arguments, options))

    real, JITFunction.run = JITFunction.run, capture
    real_capability, kernel_arch.capability = kernel_arch.capability, lambda device: ARCHS[arch]
    try:
        _run_call(*call)
    finally:
        JITFunction.run, kernel_arch.capability = real, real_capability
    return launches


def _specialize(value):
    """(signature type, constexpr value or None, divisible by 16), as Triton's JIT specializes an argument."""
    import torch
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
             torch.int64: "i64"}
    if isinstance(value, torch.Tensor):
        return "*" + names[value.dtype], None, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", None, False
    if isinstance(value, int):
        if value == 1:  # the JIT makes 1 a constant
            return "constexpr", 1, False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"no signature type for {value!r}")


def _compile(kernel, args: dict, options: dict, arch: str) -> dict:
    """Compile one launch for `arch`: its shared memory per block and threads (from the compiled kernel's
    metadata), its registers and local memory (spills) per thread (cuobjdump), and the launch configuration."""
    import tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, (name, value)) in enumerate(zip(kernel.params, args.items())):
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name], const, aligned = _specialize(value)
        if const is not None:
            constexprs[name] = const
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    major, minor = ARCHS[arch]
    compiled = triton.compile(src, target=GPUTarget("cuda", 10 * major + minor, 32), options=options)
    meta = compiled.metadata
    tiles = " ".join(f"{k}={v}" for k, v in constexprs.items() if k in ("BLOCK_M", "BLOCK_N", "ROWS", "GROUP_PAD"))
    result = {"kernel": kernel.__name__, "stages": list(compiled.asm), "ptx_lines": compiled.asm["ptx"].count("\n"),
              "shared": meta.shared, "threads": meta.num_warps * 32 * meta.num_ctas,
              "config": f"{tiles} warps={meta.num_warps} stages={meta.num_stages}".strip()}
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True).stdout
        fields = dict(kv.split(":", 1) for kv in usage.split("Function", 1)[-1].split() if ":" in kv[:-1])
        result.update(regs=int(fields["REG"]), local_bytes=int(fields["LOCAL"]), stack_bytes=int(fields["STACK"]))
    return result


def _probe() -> str | None:
    """Why the installed Triton cannot compile for every architecture here, or None when it can."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def double(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    for arch in ARCHS:
        try:
            _compile(double, {"x_ptr": torch.zeros(16), "n": 5, "BLOCK": 16}, {}, arch)
        except Exception as e:  # noqa: BLE001: any failure here means "cannot compile here", not a kernel bug
            return f"Triton {triton.__version__} cannot compile for {arch} without a GPU: {type(e).__name__}: {e}"
    return None


def main() -> None:
    """Print {"unavailable": why} or {"results": {call: [per-kernel result or {"error": ...}]}} as JSON."""
    sys.path.insert(0, str(ROOT))
    why = _probe()
    if why:
        print(json.dumps({"unavailable": why}))
        return
    results, done = {}, {}
    for arch in ARCHS:
        for call in CALLS:
            out = []
            try:
                for kernel, args, options in _capture_launches(call, arch):
                    key = (arch, kernel.__name__, repr([_specialize(v) if not p.is_constexpr else v
                                                        for p, v in zip(kernel.params, args.values())]), repr(options))
                    if key not in done:
                        try:
                            done[key] = _compile(kernel, args, options, arch)
                        except Exception as e:  # noqa: BLE001: reported per kernel, asserted by the test
                            done[key] = {"kernel": kernel.__name__, "error": f"{type(e).__name__}: {e}"[-3000:]}
                    out.append(done[key])
            except Exception as e:  # noqa: BLE001: the launcher itself failed
                out.append({"kernel": "launcher", "error": f"{type(e).__name__}: {e}"})
            results[f"{arch}-{call_id(call)}"] = out
    if "--table" in sys.argv:
        print_table(results)
    else:
        print(json.dumps({"results": results}))


def print_table(results: dict[str, list[dict]]) -> None:
    for call, kernels in results.items():
        for k in kernels:
            usage = k.get("error", "")[:200] or (
                f"{k.get('regs', '?'):>4} registers, {k['shared']:>6} B shared, "
                f"{k.get('stack_bytes', '?'):>5} B stack, {k.get('local_bytes', '?')} B local  {k['config']}")
            print(f"{call:41} {k['kernel']:26} {usage}")


if __name__ == "__main__":
    main()
