// Weight matmul at int8 precision: int8 weights with a float32 scale per 32 of a row (weights.py's Int8Weight,
// llama.cpp's Q8_0) times activations quantized the same way per call (dynamic: a scale per 32 of a row of x),
// multiplied on integer dot-product instructions:
//   out[m, n] = sum_g (xs[m, g] * ws[n, g]) * sum_{k in g} xq[m, k] * wq[n, k]
// The inner sums are exact int32; each group's term is one float32 product and the groups are summed in float32.
//
// Why: widening int8 weights to float32 in registers (linear.cpp) makes a decode step of 8+ rows compute-bound on
// fp32 FMAs (a SmolLM2 step at batch 8 cost 4.8x batch 1 on an AVX2 EPYC). An integer multiply-add instruction does
// 32 (AVX2 vpmaddubsw + vpmaddwd) or 32 (AVX-512 VNNI vpdpbusd, one instruction) products a cycle per 256-bit
// register, 4x the fp32 FMA's 8: the step returns to streaming the weights.
//
// Both instructions multiply an unsigned byte by a signed one, so x . w is computed as |x| . (w * sign(x))
// (vpsignb), llama.cpp's trick; |x| <= 127 and |w| <= 127 (the quantizers clamp there), so vpmaddubsw's pairs
// (at most 2 * 127 * 127) never saturate.
//
// The instruction set is picked at run time (int8_isa): the variants are compiled with target attributes, so one
// build runs on an AVX2-only CPU and uses VNNI where the CPU has it; SOT_CPU_ISA=avx2|scalar, or set_int8_isa,
// forces a lower one (tests run every variant on one machine).
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define SOT_X86 1
#include <immintrin.h>
#endif

namespace sot_cpu {
namespace {

constexpr int64_t kGroup = 32;  // values per scale, of x and of w

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512vnni"};

int detect_isa() {
#if defined(SOT_X86)
  __builtin_cpu_init();
  int best = kScalar;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = kAvx2;
  if (best == kAvx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw"))
    best = kAvx512Vnni;
  if (const char* force = std::getenv("SOT_CPU_ISA"))  // only ever lower: a forced ISA the CPU lacks would fault
    for (int i = 0; i < best; ++i)
      if (std::string(force) == kIsaNames[i]) best = i;
  return best;
#else
  return kScalar;
#endif
}

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{detect_isa()};
  return isa;
}

// ---------------------------------------------------------------- scalar: the portable path and the tail

void tile_scalar(const int8_t* xq, const float* xs, int64_t M, const int8_t* wq, const float* ws, int64_t K,
                 int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t G = K / kGroup;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t s = 0;
        for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k) s += int32_t(xq[m * K + k]) * int32_t(wq[n * K + k]);
        acc += xs[m * G + g] * ws[n * G + g] * static_cast<float>(s);
      }
      out[m * ldo + n] = acc;
    }
}

#if defined(SOT_X86)
// ---------------------------------------------------------------- AVX2 and AVX-512 VNNI: MR rows x NR weight rows

// 8 int32 partial sums of x . w over 32 bytes, |x| . (w * sign(x)) on vpmaddubsw + vpmaddwd
__attribute__((target("avx2,fma"))) inline __m256i dot32_avx2(__m256i ax, __m256i sw) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1));
}

