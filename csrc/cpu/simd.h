// The few SIMD primitives the CPU kernels share, for the widest ISA this variant targets (target.h):
// AVX-512F (16 lanes), else AVX2+FMA (8 lanes), else none (kLanes == 0: every kernel's scalar tail loop then
// does all the work).
//
//   vf                    a vector of kLanes floats
//   vload(p)              kLanes weights at p as floats: float, bf16 (exact: << 16) or int8 (exact)
//   vfma(a, b, c)         a * b + c, one rounding
//   vsum(v)               horizontal sum; vsum4(a, b, c, d, out) four of them at once
//   vexp(v)               e^v within a few ulp (0 below -87.3, +inf above 88.72)
// IEEE fp32 throughout (no -ffast-math).
#pragma once

#include "target.h"

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(SOT_HAS_AVX2)
#include <immintrin.h>
#endif

SOT_NAMESPACE_BEGIN

using bf16 = c10::BFloat16;

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

#if defined(SOT_HAS_AVX512)
#define SOT_SIMD "avx512f"
#define SOT_SIMD_VECTOR 1
constexpr int kLanes = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float v) { return _mm512_set1_ps(v); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vf vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
// out[k] = vsum of the k-th vector: the 4 reductions share their shuffle tree (10 shuffles and adds, not 4 x 8)
inline void vsum4(vf a, vf b, vf c, vf d, float* out) {
  const vf ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const vf cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  vf s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));  // 128-bit lane k: vector k
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));  // element 4k: the sum of vector k
  _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                                   0, 0, 0, 0), s)));
}
inline float vmaxall(vf v) { return _mm512_reduce_max_ps(v); }
inline vf vround(vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline vf vselect_lt(vf x, float lo, vf v, float fill) {  // x < lo ? fill : v
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vset1(lo), _CMP_LT_OQ), v, vset1(fill));
}
inline vf vselect_gt(vf x, float hi, vf v, float fill) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vset1(hi), _CMP_GT_OQ), v, vset1(fill));
}
#elif defined(SOT_HAS_AVX2)
#define SOT_SIMD "avx2+fma"
#define SOT_SIMD_VECTOR 1
constexpr int kLanes = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float v) { return _mm256_set1_ps(v); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vf vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline void vsum4(vf a, vf b, vf c, vf d, float* out) {  // out[k] = vsum of the k-th vector
  const vf s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // [a b c d | a b c d] partial sums
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
}
inline float vmaxall(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vround(vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vf vselect_lt(vf x, float lo, vf v, float fill) {
  return _mm256_blendv_ps(v, vset1(fill), _mm256_cmp_ps(x, vset1(lo), _CMP_LT_OQ));
}
inline vf vselect_gt(vf x, float hi, vf v, float fill) {
  return _mm256_blendv_ps(v, vset1(fill), _mm256_cmp_ps(x, vset1(hi), _CMP_GT_OQ));
}
#else
#define SOT_SIMD "scalar"
constexpr int kLanes = 0;
#endif

#if defined(SOT_SIMD_VECTOR)
// e^x = 2^n * e^r with n = round(x / ln 2) (at most 127), r = x - n ln 2 (ln 2 in two parts, so r is exact),
// e^r by Cephes' expf polynomial, 2^n through the exponent bits. Below -87.3 (where e^x turns subnormal)
// the result is 0, above 88.72 +inf.
inline vf vexp(vf x) {
  // x86 min/max return their second operand when either is NaN: written so that a NaN x stays NaN
  const vf xc = vmin(vset1(88.72f), vmax(vset1(-87.3f), x));
  const vf n = vmin(vset1(127.f), vround(vmul(xc, vset1(1.44269504088896341f))));
  vf r = vfma(n, vset1(-0.693359375f), xc);
  r = vfma(n, vset1(2.12194440e-4f), r);
  vf p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(vmul(p, r), r, vadd(r, vset1(1.f)));
  const vf y = vselect_lt(x, -87.3f, vmul(p, vpow2i(n)), 0.f);
  return vselect_gt(x, 88.72f, y, INFINITY);
}
#endif

// ---- array helpers (vector body, scalar tail)
// b float32 or bf16 (widened exactly)
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t k = 0;
  float s = 0.f;
#if defined(SOT_SIMD_VECTOR)
  vf acc0 = vzero(), acc1 = vzero();
  for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
    acc0 = vfma(vload(a + k), vload(b + k), acc0);
    acc1 = vfma(vload(a + k + kLanes), vload(b + k + kLanes), acc1);
  }
  for (; k + kLanes <= n; k += kLanes) acc0 = vfma(vload(a + k), vload(b + k), acc0);
  s = vsum(vadd(acc0, acc1));
#endif
  for (; k < n; ++k) s += a[k] * to_float(b[k]);
  return s;
}

// y += a * x
inline void axpy(float* y, float a, const float* x, int64_t n) {
  int64_t k = 0;
#if defined(SOT_SIMD_VECTOR)
  const vf av = vset1(a);
  for (; k + kLanes <= n; k += kLanes) vstore(y + k, vfma(av, vload(x + k), vload(y + k)));
#endif
  for (; k < n; ++k) y[k] += a * x[k];
}

// max over x[0:n] (-inf for n == 0), NaNs skipped as std::max(m, x) skips them: one dependent maxss a value was the
// softmax's slowest loop
inline float max_of(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t k = 0;
#if defined(SOT_SIMD_VECTOR)
  vf mv = vset1(m);
  for (; k + kLanes <= n; k += kLanes) mv = vmax(vload(x + k), mv);  // a NaN in the first operand: mv kept
  m = vmaxall(mv);
#endif
  for (; k < n; ++k) m = std::max(m, x[k]);
  return m;
}

// x[i] = e^(x[i] - m); returns the sum
inline float exp_shift_sum(float* x, int64_t n, float m) {
  int64_t k = 0;
  float s = 0.f;
#if defined(SOT_SIMD_VECTOR)
  const vf mv = vset1(m);
  vf acc = vzero();
  for (; k + kLanes <= n; k += kLanes) {
    const vf e = vexp(vsub(vload(x + k), mv));
    vstore(x + k, e);
    acc = vadd(acc, e);
  }
  s = vsum(acc);
#endif
  for (; k < n; ++k) {
    x[k] = std::exp(x[k] - m);
    s += x[k];
  }
  return s;
}

SOT_NAMESPACE_END
