#!/usr/bin/env bash
# The one command to run on a lent GPU (no network, no install): versions, the kernel tests compiled on CUDA, the
# kernel benchmark, then the model-level benchmarks (latency vs batch, SoT replay on 7B/13B/33B shapes, the paper's
# method on transformers). Everything lands in $OUT (default ./gpu_out). Each stage has its own time limit and a
# stage that fails or times out does not stop the next one; results are copied to $OUT after every stage, so a
# command killed from outside still leaves what was measured. The CUDA extension (csrc/cuda, the "cuda" backend) is
# JIT-built in the background while the Triton tests run; its tests run after, and a failed build is reported and
# skips them, nothing else.
#   bash benchmarks/gpu_check.sh              # all stages (~22 minutes)
#   bash benchmarks/gpu_check.sh kernels      # env, tests/kernels (+ CUDA build), benchmarks.kernels_gpu (~9.5 min)
#   bash benchmarks/gpu_check.sh latency      # env, benchmarks.latency on llama-7b/13b, 33b at B=1 (~4 minutes)
#   bash benchmarks/gpu_check.sh e2e          # env, SoT replay ours + paper's method           (~9 minutes)
#   QUICK=1 bash benchmarks/gpu_check.sh kernels   # the kernel benchmark's --quick sweep
# Stage names may also be given one by one: env pytest kernels_bench latency latency33 tp replay7 hf7 replay13
# hf13 replay33 (tp: benchmarks.tensor_parallel and latency at 33B over all GPUs, when there are several).
# Limits (seconds) can be overridden through the variables below.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_out}"
# PACK=1 (the device tool, which brings back at most 8 files): work in a scratch folder and keep one tarball of
# it, refreshed after every stage, as $OUT/gpu_check.tar.gz
PACK_TO=""
if [ -n "${PACK:-}" ]; then PACK_TO="$OUT/gpu_check.tar.gz"; mkdir -p "$OUT"; OUT="$(mktemp -d)"; fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset SOT_BENCH_RESULTS TRITON_INTERPRET  # compiled kernels, results in benchmarks/results/cuda
PYTEST_S="${PYTEST_S:-210}"    # tests/kernels but the CUDA kernel's, compiled (bf16 cases included)
BUILD_S="${BUILD_S:-200}"      # the CUDA extension's JIT build, alongside the Triton tests
CUDA_TEST_S="${CUDA_TEST_S:-90}"  # tests/kernels/test_cuda_decode.py
BENCH_S="${BENCH_S:-250}"      # hard limit for the kernel benchmark; it stops starting configs at BENCH_BUDGET_S
BENCH_BUDGET_S="${BENCH_BUDGET_S:-190}"
# the JIT build folder (sot_engine/kernels/cuda.py); outside $OUT, whose files come back to the caller
export SOT_CUDA_BUILD_DIR="${SOT_CUDA_BUILD_DIR:-${TMPDIR:-/tmp}/sot-engine-cuda-build}"
LATENCY_S="${LATENCY_S:-170}"  # latency 7B + 13B; new measurements stop at LATENCY_BUDGET_S
LATENCY_BUDGET_S="${LATENCY_BUDGET_S:-120}"
LATENCY33_S="${LATENCY33_S:-75}"
TP_S="${TP_S:-150}"                 # tensor parallelism over every GPU lent (skipped with one)
E2E_BUDGET_S="${E2E_BUDGET_S:-45}"  # per replay stage: no new question after this (model load not counted)
E2E_S="${E2E_S:-110}"               # per replay stage hard limit (start, load, warm-up, budget, the last question)
RECORDS="${RECORDS:-benchmarks/results/cpu/sot_vicuna80_auto_paper.jsonl}"
start=$(date +%s)

collect() {  # results so far, into $OUT (and its tarball with PACK=1)
  mkdir -p "$OUT/results_cuda"
  cp -r benchmarks/results/cuda/. "$OUT/results_cuda/" 2>/dev/null || true
  if [ -n "$PACK_TO" ]; then tar czf "$PACK_TO.tmp" -C "$OUT" . && mv "$PACK_TO.tmp" "$PACK_TO"; fi
}

stage() {  # stage NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.txt, never fail the script
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout -k 15 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "$name rc=${PIPESTATUS[0]} (124: timed out; partial results are still saved)" | tee -a "$OUT/$name.txt"
  collect
}

env_stage() {
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
}

