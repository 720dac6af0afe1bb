// Weight matmuls on integer dot products (matmul precision int8, and the GGUF's own quantized weights):
// activations quantized per call to int8 with a float32 scale per 32 of a row (dynamic, llama.cpp's Q8_0 / Q8_1),
// times weights in one of three layouts (sot_engine/kernels/weights.py):
//   int8, a scale per 32 (Int8Weight; Q8_0, Q5_0)   out[m, n] = sum_g xs[m, g] ws[n, g] . sum_k xq[m, k] wq[n, k]
//   int8, a scale per 16 (Int8Weight; Q6_K)         the same with each 32-group's two halves scaled apart
//   4-bit, a scale and a min per 32 (Q4Weight; Q4_0, Q4_1, Q4_K):  w = d q + m with q in 0..15, so
//                                                   out[m, n] = sum_g xs d . sum_k xq q  +  sum_g m . xs sum_k xq
// The inner sums are exact int32; each group's term is one float32 product, the groups summed in float32.
//
// Why: widening int8 weights to float32 in registers (linear.cpp) makes a decode step of 8+ rows compute-bound on
// fp32 FMAs (a SmolLM2 step at batch 8 cost 4.8x batch 1 on an AVX2 EPYC). An integer multiply-add instruction does
// 32 products per 256-bit register (AVX2 vpmaddubsw + vpmaddwd, or AVX-512 VNNI's one vpdpbusd), 4x the fp32 FMA's 8.
//
// Both instructions multiply an unsigned byte by a signed one. 4-bit values are unsigned already (0..15); an int8
// weight is multiplied as |x| . (w * sign(x)) (vpsignb), llama.cpp's trick: |x| <= 127 and |w| <= 127 (the
// quantizers clamp there), so vpmaddubsw's pairs (at most 2 * 127 * 127) never saturate.
//
// A 4-bit group is 16 bytes, the low nibbles weights 0-15 and the high ones 16-31 (GGUF's Q4_0 / Q4_1 order), so one
// 128-bit load, a shift and two masks give the 32 weights in order.
//
// Packed weights (kernels.weights.PackedWeight; the cpp backend packs every int8-precision matrix of 16k rows): blocks of
// 8 rows interleaved 4 bytes at a time, so that one 32-byte vector holds 4 weights of each of 8 rows and one
// instruction against x's 4 bytes broadcast adds them into 8 int32 lanes, one per row. A group's 8 rows then end in
// one vector: one conversion and one multiply-add by the 8 rows' scales for 256 products, where the row-major tiles
// above spend a conversion and a multiply-add on each row's 32. What a decode step of several rows is bound by.
// Packed 4-bit blocks keep the file's float16 scales and mins where they are float16 values (Q4_0, Q4_1; kP4F16,
// widened by vcvtph2ps): a group's 8 rows then read 160 bytes instead of 192. Packed int8 blocks with a scale per 32
// do the same with their scales and weight sums where those are float16 values (kP8F16: a Q8_0 file's scales; any
// sum within +-2048): 288 bytes instead of 320.
// VNNI multiplies int8 weights as (x + 128) . w (x's bytes xor 0x80: unsigned) minus 128 times the group's weight sum,
// stored beside the scales; AVX2 keeps the sign trick, with |x| from the quantizer (Act::u: one vpabsb a group and
// row instead of one per block of 8 weight rows, ~5% of an int8 matmul at batch 8 on Zen 3). 4-bit values sum as int16 across a group on AVX2 (8 pairs of
// at most 2 * 15 * 127 stay below 2^15).
//
// The instruction set is picked at run time (int8_isa), up to the variant's (target.h: the avx512 variant compiles
// VNNI, AVX2 and scalar, the avx2 variant AVX2 and scalar, generic scalar alone); the paths above the variant's own
// are compiled with target attributes. SOT_CPU_ISA=avx2|scalar, or set_int8_isa, forces a lower one (tests run
// every one on one machine).
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// The vector paths a variant compiles (target.h): its own level and below, so that the avx2 variant is what an
// AVX2-only machine runs, int8 kernels included; a native build compiles all and picks at run time.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(SOT_HAS_AVX2) || defined(SOT_NATIVE))
#define SOT_X86 1
#include <immintrin.h>
#if defined(SOT_HAS_AVX512) || defined(SOT_NATIVE)
#define SOT_INT8_VNNI 1
#endif
#endif

