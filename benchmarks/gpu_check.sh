#!/usr/bin/env bash
# The one command to run on a lent GPU (no network, no install): versions, the kernel tests compiled on CUDA,
# then the kernel benchmark. Everything lands in $OUT (default ./gpu_out); each stage has its own time limit so
# the whole stays under ~9.5 minutes, and a stage that fails or times out does not stop the next one.
# The CUDA extension (csrc/cuda, the "cuda" backend) is JIT-built in the background while the Triton tests run;
# its tests run after, and a failed build is reported and skips them, nothing else.
#   bash benchmarks/gpu_check.sh            # from the repository root (or anywhere: it cds there)
#   QUICK=1 bash benchmarks/gpu_check.sh    # the benchmark's --quick sweep
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset SOT_BENCH_RESULTS TRITON_INTERPRET  # compiled kernels, results in benchmarks/results/cuda
PYTEST_S="${PYTEST_S:-210}"    # tests/kernels but the CUDA kernel's, compiled (bf16 cases included)
BUILD_S="${BUILD_S:-200}"      # the CUDA extension's JIT build, alongside the Triton tests
CUDA_TEST_S="${CUDA_TEST_S:-90}"  # tests/kernels/test_cuda_decode.py
BENCH_S="${BENCH_S:-250}"      # hard limit for the benchmark; it stops starting configs at BENCH_BUDGET_S
BENCH_BUDGET_S="${BENCH_BUDGET_S:-190}"
# the JIT build folder (kernels/cuda.py); outside $OUT, whose files come back to the caller
export SOT_CUDA_BUILD_DIR="${SOT_CUDA_BUILD_DIR:-${TMPDIR:-/tmp}/sot-engine-cuda-build}"
start=$(date +%s)

{
  echo "== $(date -u +%FT%TZ) gpu_check in $PWD, output in $OUT"
  echo "== git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --short 2>/dev/null | wc -l) changed files"
  echo "== nvidia-smi"
  nvidia-smi || echo "nvidia-smi failed (rc $?)"
  echo "== versions"
  python - <<'PY'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs", "cc", f"{p.major}.{p.minor}")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:  # noqa: BLE001
    print("triton not importable:", e)
for mod in ("transformers", "pytest", "matplotlib"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as e:  # noqa: BLE001
        print(mod, "missing:", type(e).__name__)
PY
} 2>&1 | tee "$OUT/env.txt"

echo "== CUDA extension: JIT build in the background (limit ${BUILD_S}s, folder $SOT_CUDA_BUILD_DIR)"
build_log="$(mktemp)"
( SOT_CUDA_VERBOSE=1 timeout -k 10 "$BUILD_S" python - <<'PY'
import time
t0 = time.time()
from kernels.cuda import load_extension
try:
    ext = load_extension()
except Exception as e:  # noqa: BLE001
    raise SystemExit(f"CUDA extension FAILED after {time.time() - t0:.0f}s: {e}")
print(f"CUDA extension ready in {time.time() - t0:.0f}s: {ext.__file__}")
PY
) > "$build_log" 2>&1 &
build_pid=$!

echo "== pytest tests/kernels except the CUDA kernel's (limit ${PYTEST_S}s)"
timeout -k 10 "$PYTEST_S" python -m pytest -q tests/kernels -x -p no:cacheprovider \
  --ignore=tests/kernels/test_cuda_decode.py 2>&1 | tee "$OUT/pytest_kernels.txt"
echo "pytest rc=${PIPESTATUS[0]} (124: timed out)" | tee -a "$OUT/pytest_kernels.txt"

wait "$build_pid"
build_rc=$?
rm -f "$SOT_CUDA_BUILD_DIR/lock"  # left by a build the timeout killed; it would block every later load
{
  echo "== CUDA extension build log (rc=$build_rc; 124: timed out)"
  tail -n 60 "$build_log"
} 2>&1 | tee -a "$OUT/pytest_kernels.txt"
rm -f "$build_log"
if [ "$build_rc" -eq 0 ]; then
  echo "== pytest tests/kernels/test_cuda_decode.py (limit ${CUDA_TEST_S}s)" | tee -a "$OUT/pytest_kernels.txt"
  SOT_REQUIRE_CUDA_EXT=1 timeout -k 10 "$CUDA_TEST_S" python -m pytest -q tests/kernels/test_cuda_decode.py \
    -p no:cacheprovider 2>&1 | tee -a "$OUT/pytest_kernels.txt"
  echo "pytest cuda rc=${PIPESTATUS[0]} (124: timed out)" | tee -a "$OUT/pytest_kernels.txt"
else
  export SOT_CUDA_JIT=0  # the benchmark reports the kernel as unavailable instead of building it again
  echo "== CUDA extension unavailable: its tests are skipped, the benchmark goes on without it" \
    | tee -a "$OUT/pytest_kernels.txt"
fi

echo "== benchmarks.kernels_gpu (budget ${BENCH_BUDGET_S}s, limit ${BENCH_S}s)"
timeout -k 15 "$BENCH_S" python -m benchmarks.kernels_gpu --out "$OUT" --budget-s "$BENCH_BUDGET_S" \
  ${QUICK:+--quick} 2>&1 | tee "$OUT/kernels_gpu_log.txt"
echo "benchmark rc=${PIPESTATUS[0]} (124: timed out; partial results are still saved)" | tee -a "$OUT/kernels_gpu_log.txt"

mkdir -p "$OUT/results_cuda"
cp -r benchmarks/results/cuda/. "$OUT/results_cuda/" 2>/dev/null || echo "no benchmarks/results/cuda to copy"
echo "== done in $(( $(date +%s) - start ))s; files in $OUT:"
ls -la "$OUT"