start_cuda_build() {  # JIT-build the CUDA extension in the background; cuda_tests waits for it
  echo "== CUDA extension: JIT build in the background (limit ${BUILD_S}s, folder $SOT_CUDA_BUILD_DIR)"
  build_log="$(mktemp)"
  ( SOT_CUDA_VERBOSE=1 timeout -k 10 "$BUILD_S" python - <<'PY'
import time
t0 = time.time()
from sot_engine.kernels.cuda import load_extension
try:
    ext = load_extension()
except Exception as e:  # noqa: BLE001
    raise SystemExit(f"CUDA extension FAILED after {time.time() - t0:.0f}s: {e}")
print(f"CUDA extension ready in {time.time() - t0:.0f}s: {ext.__file__}")
PY
  ) > "$build_log" 2>&1 &
  build_pid=$!
}

cuda_tests() {  # the build's log, then its tests if it built (else the benchmark goes on without it)
  wait "$build_pid"
  local build_rc=$?
  rm -f "$SOT_CUDA_BUILD_DIR/lock"  # left by a build the timeout killed; it would block every later load
  { echo "== CUDA extension build log (rc=$build_rc; 124: timed out)"; tail -n 60 "$build_log"; } 2>&1 \
    | tee "$OUT/cuda_build.txt"
  rm -f "$build_log"
  if [ "$build_rc" -eq 0 ]; then
    SOT_REQUIRE_CUDA_EXT=1 stage pytest_cuda "$CUDA_TEST_S" python -m pytest -q tests/kernels/test_cuda_decode.py \
      -p no:cacheprovider
  else
    export SOT_CUDA_JIT=0  # the benchmark reports the kernel as unavailable instead of building it again
    echo "== CUDA extension unavailable: its tests are skipped, the benchmark goes on without it" \
      | tee -a "$OUT/cuda_build.txt"
  fi
}

replay() {  # replay NAME MODEL SYSTEM
  stage "$1" "$E2E_S" python -m benchmarks.sot_e2e replay --records "$RECORDS" --model "$2" --systems "$3" \
    --per-category 1 --budget-s "$E2E_BUDGET_S"
}

run_stage() {
  case "$1" in
    env) env_stage ;;
    pytest) start_cuda_build
            stage pytest_kernels "$PYTEST_S" python -m pytest -q tests/kernels -x -p no:cacheprovider \
              --ignore=tests/kernels/test_cuda_decode.py
            cuda_tests ;;
    kernels_bench) stage kernels_gpu_log "$BENCH_S" python -m benchmarks.kernels_gpu --out "$OUT" \
                     --budget-s "$BENCH_BUDGET_S" ${QUICK:+--quick} ;;
    latency) stage latency "$LATENCY_S" python -m benchmarks.latency --models llama-7b,llama-13b \
               --batches 1,2,4,8,16 --sot-members 4,16 --budget-s "$LATENCY_BUDGET_S" ;;
    latency33) stage latency33 "$LATENCY33_S" python -m benchmarks.latency --models llama-33b --batches 1 \
                 --sot-members '' ;;
    tp) ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)  # several GPUs lent: the 33B/70B shapes, split over them
        if [ "$ngpu" -ge 2 ]; then
          stage tp "$TP_S" python -m benchmarks.tensor_parallel --model random:llama-7b --tp 1 "$ngpu"
          stage latency33_tp "$TP_S" python -m benchmarks.latency --models llama-33b --batches 1,8 \
            --sot-members '' --tensor-parallel-size "$ngpu"
        else
          echo "== tp: skipped (one GPU)"
        fi ;;
    replay7) replay replay7 llama-7b ours ;;
    hf7) replay hf7 llama-7b hf ;;
    replay13) replay replay13 llama-13b ours ;;
    hf13) replay hf13 llama-13b hf ;;
    replay33) replay replay33 llama-33b ours ;;
    *) echo "unknown stage '$1'" ;;
  esac
}

stages=()
[ $# -eq 0 ] && set -- kernels latency e2e
for a in "$@"; do
  case "$a" in
    kernels) stages+=(pytest kernels_bench) ;;
    latency) stages+=(latency latency33 tp) ;;
    e2e) stages+=(replay7 hf7 replay13 hf13 replay33) ;;
    models) stages+=(latency latency33 replay7 hf7 replay13 hf13 replay33) ;;
    env) ;;
    *) stages+=("$a") ;;
  esac
done
env_stage
for s in "${stages[@]}"; do
  run_stage "$s"
done
collect
echo "== done in $(( $(date +%s) - start ))s; files in $OUT:"
ls -la "$OUT" "$OUT/results_cuda"