SOT_NAMESPACE_BEGIN
namespace {

constexpr int64_t kGroup = 32;  // activation values per scale; weight groups are 32 or 16

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512vnni"};

// The weight layouts; a kernel is compiled for each
// kP*: packed; kP4F16: packed 4-bit with float16 scales and mins (what Q4_0 / Q4_1 files hold: 2 bytes a group less);
// kP8F16: packed int8 (a scale per 32) with float16 scales and weight sums (a Q8_0 file's)
enum Fmt : int { kI8G32 = 0, kI8G16 = 1, kQ4 = 2, kP8 = 3, kP8H = 4, kP4 = 5, kP4F16 = 6, kP8F16 = 7 };
constexpr bool half_scales(int F) { return F == kP4F16 || F == kP8F16; }
constexpr bool four_bit(int F) { return F == kQ4 || F == kP4 || F == kP4F16; }

int detect_isa() {
#if defined(SOT_X86)
  __builtin_cpu_init();
  int best = kScalar;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = kAvx2;
#if defined(SOT_INT8_VNNI)
  if (best == kAvx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw"))
    best = kAvx512Vnni;
#endif
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

// The quantized activations of M rows: values [M, K], scales and scaled sums (xs * sum of the group's values, for
// the 4-bit weights' min term) [M, K / 32]
struct Act {
  const int8_t* q;
  const float* s;
  const float* sum;
  int64_t K, G;
  // int8 weights' unsigned operand: VNNI's x + 128 (q xor 0x80), AVX2's |x| (the sign trick's; one abs a row and
  // group here instead of one per weight row block)
  const uint8_t* u;
};

// A run of weight rows: row n's values at data + n * row_bytes, its float32 scales at scale + n * scale_row
// (kQ4: G scales, then G mins)
struct Rows {
  const uint8_t* data;
  const float* scale;
  int64_t row_bytes, scale_row;
  const uint16_t* hscale;  // kP4F16, kP8F16: float16 scales and mins (sums) instead
};

Fmt fmt_of(const WeightView& w) {
  if (w.packed) return w.dtype == at::kByte ? (w.hscale ? kP4F16 : kP4) : (w.S == 4 ? kP8H : w.hscale ? kP8F16 : kP8);
  return w.dtype == at::kByte ? kQ4 : (w.G * kGroup == w.K ? kI8G32 : kI8G16);
}

Rows rows_of(const WeightView& w) {
  return {static_cast<const uint8_t*>(w.data), w.scale, w.row_bytes(), w.scale_row(), w.hscale};
}

// ---------------------------------------------------------------- scalar: the portable path

template <int F>
void rows_scalar(const Act& a, int64_t M, const Rows& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t G = a.G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w.data + n * w.row_bytes;
    const float* sr = w.scale + n * w.scale_row;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* x = a.q + m * a.K;
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t s0 = 0, s1 = 0;  // the group's two halves (apart for kI8G16's two scales)
        for (int64_t k = 0; k < kGroup; ++k) {
          int32_t wk;
          if constexpr (F == kQ4)
            wk = k < 16 ? (wr[g * 16 + k] & 0x0F) : (wr[g * 16 + k - 16] >> 4);
          else
            wk = static_cast<int8_t>(wr[g * kGroup + k]);
          (k < 16 ? s0 : s1) += int32_t(x[g * kGroup + k]) * wk;
        }
        const float sx = a.s[m * G + g];
        if constexpr (F == kI8G16)
          acc += sx * sr[2 * g] * static_cast<float>(s0) + sx * sr[2 * g + 1] * static_cast<float>(s1);
        else
          acc += sx * sr[g] * static_cast<float>(s0 + s1);
      }
      if constexpr (F == kQ4)
        for (int64_t g = 0; g < G; ++g) acc += sr[G + g] * a.sum[m * G + g];
      out[m * ldo + n] = acc;
    }
  }
}

#if defined(SOT_X86)
// ---------------------------------------------------------------- AVX2 and AVX-512 VNNI: MR rows x NR weight rows

#define SOT_AVX2 "avx2,fma,f16c"
#define SOT_VNNI "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"

// 8 int32 partial sums of u . s over 32 bytes (u unsigned, s signed; lane i sums bytes 4i..4i+3)
__attribute__((target(SOT_AVX2))) inline __m256i dot_avx2(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#if defined(SOT_INT8_VNNI)
__attribute__((target(SOT_VNNI))) inline __m256i dot_vnni(__m256i u, __m256i s) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}
#endif