__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni"))) inline __m256i dot32_vnni(__m256i ax,
                                                                                                      __m256i sw) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sw);
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// The body of both vector variants; DOT is the instruction sequence. Accumulates each (m, n) in 8 float lanes:
// lane i holds the groups' terms of its 4 consecutive bytes, the lanes are summed once at the end.
#define SOT_INT8_TILE(NAME, TARGET, DOT)                                                                              \
  template <int MR, int NR>                                                                                           \
  __attribute__((target(TARGET))) void NAME(const int8_t* xq, const float* xs, const int8_t* wq, const float* ws,    \
                                            int64_t K, float* out, int64_t ldo) {                                     \
    const int64_t G = K / kGroup;                                                                                     \
    __m256 acc[MR][NR];                                                                                               \
    for (int i = 0; i < MR; ++i)                                                                                      \
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();                                                   \
    for (int64_t g = 0; g < G; ++g) {                                                                                 \
      __m256i w[NR];                                                                                                  \
      for (int j = 0; j < NR; ++j) {                                                                                  \
        _mm_prefetch(reinterpret_cast<const char*>(wq + j * K + g * kGroup) + 2048, _MM_HINT_T0);                    \
        w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + j * K + g * kGroup));                         \
      }                                                                                                               \
      for (int i = 0; i < MR; ++i) {                                                                                  \
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + g * kGroup));              \
        const __m256i ax = _mm256_sign_epi8(x, x);                                                                    \
        const float sx = xs[i * G + g];                                                                               \
        for (int j = 0; j < NR; ++j) {                                                                                \
          const __m256 p = _mm256_cvtepi32_ps(DOT(ax, _mm256_sign_epi8(w[j], x)));                                    \
          acc[i][j] = _mm256_fmadd_ps(p, _mm256_set1_ps(sx * ws[j * G + g]), acc[i][j]);                              \
        }                                                                                                             \
      }                                                                                                               \
    }                                                                                                                 \
    for (int i = 0; i < MR; ++i)                                                                                      \
      for (int j = 0; j < NR; ++j) out[i * ldo + j] = hsum8(acc[i][j]);                                               \
  }

SOT_INT8_TILE(tile_avx2, "avx2,fma", dot32_avx2)
SOT_INT8_TILE(tile_vnni, "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni", dot32_vnni)
#undef SOT_INT8_TILE

// rows [n0, n1) of w against all M rows of x: blocks of NR weight rows (the block re-read from L1 for each row tile
// of x), row tiles of up to MR; the last n1 - n0 % NR rows one at a time
template <int MR, int NR, bool kVnni>
void rows_vector(const int8_t* xq, const float* xs, int64_t M, const int8_t* wq, const float* ws, int64_t K,
                 int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t G = K / kGroup;
  auto run = [&](auto mr, auto nr, int64_t m, int64_t n) {
    constexpr int R = decltype(mr)::value, C = decltype(nr)::value;
    if constexpr (kVnni)
      tile_vnni<R, C>(xq + m * K, xs + m * G, wq + n * K, ws + n * G, K, out + m * ldo + n, ldo);
    else
      tile_avx2<R, C>(xq + m * K, xs + m * G, wq + n * K, ws + n * G, K, out + m * ldo + n, ldo);
  };
  auto rows_of = [&](auto nr, int64_t n) {
    int64_t m = 0;
    for (; m + MR <= M; m += MR) run(std::integral_constant<int, MR>{}, nr, m, n);
    for (; m < M; ++m) run(std::integral_constant<int, 1>{}, nr, m, n);
  };
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) rows_of(std::integral_constant<int, NR>{}, n);
  for (; n < n1; ++n) rows_of(std::integral_constant<int, 1>{}, n);
}
#endif

void rows_isa(int isa, const int8_t* xq, const float* xs, int64_t M, const int8_t* wq, const float* ws, int64_t K,
              int64_t n0, int64_t n1, float* out, int64_t ldo) {
#if defined(SOT_X86)
  // accumulators MR * NR + NR weight vectors + x, |x| and a product in the 16 ymm registers AVX2 has (32 with
  // AVX-512's EVEX encoding)
  if (isa == kAvx512Vnni) return rows_vector<4, 4, true>(xq, xs, M, wq, ws, K, n0, n1, out, ldo);
  if (isa == kAvx2) return rows_vector<2, 4, false>(xq, xs, M, wq, ws, K, n0, n1, out, ldo);
#endif
  (void)isa;
  tile_scalar(xq, xs, M, wq, ws, K, n0, n1, out, ldo);
}

