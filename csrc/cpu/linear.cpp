// Weight matmul of a decode step: out[m, n] = sum_k x[m, k] * w[n, k].
//
// Decode is bound by reading the weights (M <= 16 rows of x, megabytes of w), so the kernel reads
// each weight row from memory once for all M rows: an MR x NR micro-tile (MR rows of x, NR rows of w)
// accumulates in registers along k; for one block of NR weight rows every row tile of x runs before
// the next block, the block being re-read from L1. Weights may be stored as float32, bfloat16 or int8
// with a float32 scale per group of K / G weights of a row (sot_engine/kernels/weights.py): in registers they
// become the float32 weights exactly (bf16 << 16; int8 * its scale, one rounding, as
// Int8Weight.dequantize computes them), then every product and sum is float32.
#include "ops.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <type_traits>

SOT_NAMESPACE_BEGIN
namespace {

#if defined(SOT_SIMD_VECTOR)
// Software prefetch into L2 of the weights this far ahead of each row's read position (bytes; 0: none):
// the matrix is one contiguous stream, so this reaches a few rows past the tile. At 4-16 rows of x the tile
// is compute-bound, and without a deep prefetch its loads wait on DRAM instead of overlapping the FMAs.
// Measured on a 2-core AVX-512 Xeon, 425 MB of fp32 weights (1 / 8 / 16 rows, ms): none 21 / 51 / 49;
// 512 B to L1 18 / 32 / 46; 8 KiB to L2 15 / 18 / 26; 16 KiB 15 / 21 / 34.
#ifndef SOT_PREFETCH_BYTES
#define SOT_PREFETCH_BYTES 8192
#endif

// NV vectors of NR weight rows from k on, against MR rows of x (NV a compile-time count: the loop unrolls)
template <typename T, int MR, int NR, bool kScaled, int NV>
inline void vectors(const float* x, int64_t ldx, const T* w, int64_t K, int64_t k, const vf* sv, vf (&acc)[MR][NR]) {
  if constexpr (SOT_PREFETCH_BYTES > 0)
    for (int j = 0; j < NR; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(w + j * K + k) + SOT_PREFETCH_BYTES, _MM_HINT_T1);
  for (int v = 0; v < NV; ++v) {
    const int64_t kv = k + v * kLanes;
    vf wv[NR];
    for (int j = 0; j < NR; ++j) {
      wv[j] = vload(w + j * K + kv);
      if constexpr (kScaled) wv[j] = vmul(wv[j], sv[j]);
    }
    for (int i = 0; i < MR; ++i) {
      const vf xv = vload(x + i * ldx + kv);
      for (int j = 0; j < NR; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
    }
  }
}
#endif

// out[i * ldo + j] = sum_k x[i * ldx + k] * w[j * K + k],  i < MR, j < NR. With kScaled (int8), row j's
// weights in group g are multiplied by scale[j * G + g] first, the K / G weights of a group being one segment.
template <typename T, int MR, int NR, bool kScaled>
inline void tile(const float* x, int64_t ldx, const T* w, int64_t K, const float* scale, int64_t G, float* out,
                 int64_t ldo) {
  float res[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) res[i][j] = 0.f;
#if defined(SOT_SIMD_VECTOR)
  vf acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vzero();
  // a cache line of weights per row and step (int8: a 32-weight group, sot_engine/kernels/weights.py's INT8_GROUP)
  constexpr int kStep = kScaled ? 32 / kLanes : std::max<int>(1, 64 / (kLanes * int(sizeof(T))));
#endif
  const int64_t segments = kScaled ? G : 1, len = K / segments;
  for (int64_t g = 0; g < segments; ++g) {
    const int64_t k1 = (g + 1) * len;
    int64_t k = g * len;
#if defined(SOT_SIMD_VECTOR)
    vf sv[NR];
    if constexpr (kScaled)
      for (int j = 0; j < NR; ++j) sv[j] = vset1(scale[j * G + g]);
    for (; k + kStep * kLanes <= k1; k += kStep * kLanes) vectors<T, MR, NR, kScaled, kStep>(x, ldx, w, K, k, sv, acc);
    for (; k + kLanes <= k1; k += kLanes) vectors<T, MR, NR, kScaled, 1>(x, ldx, w, K, k, sv, acc);
#endif
    for (; k < k1; ++k)
      for (int j = 0; j < NR; ++j) {
        const float wk = kScaled ? to_float(w[j * K + k]) * scale[j * G + g] : to_float(w[j * K + k]);
        for (int i = 0; i < MR; ++i) res[i][j] += x[i * ldx + k] * wk;
      }
  }
#if defined(SOT_SIMD_VECTOR)
  // the horizontal sums, four at a time (they share one shuffle tree): at K = 576 the MR x NR reductions of a
  // tile cost a fifth of its FMA loop one by one
  float sums[MR * NR];
  const vf* flat = &acc[0][0];
  int f = 0;
  for (; f + 4 <= MR * NR; f += 4) vsum4(flat[f], flat[f + 1], flat[f + 2], flat[f + 3], sums + f);
  for (; f < MR * NR; ++f) sums[f] = vsum(flat[f]);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * ldo + j] = sums[i * NR + j] + res[i][j];
#else
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * ldo + j] = res[i][j];
#endif
}