__attribute__((target(SOT_AVX2))) inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// sum_i a[i] b[i] in float32 (the 4-bit weights' min term: a row's G mins against a row's G scaled sums)
__attribute__((target(SOT_AVX2))) inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum8(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The body of both vector variants; DOT is the instruction sequence. Accumulates each (m, n) in 8 float lanes (lane i
// the groups' terms of its 4 consecutive bytes), the lanes summed once at the end.
#define SOT_QUANT_TILE(NAME, TARGET, DOT)                                                                             \
  template <int MR, int NR, int F>                                                                                    \
  __attribute__((target(TARGET))) void NAME(const Act& a, const int8_t* xq, const float* xs, const float* xsum,       \
                                            const uint8_t* wd, const float* ws, const Rows& w, float* out,            \
                                            int64_t ldo) {                                                            \
    const int64_t G = a.G, K = a.K;                                                                                   \
    __m256 acc[MR][NR];                                                                                               \
    for (int i = 0; i < MR; ++i)                                                                                      \
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();                                                   \
    const __m128i low4 = _mm_set1_epi8(0x0F);                                                                         \
    const __m256i halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);                                                 \
    for (int64_t g = 0; g < G; ++g) {                                                                                 \
      __m256i wv[NR];                                                                                                 \
      for (int j = 0; j < NR; ++j) {                                                                                  \
        const uint8_t* p = wd + j * w.row_bytes + g * (F == kQ4 ? 16 : kGroup);                                      \
        _mm_prefetch(reinterpret_cast<const char*>(p) + 2048, _MM_HINT_T0);                                          \
        if constexpr (F == kQ4) {                                                                                     \
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));                                     \
          wv[j] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));               \
        } else {                                                                                                      \
          wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));                                            \
        }                                                                                                             \
      }                                                                                                               \
      for (int i = 0; i < MR; ++i) {                                                                                  \
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + g * kGroup));              \
        const float sx = xs[i * G + g];                                                                               \
        const __m256i ax = F == kQ4 ? x : _mm256_sign_epi8(x, x);                                                     \
        for (int j = 0; j < NR; ++j) {                                                                                \
          const __m256 p = _mm256_cvtepi32_ps(F == kQ4 ? DOT(wv[j], x) : DOT(ax, _mm256_sign_epi8(wv[j], x)));       \
          __m256 sc;                                                                                                  \
          if constexpr (F == kI8G16) /* lanes 0-3 hold bytes 0-15: the first scale; 4-7 the second */               \
            sc = _mm256_permutevar8x32_ps(                                                                            \
                _mm256_castps128_ps256(_mm_mul_ps(                                                                    \
                    _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(ws + j * w.scale_row + 2 * g))),       \
                    _mm_set1_ps(sx))),                                                                                \
                halves);                                                                                              \
          else                                                                                                        \
            sc = _mm256_set1_ps(sx * ws[j * w.scale_row + g]);                                                        \
          acc[i][j] = _mm256_fmadd_ps(p, sc, acc[i][j]);                                                              \
        }                                                                                                             \
      }                                                                                                               \
    }                                                                                                                 \
    for (int i = 0; i < MR; ++i)                                                                                      \
      for (int j = 0; j < NR; ++j) {                                                                                  \
        float r = hsum8(acc[i][j]);                                                                                   \
        if constexpr (F == kQ4) r += dot_f32(ws + j * w.scale_row + G, xsum + i * G, G);                             \
        out[i * ldo + j] = r;                                                                                         \
      }                                                                                                               \
  }

SOT_QUANT_TILE(tile_avx2, SOT_AVX2, dot_avx2)
#if defined(SOT_INT8_VNNI)
SOT_QUANT_TILE(tile_vnni, SOT_VNNI, dot_vnni)
#endif
#undef SOT_QUANT_TILE

// rows [n0, n1) of w against all M rows of x: blocks of NR weight rows (the block re-read from L1 for each row tile
// of x), row tiles of up to MR; the last (n1 - n0) % NR rows one at a time
template <int MR, int NR, int F, bool kVnni>
void rows_vector(const Act& a, int64_t M, const Rows& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t G = a.G;
  auto run = [&](auto mr, auto nr, int64_t m, int64_t n) {
    constexpr int R = decltype(mr)::value, C = decltype(nr)::value;
    const int8_t* xq = a.q + m * a.K;
    const uint8_t* wd = w.data + n * w.row_bytes;
    const float* ws = w.scale + n * w.scale_row;
#if defined(SOT_INT8_VNNI)
    if constexpr (kVnni)
      tile_vnni<R, C, F>(a, xq, a.s + m * G, a.sum + m * G, wd, ws, w, out + m * ldo + n, ldo);
    else
#endif
      tile_avx2<R, C, F>(a, xq, a.s + m * G, a.sum + m * G, wd, ws, w, out + m * ldo + n, ldo);
  };
  auto all_rows = [&](auto nr, int64_t n) {
    int64_t m = 0;
    for (; m + MR <= M; m += MR) run(std::integral_constant<int, MR>{}, nr, m, n);
    for (; m < M; ++m) run(std::integral_constant<int, 1>{}, nr, m, n);
  };
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) all_rows(std::integral_constant<int, NR>{}, n);
  for (; n < n1; ++n) all_rows(std::integral_constant<int, 1>{}, n);
}
#endif