void quantize_rows_int8(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* xq, float* xs) {
  const int64_t G = K / kGroup;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const float* v = x + m * ldx + g * kGroup;
      float amax = 0.f;
      for (int64_t k = 0; k < kGroup; ++k) amax = std::max(amax, std::fabs(v[k]));
      // what weights.quantize_activations_int8 computes: scale amax / 127, values round(x * (127 / amax)), half
      // to even (the default rounding mode); an all-zero group stays zero with scale 0
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      xs[m * G + g] = amax / 127.f;
      for (int64_t k = 0; k < kGroup; ++k)
        xq[m * K + g * kGroup + k] = static_cast<int8_t>(std::nearbyint(std::min(127.f, std::max(-127.f, v[k] * inv))));
    }
}

}  // namespace

std::string int8_isa() { return kIsaNames[current_isa().load()]; }

std::string set_int8_isa(const std::string& name) {
  const std::string before = int8_isa();
  const int best = detect_isa();
  for (int i = 0; i <= best; ++i)
    if (name == kIsaNames[i]) {
      current_isa().store(i);
      return before;
    }
  if (name == "auto") {
    current_isa().store(best);
    return before;
  }
  TORCH_CHECK(false, "set_int8_isa: ", name, " is not one this CPU runs (up to ", kIsaNames[best], ", or auto)");
}

void linear_int8_rows(const float* x, int64_t ldx, const WeightView& w, float* out, int64_t ldo, int64_t M,
                      int64_t n0, int64_t n1) {
  if (n1 <= n0 || M == 0) return;
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xs;
  if (static_cast<int64_t>(xq.size()) < M * w.K) xq.resize(M * w.K);
  if (static_cast<int64_t>(xs.size()) < M * w.G) xs.resize(M * w.G);
  quantize_rows_int8(x, ldx, M, w.K, xq.data(), xs.data());  // a few KiB a thread: cheaper than a barrier
  rows_isa(current_isa().load(), xq.data(), xs.data(), M, static_cast<const int8_t*>(w.data), w.scale, w.K, n0, n1,
           out, ldo);
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.size(1) % kGroup == 0,
              "quantize_int8_activations: x [M, K] float32 CPU, K a multiple of 32");
  const auto xc = x.contiguous();
  auto q = at::empty(xc.sizes(), xc.options().dtype(at::kChar));
  auto s = at::empty({xc.size(0), xc.size(1) / kGroup}, xc.options());
  quantize_rows_int8(xc.data_ptr<float>(), xc.size(1), xc.size(0), xc.size(1), q.data_ptr<int8_t>(),
                     s.data_ptr<float>());
  return {q, s};
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  RECORD_FUNCTION("sot_cpp::linear_int8", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.size(1) == w.size(1),
              "linear_int8: x [M, K] float32 CPU with w's K");
  TORCH_CHECK(w.dim() == 2 && w.size(1) % kGroup == 0 && scale.dim() == 2 && scale.size(1) == w.size(1) / kGroup,
              "linear_int8: int8 w [N, K] with a scale per 32 weights ([N, K / 32]), K a multiple of 32");
  const auto xc = x.stride(1) == 1 ? x : x.contiguous();
  const auto wc = w.contiguous();
  const auto sc = scale.contiguous();
  const WeightView wv = weight_view(wc, sc);
  const int64_t M = xc.size(0), N = wv.N;
  auto out = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return out;
  // x quantized once for all threads (a prefill's rows too); the fused decode loop's threads each quantize their
  // own few rows instead (linear_int8_rows), which costs less than a barrier
  std::vector<int8_t> xq(M * wv.K);
  std::vector<float> xs(M * wv.G);
  quantize_rows_int8(xc.data_ptr<float>(), xc.stride(0), M, wv.K, xq.data(), xs.data());
  const int isa = current_isa().load();
  // >= ~32 KiB of weights a task
  const int64_t grain = std::max<int64_t>(4, (int64_t{32} << 10) / std::max<int64_t>(1, wv.K));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    rows_isa(isa, xq.data(), xs.data(), M, static_cast<const int8_t*>(wv.data), wv.scale, wv.K, n0, n1,
             out.data_ptr<float>(), N);
  });
  return out;
}

}  // namespace sot_cpu