// all M rows of x against NR weight rows, in row tiles of at most MRMAX
template <typename T, int NR, int MRMAX, bool kScaled>
inline void rows_block(const float* x, int64_t ldx, const T* w, int64_t K, const float* scale, int64_t G, float* out,
                       int64_t ldo, int64_t M) {
  for (int64_t m = 0; m < M; m += MRMAX) {
    const float* xm = x + m * ldx;
    float* om = out + m * ldo;
    switch (std::min<int64_t>(M - m, MRMAX)) {
#define SOT_TILE(r) \
  case r:           \
    if constexpr (r <= MRMAX) tile<T, r, NR, kScaled>(xm, ldx, w, K, scale, G, om, ldo); \
    break;
      SOT_TILE(1) SOT_TILE(2) SOT_TILE(3) SOT_TILE(4) SOT_TILE(5) SOT_TILE(6) SOT_TILE(7) SOT_TILE(8)
#undef SOT_TILE
      default: break;
    }
  }
}

// Rows the kernel serves; more rows are compute-bound and go to at::linear (MKL's sgemm).
constexpr int64_t kMaxRows = 16;

// out[:, b0 * NR : b1 * NR] (clipped to N), out's rows ldo apart
template <typename T, int NR, int MRMAX, bool kScaled>
void blocks(const float* x, int64_t ldx, const T* w, const float* scale, int64_t G, float* out, int64_t ldo,
            int64_t M, int64_t K, int64_t N, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n = b * NR;
    if (n + NR <= N) {
      rows_block<T, NR, MRMAX, kScaled>(x, ldx, w + n * K, K, kScaled ? scale + n * G : nullptr, G, out + n, ldo, M);
    } else {
      for (int64_t j = n; j < N; ++j)
        rows_block<T, 1, MRMAX, kScaled>(x, ldx, w + j * K, K, kScaled ? scale + j * G : nullptr, G, out + j, ldo, M);
    }
  }
}

// parts == 0: all of N on at::parallel_for's threads; else the calling thread's share `part` of `parts`
// (contiguous runs of NR-row blocks, so the threads of a parallel region split the weights evenly)
template <typename T, int NR, int MRMAX, bool kScaled = std::is_same_v<T, int8_t>>
void run(const float* x, int64_t ldx, const T* w, const float* scale, int64_t G, float* out, int64_t ldo, int64_t M,
         int64_t K, int64_t N, int part, int parts) {
  const int64_t nblocks = (N + NR - 1) / NR;
  if (parts > 0)
    return blocks<T, NR, MRMAX, kScaled>(x, ldx, w, scale, G, out, ldo, M, K, N, nblocks * part / parts,
                                         nblocks * (part + 1) / parts);
  // >= ~32 KiB of weights per task, so small matrices do not pay for threads they cannot use
  const int64_t grain = std::max<int64_t>(1, (int64_t{32} << 10) / std::max<int64_t>(1, K * NR * int64_t(sizeof(T))));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    blocks<T, NR, MRMAX, kScaled>(x, ldx, w, scale, G, out, ldo, M, K, N, b0, b1);
  });
}