// ---------------------------------------------------------------- packed blocks of 8 rows

// weight k of row r of group g in a packed block (q: the block's bytes, 8 * B a group)
template <int F>
inline int32_t packed_weight(const uint8_t* q, int64_t g, int r, int k) {
  if constexpr (four_bit(F)) {
    const uint8_t b = q[g * 128 + ((k % 16) / 4) * 32 + r * 4 + k % 4];
    return k < 16 ? (b & 0x0F) : (b >> 4);
  } else {
    return static_cast<int8_t>(q[g * 256 + (k / 4) * 32 + r * 4 + k % 4]);
  }
}

template <int F>
void packed_scalar(const Act& a, int64_t M, const Rows& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const int64_t G = a.G, S = F == kP8H ? 4 : 2;
  for (int64_t b = n0 / 8; b < n1 / 8; ++b) {
    const uint8_t* q = w.data + b * 8 * w.row_bytes;
    const int64_t at = b * 8 * w.scale_row;  // [G, S, 8] from here
    auto scale = [&](int64_t i) {
      if constexpr (half_scales(F))
        return c10::detail::fp16_ieee_to_fp32_value(w.hscale[at + i]);
      else
        return w.scale[at + i];
    };
    for (int64_t m = 0; m < M; ++m)
      for (int r = 0; r < 8; ++r) {
        float acc = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          int32_t s0 = 0, s1 = 0;
          for (int k = 0; k < kGroup; ++k)
            (k < 16 ? s0 : s1) += int32_t(a.q[m * a.K + g * kGroup + k]) * packed_weight<F>(q, g, r, k);
          const float sx = a.s[m * G + g];
          const int64_t sg = g * S * 8;
          if constexpr (F == kP8H)
            acc += sx * scale(sg + r) * static_cast<float>(s0) + sx * scale(sg + 8 + r) * static_cast<float>(s1);
          else
            acc += sx * scale(sg + r) * static_cast<float>(s0 + s1);
          if constexpr (four_bit(F)) acc += scale(sg + 8 + r) * a.sum[m * G + g];
        }
        out[m * ldo + b * 8 + r] = acc;
      }
  }
}

#if defined(SOT_X86)
// Software prefetch this far ahead of the packed weights' read position (every line of them and of their scales):
// at 8 rows a block is compute-bound, and without it the DRAM reads wait instead of overlapping the multiplies
#ifndef SOT_PACKED_AHEAD
#define SOT_PACKED_AHEAD 4096
#endif
#ifndef SOT_PACKED_HINT
#define SOT_PACKED_HINT _MM_HINT_T0
#endif
constexpr int kPackedAhead = SOT_PACKED_AHEAD;
constexpr auto kHint = SOT_PACKED_HINT;

