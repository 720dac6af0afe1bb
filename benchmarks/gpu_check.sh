#!/usr/bin/env bash
# The one command to run on a lent GPU (no network, no install): versions, the kernel tests compiled on CUDA,
# then the kernel benchmark. Everything lands in $OUT (default ./gpu_out); each stage has its own time limit so
# the whole stays under ~9 minutes, and a stage that fails or times out does not stop the next one.
#   bash benchmarks/gpu_check.sh            # from the repository root (or anywhere: it cds there)
#   QUICK=1 bash benchmarks/gpu_check.sh    # the benchmark's --quick sweep
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset SOT_BENCH_RESULTS TRITON_INTERPRET  # compiled kernels, results in benchmarks/results/cuda
PYTEST_S="${PYTEST_S:-210}"    # tests/kernels, compiled (bf16 cases included)
BENCH_S="${BENCH_S:-290}"      # hard limit for the benchmark; it stops starting configs at BENCH_BUDGET_S
BENCH_BUDGET_S="${BENCH_BUDGET_S:-230}"
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

echo "== pytest tests/kernels (limit ${PYTEST_S}s)"
timeout -k 10 "$PYTEST_S" python -m pytest -q tests/kernels -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest_kernels.txt"
echo "pytest rc=${PIPESTATUS[0]} (124: timed out)" | tee -a "$OUT/pytest_kernels.txt"

echo "== benchmarks.kernels_gpu (budget ${BENCH_BUDGET_S}s, limit ${BENCH_S}s)"
timeout -k 15 "$BENCH_S" python -m benchmarks.kernels_gpu --out "$OUT" --budget-s "$BENCH_BUDGET_S" \
  ${QUICK:+--quick} 2>&1 | tee "$OUT/kernels_gpu_log.txt"
echo "benchmark rc=${PIPESTATUS[0]} (124: timed out; partial results are still saved)" | tee -a "$OUT/kernels_gpu_log.txt"

mkdir -p "$OUT/results_cuda"
cp -r benchmarks/results/cuda/. "$OUT/results_cuda/" 2>/dev/null || echo "no benchmarks/results/cuda to copy"
echo "== done in $(( $(date +%s) - start ))s; files in $OUT:"
ls -la "$OUT"