template <typename T>
void dispatch(const float* x, int64_t ldx, const T* w, const float* scale, int64_t G, float* out, int64_t ldo,
              int64_t M, int64_t K, int64_t N, int part, int parts) {
  // MR * NR accumulators + NR weight (+ NR scale) vectors + 1 x vector must fit the register file
#if defined(SOT_HAS_AVX512)  // 32 registers
  if (M <= 4) return run<T, 4, 4>(x, ldx, w, scale, G, out, ldo, M, K, N, part, parts);
  return run<T, 3, 8>(x, ldx, w, scale, G, out, ldo, M, K, N, part, parts);
#else  // 16 registers
  if (M <= 2) return run<T, 4, 2>(x, ldx, w, scale, G, out, ldo, M, K, N, part, parts);
  return run<T, 2, 4>(x, ldx, w, scale, G, out, ldo, M, K, N, part, parts);
#endif
}

void dispatch_view(const float* x, int64_t ldx, const WeightView& w, float* out, int64_t ldo, int64_t M, int part,
                   int parts) {
  switch (w.dtype) {
    case at::kFloat:
      return dispatch(x, ldx, static_cast<const float*>(w.data), nullptr, 1, out, ldo, M, w.K, w.N, part, parts);
    case at::kBFloat16:
      return dispatch(x, ldx, static_cast<const bf16*>(w.data), nullptr, 1, out, ldo, M, w.K, w.N, part, parts);
    default:
      return dispatch(x, ldx, static_cast<const int8_t*>(w.data), w.scale, w.G, out, ldo, M, w.K, w.N, part, parts);
  }
}

bool is_storage(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kChar; }

}  // namespace

WeightView weight_view(const at::Tensor& w, const std::optional<at::Tensor>& scale) {
  const bool q4 = w.scalar_type() == at::kByte;
  if (w.dim() == 3) {  // packed: [N / 8, K / 32, 8 * B] with scale [N / 8, K / 32, S, 8]
    const bool half = scale.has_value() && scale->scalar_type() == at::kHalf;
    TORCH_CHECK((q4 || w.scalar_type() == at::kChar) && w.device().is_cpu() && w.is_contiguous() &&
                    w.size(2) == (q4 ? 128 : 256) && scale.has_value() &&
                    (scale->scalar_type() == at::kFloat || (half && (q4 || scale->size(2) == 2))) &&
                    scale->dim() == 4 &&
                    scale->size(0) == w.size(0) && scale->size(1) == w.size(1) && scale->size(3) == 8 &&
                    (scale->size(2) == 2 || (!q4 && scale->size(2) == 4)) && scale->is_contiguous() &&
                    scale->device().is_cpu(),
                "linear: packed weights [N / 8, K / 32, 256 int8 or 128 uint8] need scale [N / 8, K / 32, S, 8] "
                "float32 (S = 2, or 4 for int8 with a scale per 16; float16 too, but for S = 4)");
    WeightView v{w.data_ptr(), w.scalar_type(), half ? nullptr : scale->data_ptr<float>(), w.size(1), 8 * w.size(0),
                 32 * w.size(1)};
    v.packed = v.int8_act = true;
    v.S = scale->size(2);
    if (half) v.hscale = reinterpret_cast<const uint16_t*>(scale->data_ptr<at::Half>());
    return v;
  }
  TORCH_CHECK(w.dim() == 2 && (is_storage(w.scalar_type()) || q4) && w.device().is_cpu() && w.is_contiguous(),
              "linear: w [N, K] contiguous float32 / bfloat16 / int8 (or uint8: 4-bit pairs) on CPU");
  TORCH_CHECK(scale.has_value() == (q4 || w.scalar_type() == at::kChar),
              "linear: int8 and 4-bit weights need a scale, others none");
  if (q4) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 3 && scale->size(0) == w.size(0) &&
                    scale->size(1) == 2 && scale->size(2) * 16 == w.size(1) && scale->is_contiguous() &&
                    scale->device().is_cpu(),
                "linear: 4-bit weights [N, K / 2] need scale_min [N, 2, K / 32] float32 contiguous");
    WeightView v{w.data_ptr(), at::kByte, scale->data_ptr<float>(), scale->size(2), w.size(0), 2 * w.size(1)};
    v.int8_act = true;  // only ever multiplied on integer dot products
    return v;
  }
  if (scale)
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 2 && scale->size(0) == w.size(0) &&
                    scale->size(1) > 0 && w.size(1) % scale->size(1) == 0 && scale->is_contiguous() &&
                    scale->device().is_cpu(),
                "linear: scale [N, G] float32 contiguous, G dividing K");
  return {w.data_ptr(), w.scalar_type(), scale ? scale->data_ptr<float>() : nullptr, scale ? scale->size(1) : 1,
          w.size(0), w.size(1)};
}