// MR rows of x against one packed block of 8 weight rows: 8 outputs a row, stored as one vector
#define SOT_PACKED_TILE(NAME, TARGET, VNNI)                                                                            \
  template <int MR, int F>                                                                                            \
  __attribute__((target(TARGET))) void NAME(const Act& a, int64_t m0, const uint8_t* q, const void* sc, float* out,   \
                                            int64_t ldo) {                                                            \
    constexpr int S = F == kP8H ? 4 : 2;                                                                              \
    constexpr bool Q4 = four_bit(F), H = half_scales(F);                                                             \
    constexpr int64_t kScaleBytes = S * 8 * (H ? 2 : 4), kWeightBytes = Q4 ? 128 : 256; /* a group's */               \
    const int64_t G = a.G, K = a.K;                                                                                   \
    __m256 acc[MR];                                                                                                   \
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();                                                        \
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);                                         \
    for (int64_t g = 0; g < G; ++g) {                                                                                 \
      const uint8_t* p = q + g * kWeightBytes;                                                                        \
      for (int l = 0; l < kWeightBytes; l += 64)                                                                      \
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPackedAhead + l, kHint);                                     \
      __m256i wv[8]; /* AVX2: none, each chunk loaded (unpacked) as it is multiplied, below */                         \
      if constexpr (Q4 && VNNI)                                                                                       \
        for (int c = 0; c < 4; ++c) {                                                                                 \
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c));                         \
          wv[c] = _mm256_and_si256(v, low4);                                                                          \
          wv[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);                                                \
        }                                                                                                             \
      else if constexpr (VNNI)                                                                                        \
        for (int c = 0; c < 8; ++c) wv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c));         \
      /* the scales' bytes as far ahead (in groups) as the weights' */                                                \
      const char* sgb = static_cast<const char*>(sc) + g * kScaleBytes;                                               \
      for (int l = 0; l < kScaleBytes; l += 64)                                                                       \
        _mm_prefetch(sgb + kPackedAhead * kScaleBytes / kWeightBytes + l, kHint);                                     \
      const float* sg = reinterpret_cast<const float*>(sgb);                                                          \
      __m256 d0, d1;                                                                                                  \
      if constexpr (H) {                                                                                              \
        d0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sgb)));                                 \
        d1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sgb + 16)));                            \
      } else {                                                                                                        \
        d0 = _mm256_loadu_ps(sg), d1 = _mm256_loadu_ps(sg + 8);                                                       \
      }                                                                                                               \
      __m256i corr0 = _mm256_setzero_si256(), corr1 = _mm256_setzero_si256();                                         \
      if constexpr (VNNI && !Q4) { /* 128 * the (half-)group's weight sums */                                        \
        corr0 = _mm256_slli_epi32(_mm256_cvtps_epi32(F == kP8H ? _mm256_loadu_ps(sg + 16) : d1), 7);                 \
        if constexpr (F == kP8H) corr1 = _mm256_slli_epi32(_mm256_cvtps_epi32(_mm256_loadu_ps(sg + 24)), 7);         \
      }                                                                                                               \
      /* c outer, rows inner: MR independent chains of multiply-adds (one row's 8 would wait on each other) */    \
      __m256i s0[MR], s1[MR];                                                                                         \
      for (int i = 0; i < MR; ++i) s0[i] = s1[i] = _mm256_setzero_si256();                                            \
      const int8_t* xg = (VNNI && !Q4 ? reinterpret_cast<const int8_t*>(a.u) : a.q) + m0 * K + g * kGroup;            \
      const uint8_t* ug = a.u + m0 * K + g * kGroup; /* AVX2: |x| */                                                  \
      if constexpr (!VNNI && Q4) { /* int16 sums: 8 pairs of at most 2 * 15 * 127 */                                 \
        /* a chunk's two halves unpacked, multiplied by every row, dropped: 8 rows' sums fit in the 16 registers */   \
        for (int c = 0; c < 4; ++c) {                                                                                 \
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c));                         \
          const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);         \
          for (int i = 0; i < MR; ++i) {                                                                              \
            int32_t w0, w1;                                                                                           \
            std::memcpy(&w0, xg + i * K + 4 * c, 4);                                                                  \
            std::memcpy(&w1, xg + i * K + 16 + 4 * c, 4);                                                             \
            s0[i] = _mm256_add_epi16(s0[i], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(w0)));                         \
            s0[i] = _mm256_add_epi16(s0[i], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(w1)));                         \
          }                                                                                                           \
        }                                                                                                             \
      } else if constexpr (!VNNI) { /* int8: |x| . (w sign(x)), |x| from the quantizer; a chunk at a time too */      \
        for (int c = 0; c < 8; ++c) {                                                                                 \
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c));                         \
          for (int i = 0; i < MR; ++i) {                                                                              \
            int32_t xw, uw;                                                                                           \
            std::memcpy(&xw, xg + i * K + 4 * c, 4);                                                                  \
            std::memcpy(&uw, ug + i * K + 4 * c, 4);                                                                  \
            __m256i& s = (F == kP8H && c >= 4) ? s1[i] : s0[i];                                                       \
            s = _mm256_add_epi32(s, _mm256_madd_epi16(                                                                \
                _mm256_maddubs_epi16(_mm256_set1_epi32(uw), _mm256_sign_epi8(v, _mm256_set1_epi32(xw))), ones));      \
          }                                                                                                           \
        }                                                                                                             \
      } else                                                                                                          \
      for (int c = 0; c < 8; ++c)                                                                                     \
        for (int i = 0; i < MR; ++i) {                                                                                \
          int32_t word;                                                                                               \
          std::memcpy(&word, xg + i * K + 4 * c, 4);                                                                  \
          const __m256i xb = _mm256_set1_epi32(word);                                                                 \
          __m256i& s = (F == kP8H && c >= 4) ? s1[i] : s0[i];                                                         \
          s = Q4 ? _mm256_dpbusd_epi32(s, wv[c], xb) : _mm256_dpbusd_epi32(s, xb, wv[c]);                             \
        }                                                                                                             \
      for (int i = 0; i < MR; ++i) {                                                                                  \
        __m256i t0 = s0[i], t1 = s1[i];                                                                               \
        if constexpr (!VNNI && Q4) t0 = _mm256_madd_epi16(t0, ones);                                                  \
        if constexpr (VNNI && !Q4) {                                                                                  \
          t0 = _mm256_sub_epi32(t0, corr0);                                                                           \
          if constexpr (F == kP8H) t1 = _mm256_sub_epi32(t1, corr1);                                                  \
        }                                                                                                             \
        const __m256 sx = _mm256_set1_ps(a.s[(m0 + i) * G + g]);                                                     \
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t0), _mm256_mul_ps(d0, sx), acc[i]);                              \
        if constexpr (F == kP8H) acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t1), _mm256_mul_ps(d1, sx), acc[i]);     \
        if constexpr (Q4) acc[i] = _mm256_fmadd_ps(d1, _mm256_set1_ps(a.sum[(m0 + i) * G + g]), acc[i]);              \
      }                                                                                                               \
    }                                                                                                                 \
    for (int i = 0; i < MR; ++i) _mm256_storeu_ps(out + i * ldo, acc[i]);                                             \
  }

SOT_PACKED_TILE(packed_avx2, SOT_AVX2, false)
#if defined(SOT_INT8_VNNI)
SOT_PACKED_TILE(packed_vnni, SOT_VNNI, true)
#endif
#undef SOT_PACKED_TILE

template <int MR, int F, bool kVnni>
void packed_vector(const Act& a, int64_t M, const Rows& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  for (int64_t b = n0 / 8; b < n1 / 8; ++b) {
    const uint8_t* q = w.data + b * 8 * w.row_bytes;
    const void* sc = half_scales(F) ? static_cast<const void*>(w.hscale + b * 8 * w.scale_row)
                                 : static_cast<const void*>(w.scale + b * 8 * w.scale_row);
    int64_t m = 0;
    auto run = [&](auto mr) {
      constexpr int R = decltype(mr)::value;
#if defined(SOT_INT8_VNNI)
      if constexpr (kVnni)
        packed_vnni<R, F>(a, m, q, sc, out + m * ldo + b * 8, ldo);
      else
#endif
        packed_avx2<R, F>(a, m, q, sc, out + m * ldo + b * 8, ldo);
    };
    // tiles of MR rows, then one of each smaller power of two: 1-row tiles would each re-read the block
    for (; m + MR <= M; m += MR) run(std::integral_constant<int, MR>{});
    if constexpr (MR > 4)
      if (m + 4 <= M) run(std::integral_constant<int, 4>{}), m += 4;
    if constexpr (MR > 2)
      if (m + 2 <= M) run(std::integral_constant<int, 2>{}), m += 2;
    if (m < M) run(std::integral_constant<int, 1>{});
  }
}
#endif

template <int F>
void rows_fmt(int isa, const Act& a, int64_t M, const Rows& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if constexpr (F >= kP8) {  // packed: 8 weight vectors a group, MR accumulators
#if defined(SOT_X86)
#if defined(SOT_INT8_VNNI)
    if (isa == kAvx512Vnni) return packed_vector<8, F, true>(a, M, w, n0, n1, out, ldo);
#endif
    // AVX2: 8 rows a tile for 4-bit weights (their chunks unpacked as multiplied: ~1.2x faster than 4 on Zen 3),
    // 4 for int8 ones (8 measured no faster there)
    if (isa == kAvx2) return packed_vector<four_bit(F) ? 8 : 4, F, false>(a, M, w, n0, n1, out, ldo);
#endif
    (void)isa;
    return packed_scalar<F>(a, M, w, n0, n1, out, ldo);
  } else {
#if defined(SOT_X86)
    // accumulators MR * NR + NR weight vectors + x, |x| and a product in the 16 ymm registers AVX2 has (32 with
    // AVX-512's EVEX encoding)
#if defined(SOT_INT8_VNNI)
    if (isa == kAvx512Vnni) return rows_vector<4, 4, F, true>(a, M, w, n0, n1, out, ldo);
#endif
    if (isa == kAvx2) return rows_vector<2, 4, F, false>(a, M, w, n0, n1, out, ldo);
#endif
    (void)isa;
    rows_scalar<F>(a, M, w, n0, n1, out, ldo);
  }
}