void linear_part(const float* x, int64_t ldx, const WeightView& w, float* out, int64_t ldo, int64_t M, int part,
                 int parts) {
  if (w.bf16_act) {  // in units of two AMX weight tiles (32 rows)
    const auto [n0, n1] = share(w.N, part, parts, 32);
    return linear_bf16_rows(x, ldx, w, out, ldo, M, n0, n1, true);
  }
  if (w.int8_act) {  // in blocks of the int8 kernel's 4 weight rows (a packed block's 8)
    const auto [n0, n1] = share(w.N, part, parts, w.packed ? 8 : 4);
    return linear_int8_rows(x, ldx, w, out, ldo, M, n0, n1);
  }
  dispatch_view(x, ldx, w, out, ldo, M, part, parts);
}

int64_t linear_max_rows() { return kMaxRows; }

bool linear_kernel_applies(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale) {
  return x.dim() == 2 && w.dim() == 2 && x.scalar_type() == at::kFloat && is_storage(w.scalar_type()) &&
         x.device().is_cpu() && w.device().is_cpu() && x.size(1) == w.size(1) && x.size(0) > 0 &&
         scale.has_value() == (w.scalar_type() == at::kChar) &&
         (!scale || (scale->scalar_type() == at::kFloat && scale->dim() == 2 && scale->size(0) == w.size(0) &&
                     scale->size(1) > 0 && w.size(1) % scale->size(1) == 0 && scale->device().is_cpu())) &&
         !(at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad()));
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(linear_kernel_applies(x, w, scale),
              "linear_rows: x [M, K] float32, w [N, K] float32 / bfloat16 / int8 (int8 with scale [N, G] float32, "
              "G dividing K), CPU, no autograd");
  const auto xc = x.stride(1) == 1 ? x : x.contiguous();  // rows may be strided
  const auto wc = w.contiguous();
  const std::optional<at::Tensor> sc = scale ? std::optional<at::Tensor>(scale->contiguous()) : std::nullopt;
  const int64_t M = xc.size(0), N = wc.size(0), ldx = xc.stride(0);
  auto out = at::empty({M, N}, xc.options());
  dispatch_view(xc.data_ptr<float>(), ldx, weight_view(wc, sc), out.data_ptr<float>(), N, M, 0, 0);
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale) {
  RECORD_FUNCTION("sot_cpp::linear", std::vector<c10::IValue>());  // visible to torch.profiler
  // float32 at M = 1 too: with its deep prefetch the kernel streams a matrix from DRAM faster than MKL's sgemv
  // (SmolLM2's 113 MB lm_head: 3.7 vs 5.1 ms)
  if (linear_kernel_applies(x, w, scale) && x.size(0) <= kMaxRows)
    return linear_rows(x, w, scale);
  // kernels.reference.linear: widen (dequantize) the weights, then at::linear (MKL)
  TORCH_CHECK(scale.has_value() == (w.scalar_type() == at::kChar), "linear: int8 weights need a scale, others none");
  if (!scale) return at::linear(x, w.scalar_type() == x.scalar_type() ? w : w.to(x.scalar_type()));
  const int64_t N = w.size(0), K = w.size(1), G = scale->size(-1);
  TORCH_CHECK(scale->dim() == 2 && scale->size(0) == N && G > 0 && K % G == 0, "linear: scale [N, G], G dividing K");
  const auto t = x.scalar_type();
  return at::linear(x, (w.reshape({N, G, K / G}).to(t) * scale->to(t).unsqueeze(2)).view({N, K}));
}

SOT_NAMESPACE_END