void rows_isa(int isa, const Act& a, int64_t M, const WeightView& wv, int64_t n0, int64_t n1, float* out,
              int64_t ldo) {
  const Rows w = rows_of(wv);
  switch (fmt_of(wv)) {
    case kP4: return rows_fmt<kP4>(isa, a, M, w, n0, n1, out, ldo);
    case kP4F16: return rows_fmt<kP4F16>(isa, a, M, w, n0, n1, out, ldo);
    case kP8: return rows_fmt<kP8>(isa, a, M, w, n0, n1, out, ldo);
    case kP8F16: return rows_fmt<kP8F16>(isa, a, M, w, n0, n1, out, ldo);
    case kP8H: return rows_fmt<kP8H>(isa, a, M, w, n0, n1, out, ldo);
    case kQ4: return rows_fmt<kQ4>(isa, a, M, w, n0, n1, out, ldo);
    case kI8G16: return rows_fmt<kI8G16>(isa, a, M, w, n0, n1, out, ldo);
    default: return rows_fmt<kI8G32>(isa, a, M, w, n0, n1, out, ldo);
  }
}

// One group of 32: what weights.quantize_activations_int8 computes: scale amax / 127, values round(x * (127 / amax))
// clamped to +-127, half to even (the default rounding mode); an all-zero group stays zero with scale 0. Returns the
// sum of the values; u (if given) gets Act::u's operand for the ISA: |q| on AVX2, q xor 0x80 on VNNI.
int32_t quantize_group_scalar(const float* v, int8_t* q, uint8_t* u, float inv, int isa) {
  int32_t sum = 0;
  for (int64_t k = 0; k < kGroup; ++k) {
    q[k] = static_cast<int8_t>(std::nearbyint(std::min(127.f, std::max(-127.f, v[k] * inv))));
    sum += q[k];
    if (u) u[k] = isa == kAvx2 ? static_cast<uint8_t>(std::abs(q[k])) : static_cast<uint8_t>(q[k]) ^ 0x80;
  }
  return sum;
}

#if defined(SOT_X86)
// The same on AVX2, bit for bit: the same float32 product and clamp, vcvtps2dq rounding to nearest even. A decode
// step quantizes its activations at every matmul of every thread (~150 a step): scalar, that was ~2 ms of a batch-8
// step.
__attribute__((target(SOT_AVX2))) float amax_avx2(const float* v) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int k = 0; k < kGroup; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + k)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}

__attribute__((target(SOT_AVX2))) int32_t quantize_group_avx2(const float* v, int8_t* q, uint8_t* u, float inv,
                                                              int isa) {
  const __m256 s = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  __m256i r[4];
  for (int j = 0; j < 4; ++j)
    r[j] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(v + 8 * j), s))));
  __m256i t = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
  // int32 -> int8 in order: the packs work per 128-bit lane, the permutation undoes it
  const __m256i b = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), b);
  if (u)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(u),
                        isa == kAvx2 ? _mm256_abs_epi8(b) : _mm256_xor_si256(b, _mm256_set1_epi8(char(0x80))));
  return _mm_cvtsi128_si32(h);
}
#endif

void quantize_rows_int8(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* xq, float* xs, float* xsum,
                        int isa, uint8_t* xu = nullptr) {
  const int64_t G = K / kGroup;
#if defined(SOT_X86)
  const bool vec = isa >= kAvx2;
#else
  const bool vec = false;
#endif
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const float* v = x + m * ldx + g * kGroup;
      const int64_t at = m * K + g * kGroup;
      float amax = 0.f;
#if defined(SOT_X86)
      if (vec) amax = amax_avx2(v);
#endif
      if (!vec)
        for (int64_t k = 0; k < kGroup; ++k) amax = std::max(amax, std::fabs(v[k]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      const float s = amax / 127.f;
      int32_t sum;
#if defined(SOT_X86)
      if (vec)
        sum = quantize_group_avx2(v, xq + at, xu ? xu + at : nullptr, inv, isa);
      else
#endif
        sum = quantize_group_scalar(v, xq + at, xu ? xu + at : nullptr, inv, isa);
      xs[m * G + g] = s;
      xsum[m * G + g] = s * static_cast<float>(sum);
    }
}

// Per-thread buffers of quantized activations
struct ActBuffers {
  std::vector<int8_t> q;
  std::vector<uint8_t> u;
  std::vector<float> s, sum;
  Act quantize(const float* x, int64_t ldx, int64_t M, int64_t K, int isa) {
    const int64_t G = K / kGroup;
    if (static_cast<int64_t>(q.size()) < M * K) q.resize(M * K), u.resize(M * K);
    if (static_cast<int64_t>(s.size()) < M * G) s.resize(M * G), sum.resize(M * G);
    quantize_rows_int8(x, ldx, M, K, q.data(), s.data(), sum.data(), isa, u.data());
    return {q.data(), s.data(), sum.data(), K, G, u.data()};
  }
};

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
  TORCH_CHECK(false, "set_int8_isa: ", name, " is not one this CPU and kernel variant run (up to ", kIsaNames[best], ", or auto)");
}

void linear_int8_rows(const float* x, int64_t ldx, const WeightView& w, float* out, int64_t ldo, int64_t M,
                      int64_t n0, int64_t n1) {
  if (n1 <= n0 || M == 0) return;
  thread_local ActBuffers buf;  // a few KiB a thread: quantizing here is cheaper than a barrier
  const int isa = current_isa().load();  // one read: the activations' operand is the kernel's
  const Act a = buf.quantize(x, ldx, M, w.K, isa);
  rows_isa(isa, a, M, w, n0, n1, out, ldo);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.size(1) % kGroup == 0,
              "quantize_int8_activations: x [M, K] float32 CPU, K a multiple of 32");
  const auto xc = x.contiguous();
  auto q = at::empty(xc.sizes(), xc.options().dtype(at::kChar));
  auto s = at::empty({xc.size(0), xc.size(1) / kGroup}, xc.options());
  auto sum = at::empty_like(s);
  quantize_rows_int8(xc.data_ptr<float>(), xc.size(1), xc.size(0), xc.size(1), q.data_ptr<int8_t>(),
                     s.data_ptr<float>(), sum.data_ptr<float>(), current_isa().load());
  return {q, s, sum};
}

namespace {
at::Tensor run_quantized(const at::Tensor& x, const WeightView& wv) {
  const auto xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t M = xc.size(0), N = wv.N;
  auto out = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return out;
  // x quantized once for all threads (a prefill's rows too); the fused decode loop's threads each quantize their
  // own few rows instead (linear_int8_rows), which costs less than a barrier
  ActBuffers buf;
  const int isa = current_isa().load();
  const Act a = buf.quantize(xc.data_ptr<float>(), xc.stride(0), M, wv.K, isa);
  // >= ~32 KiB of weights a task
  const int64_t unit = wv.row_unit();  // a packed block's 8 rows go to one thread
  const int64_t grain = std::max<int64_t>(4, (int64_t{32} << 10) / std::max<int64_t>(1, wv.row_bytes() * unit));
  at::parallel_for(0, N / unit, grain, [&](int64_t b0, int64_t b1) {
    rows_isa(isa, a, M, wv, b0 * unit, b1 * unit, out.data_ptr<float>(), N);
  });
  return out;
}
}  // namespace

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  RECORD_FUNCTION("sot_cpp::linear_int8", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  x.size(1) == (w.dim() == 3 ? 32 * w.size(1) : w.size(1)),
              "linear_int8: x [M, K] float32 CPU with w's K");
  TORCH_CHECK(w.scalar_type() == at::kChar &&
                  ((w.dim() == 2 && w.size(1) % kGroup == 0 && scale.dim() == 2 &&
                    (scale.size(1) == w.size(1) / kGroup || scale.size(1) == w.size(1) / 16)) ||
                   (w.dim() == 3 && x.size(1) == 32 * w.size(1))),
              "linear_int8: int8 w [N, K] with a scale per 32 or per 16 weights ([N, K / 32] or [N, K / 16]), K a "
              "multiple of 32 (or packed: [N / 8, K / 32, 256])");
  return run_quantized(x, weight_view(w.contiguous(), scale.contiguous()));
}

at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale_min) {
  RECORD_FUNCTION("sot_cpp::linear_q4", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  ((w.dim() == 2 && x.size(1) == 2 * w.size(1)) || (w.dim() == 3 && x.size(1) == 32 * w.size(1))),
              "linear_q4: x [M, K] float32 CPU with K twice w's bytes a row (or packed: [N / 8, K / 32, 128])");
  return run_quantized(x, weight_view(w.contiguous(), scale_min.contiguous()));
}

SOT_NAMESPACE_END
