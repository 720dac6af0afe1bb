// Paged decode attention, float32 queries over float32 or bf16 K/V pools (a bf16 pool halves the bytes a step
// reads; its rows are widened exactly, every product and sum is float32): one query per sequence over its paged
// context, the contract of kernels.reference.paged_decode_attention. A task is one (sequence, KV head) and its G
// query heads (GQA): the addresses of the context's K and V rows are listed once, then the scores of all G heads
// (score_rows: each K row read once from memory, up to 4 heads x 4 tokens of independent FMA chains at a time), one
// softmax per head, and the weighted sums of the V rows for several heads at once (weighted_all: each V row read
// once per pass). Measured with SmolLM2's shapes (G = 3, D = 64, bf16 pool), 240 contexts of 60 tokens in L2, one
// thread: 1.5-1.6 ms with one head's 4 chains at a time and a scalar max, 1.1-1.2 ms now.
#include "ops.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

SOT_NAMESPACE_BEGIN
namespace {

#if defined(SOT_SIMD_VECTOR)
// out[0:NV*kLanes] = c * sum_p w[p] * (rows[p] + d0)[0:NV*kLanes], the NV accumulators in registers
template <int NV, typename T>
inline void weighted_chunk(float* out, const float* w, const void* const* rows, int64_t n, int64_t d0, float c) {
  vf acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = vzero();
  for (int64_t p = 0; p < n; ++p) {
    const vf wp = vset1(w[p]);
    const T* r = static_cast<const T*>(rows[p]) + d0;
    for (int i = 0; i < NV; ++i) acc[i] = vfma(wp, vload(r + i * kLanes), acc[i]);
  }
  for (int i = 0; i < NV; ++i) vstore(out + d0 + i * kLanes, vmul(acc[i], vset1(c)));
}
#endif

// out[0:D] = c * sum_p w[p] * rows[p][0:D], rows of T
template <typename T>
void weighted_rows(float* out, const float* w, const void* const* rows, int64_t n, int64_t D, float c) {
  int64_t d0 = 0;
#if defined(SOT_SIMD_VECTOR)
  for (; d0 + 4 * kLanes <= D; d0 += 4 * kLanes) weighted_chunk<4, T>(out, w, rows, n, d0, c);
  switch ((D - d0) / kLanes) {
    case 3: weighted_chunk<3, T>(out, w, rows, n, d0, c); break;
    case 2: weighted_chunk<2, T>(out, w, rows, n, d0, c); break;
    case 1: weighted_chunk<1, T>(out, w, rows, n, d0, c); break;
    default: break;
  }
  d0 += (D - d0) / kLanes * kLanes;
#endif
  for (; d0 < D; ++d0) {
    float a = 0.f;
    for (int64_t p = 0; p < n; ++p) a += w[p] * to_float(static_cast<const T*>(rows[p])[d0]);
    out[d0] = a * c;
  }
}

#if defined(SOT_SIMD_VECTOR)
// K/V rows this many tokens ahead are prefetched while the scores run (K to L1, V to L2 for the weighted pass): a
// context's rows are a pool row's 1 / KVH apart and blocks lie anywhere, which the hardware prefetchers follow
// poorly. Measured with SmolLM2's shapes, 8 sequences x 1000 tokens over 30 layers' pools (DRAM-bound), 2 threads,
// ms float32 / bf16 pools: before (one head and one reduction at a time, no prefetch) 29 / 33; no prefetch 24-32 /
// 18-20; 4 tokens ahead 22 / 14; 8: 18 / 13; 16: 19-21 / 12-14; 32: 19-21 / 14.
#ifndef SOT_ATT_PF
#define SOT_ATT_PF 8
#endif

constexpr int kVectorRegs = kLanes == 16 ? 32 : 16;  // AVX-512 : AVX2

inline void prefetch_row(const void* row, int64_t bytes, int hint) {
  for (int64_t b = 0; b < bytes; b += 64) {
    if (hint == 0)
      _mm_prefetch(static_cast<const char*>(row) + b, _MM_HINT_T0);
    else
      _mm_prefetch(static_cast<const char*>(row) + b, _MM_HINT_T1);
  }
}

// og[g * D + :] = inv[g] * sum_p scores[g * ctx + p] * vrows[p][:] for GN heads at once, D = NV * kLanes: each V
// row is read once for all of them (per head, the same sums in the same order as weighted_rows)
template <typename T, int NV, int GN>
void weighted_heads(float* og, const float* scores, int64_t ctx, const void* const* vrows, int64_t D,
                    const float* inv) {
  vf acc[GN][NV];
  for (int g = 0; g < GN; ++g)
    for (int v = 0; v < NV; ++v) acc[g][v] = vzero();
  for (int64_t p = 0; p < ctx; ++p) {
    const T* r = static_cast<const T*>(vrows[p]);
    vf rv[NV];
    for (int v = 0; v < NV; ++v) rv[v] = vload(r + v * kLanes);
    for (int g = 0; g < GN; ++g) {
      const vf w = vset1(scores[g * ctx + p]);
      for (int v = 0; v < NV; ++v) acc[g][v] = vfma(w, rv[v], acc[g][v]);
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int v = 0; v < NV; ++v) vstore(og + g * D + v * kLanes, vmul(acc[g][v], vset1(inv[g])));
}

// f(std::integral_constant<int, n>{}) for n = gn in 1..4: the compile-time head count of a register-blocked loop
// (f returns false where that instance would not fit the register file); false for any other gn
template <typename F>
bool with_head_count(int64_t gn, F&& f) {
  switch (gn) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return false;
  }
}

// weighted_heads for gn heads (og, scores and inv at the first of them) and a D of NV vectors; false where no
// instance fits the register file
template <typename T, int NV>
bool weighted_group(float* og, const float* scores, int64_t ctx, const void* const* vrows, int64_t D, int64_t gn,
                    const float* inv) {
  return with_head_count(gn, [&](auto n) {
    constexpr int GN = decltype(n)::value;
    if constexpr (GN * NV + NV <= kVectorRegs - 4) {  // GN * NV accumulators + NV row vectors
      weighted_heads<T, NV, GN>(og, scores, ctx, vrows, D, inv);
      return true;
    } else {
      return false;
    }
  });
}
#endif

// out heads g of og: inv[g] * the weighted V rows, several heads per pass where the shapes allow
template <typename T>
void weighted_all(float* og, const float* scores, int64_t ctx, const void* const* vrows, int64_t D, int64_t G,
                  const float* inv) {
  int64_t g = 0;
#if defined(SOT_SIMD_VECTOR)
  if (D % kLanes == 0) {
    const int64_t nv = D / kLanes;
    const int64_t step = std::min<int64_t>(4, (kVectorRegs - 4) / nv - 1);  // heads a pass keeps in registers
    for (; step > 0 && g < G; g += step) {
      const int64_t gn = std::min(step, G - g);
      float* o = og + g * D;
      const float* sg = scores + g * ctx;
      const bool done = nv == 1   ? weighted_group<T, 1>(o, sg, ctx, vrows, D, gn, inv + g)
                        : nv == 2 ? weighted_group<T, 2>(o, sg, ctx, vrows, D, gn, inv + g)
                        : nv == 4 ? weighted_group<T, 4>(o, sg, ctx, vrows, D, gn, inv + g)
                        : nv == 8 ? weighted_group<T, 8>(o, sg, ctx, vrows, D, gn, inv + g)
                                  : false;
      if (!done) break;
    }
  }
#endif
  for (; g < G; ++g) weighted_rows<T>(og + g * D, scores + g * ctx, vrows, ctx, D, inv[g]);
}

#if defined(SOT_SIMD_VECTOR)
// scores of tokens p..p+3 for GN heads at once (q_g at qg + g D, D a multiple of kLanes): the 4 * GN dot products
// are independent FMA chains, so the FMA pipes stay busy instead of waiting on one chain's latency; one vsum4 a head
template <typename T, int GN>
inline void score4_heads(const float* qg, const T* const* k, int64_t D, int64_t ctx, int64_t p, float sc,
                         float* scores) {
  vf a[GN][4];
  for (int g = 0; g < GN; ++g)
    for (int j = 0; j < 4; ++j) a[g][j] = vzero();
  for (int64_t d = 0; d < D; d += kLanes) {
    const vf k0 = vload(k[0] + d), k1 = vload(k[1] + d), k2 = vload(k[2] + d), k3 = vload(k[3] + d);
    for (int g = 0; g < GN; ++g) {
      const vf qv = vload(qg + g * D + d);
      a[g][0] = vfma(qv, k0, a[g][0]);
      a[g][1] = vfma(qv, k1, a[g][1]);
      a[g][2] = vfma(qv, k2, a[g][2]);
      a[g][3] = vfma(qv, k3, a[g][3]);
    }
  }
  for (int g = 0; g < GN; ++g) {
    float s4[4];
    vsum4(a[g][0], a[g][1], a[g][2], a[g][3], s4);
    for (int j = 0; j < 4; ++j) scores[g * ctx + p + j] = s4[j] * sc;
  }
}

// score4_heads for gn heads where the 4 gn accumulators, 4 K vectors and a q vector fit the registers
template <typename T>
bool score4_group(const float* qg, const T* const* k, int64_t D, int64_t ctx, int64_t p, float sc, float* scores,
                  int64_t gn) {
  return with_head_count(gn, [&](auto n) {
    constexpr int GN = decltype(n)::value;
    if constexpr (4 * GN + 5 <= kVectorRegs) {
      score4_heads<T, GN>(qg, k, D, ctx, p, sc, scores);
      return true;
    } else {
      return false;
    }
  });
}
#endif

// scores[g * ctx + p] = sc * q_g . krows[p] for the G heads: four rows at a time, up to 4 heads at a time (their
// 16 dot products independent chains), each head's four reductions sharing one shuffle tree (vsum4); the rows
// ahead prefetched
template <typename T>
void score_rows(const float* qg, int64_t G, int64_t D, const void* const* krows, const void* const* vrows,
                int64_t ctx, float sc, float* scores) {
  int64_t p = 0;
#if defined(SOT_SIMD_VECTOR)
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const int64_t step = std::min<int64_t>(4, (kVectorRegs - 5) / 4);  // heads a pass keeps in registers
  if (D % kLanes == 0) {
    for (; p + 4 <= ctx; p += 4) {
      if (SOT_ATT_PF > 0)
        for (int64_t j = p + SOT_ATT_PF; j < std::min(ctx, p + SOT_ATT_PF + 4); ++j) {
          prefetch_row(krows[j], row_bytes, 0);
          prefetch_row(vrows[j], row_bytes, 1);
        }
      const T* k[4] = {static_cast<const T*>(krows[p]), static_cast<const T*>(krows[p + 1]),
                       static_cast<const T*>(krows[p + 2]), static_cast<const T*>(krows[p + 3])};
      for (int64_t g = 0; g < G; g += step) {
        const int64_t gn = std::min(step, G - g);
        const bool done = score4_group<T>(qg + g * D, k, D, ctx, p, sc, scores + g * ctx, gn);
        TORCH_INTERNAL_ASSERT(done, "score_rows: no register-blocked instance for ", gn, " heads");  // step fits
      }
    }
  }
#endif
  for (; p < ctx; ++p)
    for (int64_t g = 0; g < G; ++g) scores[g * ctx + p] = dot(qg + g * D, static_cast<const T*>(krows[p]), D) * sc;
}

// The first context row task (s, ·) sees: a sliding window sees the last `window` keys, the rows before are never
// listed, so never read
inline int64_t first_visible(int64_t len, int64_t window) {
  return window > 0 ? std::max<int64_t>(0, len - window) : 0;
}

// f(i, at) for the rows lo..end-1 of sequence s's context in KV head kh: i = p - lo, `at` the row's element offset in a
// pool ([blocks, BS, KVH, D]; one place for the layout), walked block by block
template <typename F>
inline void for_each_row(const Paged& pg, int64_t s, int64_t kh, int64_t lo, int64_t end, F&& f) {
  const int64_t BS = pg.BS, KVH = pg.KVH, D = pg.D;
  const int64_t* tp = pg.tables.data_ptr<int64_t>() + s * pg.max_blocks;
  for (int64_t p = lo; p < end;) {
    const int64_t blk = p / BS, stop = std::min((blk + 1) * BS, end);
    const int64_t base = (tp[blk] * BS * KVH + kh) * D;
    for (; p < stop; ++p) f(p - lo, base + (p - blk * BS) * KVH * D);
  }
}

template <typename T>
void attend_rows(const Paged& pg, const float* qp, const void* kp, const void* vp, float* op, float sc, int64_t t,
                 AttendScratch& scratch, int64_t window) {
  const int64_t H = pg.H, D = pg.D, KVH = pg.KVH, G = pg.G;
  const int64_t s = t / KVH, kh = t % KVH, len = pg.lens.data_ptr<int64_t>()[s];
  const int64_t lo = first_visible(len, window), ctx = len - lo;
  if (static_cast<int64_t>(scratch.krows.size()) < ctx) {
    scratch.krows.resize(ctx);
    scratch.vrows.resize(ctx);
  }
  if (static_cast<int64_t>(scratch.scores.size()) < G * ctx) scratch.scores.resize(G * ctx);
  const void** krows = scratch.krows.data();
  const void** vrows = scratch.vrows.data();
  float* scores = scratch.scores.data();
  const float* qg = qp + (s * H + kh * G) * D;  // G consecutive query heads
  float* og = op + (s * H + kh * G) * D;
  for_each_row(pg, s, kh, lo, len, [&](int64_t i, int64_t at) {
    krows[i] = static_cast<const T*>(kp) + at;
    vrows[i] = static_cast<const T*>(vp) + at;
  });
  score_rows<T>(qg, G, D, krows, vrows, ctx, sc, scores);
  float inv[64];  // G <= 64 (checked by check_paged)
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * ctx;
    const float sum = exp_shift_sum(sg, ctx, max_of(sg, ctx));
    inv[g] = sum > 0.f ? 1.f / sum : 0.f;  // ctx == 0: zeros
  }
  weighted_all<T>(og, scores, ctx, vrows, D, G, inv);
}

}  // namespace

Paged check_paged(const char* what, int64_t B, int64_t H, int64_t D, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& context_lens) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), what,
              ": caches [blocks, block_size, kv_heads, D]");
  TORCH_CHECK((k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16) &&
                  v_cache.scalar_type() == k_cache.scalar_type() && k_cache.device().is_cpu() &&
                  v_cache.device().is_cpu(),
              what, " (C++): float32 or bfloat16 CPU pools, K and V alike");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), what, ": contiguous pools");
  Paged p{B, H, D, k_cache.size(1), k_cache.size(2), 0, 0};
  TORCH_CHECK(k_cache.size(3) == D && p.KVH > 0 && H % p.KVH == 0, what, ": head shapes");
  p.G = H / p.KVH;
  TORCH_CHECK(p.G <= 64, what, ": at most 64 query heads per KV head");
  p.bf16 = k_cache.scalar_type() == at::kBFloat16;
  p.tables = block_tables.to(at::kLong).contiguous();
  p.lens = context_lens.to(at::kLong).contiguous();
  TORCH_CHECK(p.tables.dim() == 2 && p.tables.size(0) == B && p.lens.numel() == B, what,
              ": block_tables [B, max_blocks], context_lens [B]");
  p.max_blocks = p.tables.size(1);
  const int64_t* tp = p.tables.data_ptr<int64_t>();
  const int64_t* lp = p.lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < B; ++s) {
    TORCH_CHECK(lp[s] >= 0 && lp[s] <= p.max_blocks * p.BS, what, ": context_lens out of range");
    for (int64_t i = 0; i < (lp[s] + p.BS - 1) / p.BS; ++i)
      TORCH_CHECK(tp[s * p.max_blocks + i] >= 0 && tp[s * p.max_blocks + i] < k_cache.size(0), what,
                  ": block id out of range");
    p.total += lp[s];
  }
  return p;
}

void attend_task(const Paged& pg, const float* qp, const void* kp, const void* vp, float* op, float sc, int64_t t,
                 AttendScratch& scratch, int64_t window) {
  if (pg.bf16) return attend_rows<bf16>(pg, qp, kp, vp, op, sc, t, scratch, window);
  attend_rows<float>(pg, qp, kp, vp, op, sc, t, scratch, window);
}

void prefetch_task(const Paged& pg, const void* kp, const void* vp, int64_t t, int64_t window) {
#if defined(SOT_SIMD_VECTOR)
  static const bool off = std::getenv("SOT_NO_TASK_PREFETCH") != nullptr;
  if (off || t >= pg.B * pg.KVH) return;
  const int64_t s = t / pg.KVH, kh = t % pg.KVH, len = pg.lens.data_ptr<int64_t>()[s];
  const int64_t es = pg.bf16 ? 2 : 4, row = pg.D * es;
  // the rows attend_rows reads but the new one (stored after this)
  for_each_row(pg, s, kh, first_visible(len, window), len - 1, [&](int64_t, int64_t at) {
    prefetch_row(static_cast<const char*>(kp) + at * es, row, 1);
    prefetch_row(static_cast<const char*>(vp) + at * es, row, 1);
  });
#else
  (void)pg, (void)kp, (void)vp, (void)t, (void)window;
#endif
}

void rope_store_task(const Paged& pg, const float* qkv, int64_t ldqkv, const float* cos, const float* sin,
                     const int64_t* slots, float* q, void* k_cache, void* v_cache, int64_t s, int64_t kh) {
  const int64_t H = pg.H, KVH = pg.KVH, D = pg.D, G = pg.G, half = D / 2;
  const float* row = qkv + s * ldqkv;
  const float* c = cos + s * half;
  const float* sn = sin + s * half;
  for (int64_t h = kh * G; h < (kh + 1) * G; ++h) rope_head(row + h * D, c, sn, q + (s * H + h) * D, half);
  const int64_t at = (slots[s] * KVH + kh) * D;
  const float* v = row + (H + KVH + kh) * D;
  if (!pg.bf16) {
    rope_head(row + (H + kh) * D, c, sn, static_cast<float*>(k_cache) + at, half);
    std::memcpy(static_cast<float*>(v_cache) + at, v, D * sizeof(float));
    return;
  }
  thread_local std::vector<float> k;  // rotated in float32, then rounded to nearest even like Tensor.to(bfloat16)
  if (static_cast<int64_t>(k.size()) < D) k.resize(D);
  rope_head(row + (H + kh) * D, c, sn, k.data(), half);
  bf16* kc = static_cast<bf16*>(k_cache) + at;
  bf16* vc = static_cast<bf16*>(v_cache) + at;
  for (int64_t i = 0; i < D; ++i) kc[i] = bf16(k[i]), vc[i] = bf16(v[i]);
}

namespace {

// out [B, H, D] = attention of q [B, H, D] (contiguous) over the paged context
void attend(const Paged& pg, const float* qp, const void* kp, const void* vp, float* op, float sc, int64_t window) {
  // one thread unless there are >= ~64 KiB of K/V rows to read per task on average
  const int64_t tasks = pg.B * pg.KVH;
  const int64_t bytes_per_task = std::max<int64_t>(1, pg.total * pg.D * (pg.bf16 ? 4 : 8) / std::max<int64_t>(1, pg.B));
  const int64_t grain = std::max<int64_t>(1, (int64_t{64} << 10) / bytes_per_task);
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    AttendScratch scratch;
    for (int64_t t = t0; t < t1; ++t) attend_task(pg, qp, kp, vp, op, sc, t, scratch, window);
  });
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  std::optional<int64_t> max_context_len, int64_t window) {
  RECORD_FUNCTION("sot_cpp::paged_decode_attention", std::vector<c10::IValue>());
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.device().is_cpu(),
              "paged_decode_attention: q [B, H, D] float32 CPU");
  (void)max_context_len;  // lengths are read on the host here anyway
  const Paged pg = check_paged("paged_decode_attention", q.size(0), q.size(1), q.size(2), k_cache, v_cache,
                               block_tables, context_lens);
  const auto qc = q.contiguous();
  auto out = at::empty_like(qc);
  TORCH_CHECK(window >= 0, "paged_decode_attention: window >= 0");
  attend(pg, qc.data_ptr<float>(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr<float>(),
         static_cast<float>(scale), window);
  return out;
}

at::Tensor rope_store_decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                       at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                       const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                       int64_t window) {
  RECORD_FUNCTION("sot_cpp::rope_store_decode_attention", std::vector<c10::IValue>());
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.device().is_cpu() &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rope_store_decode_attention: qkv [B, (H + 2 kv_heads) * D], cos, sin float32 CPU");
  TORCH_CHECK(k_cache.dim() == 4, "rope_store_decode_attention: caches [blocks, block_size, kv_heads, D]");
  const int64_t B = qkv.size(0), KVH = k_cache.size(2), D = k_cache.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && qkv.size(1) % D == 0 && qkv.size(1) / D > 2 * KVH,
              "rope_store_decode_attention: qkv [B, (H + 2 kv_heads) * D] for the caches' kv_heads and D");
  const int64_t H = qkv.size(1) / D - 2 * KVH;
  const Paged pg = check_paged("rope_store_decode_attention", B, H, D, k_cache, v_cache, block_tables, context_lens);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == B && cos.size(1) == half && sin.sizes() == cos.sizes(),
              "rope_store_decode_attention: cos and sin [B, D/2]");
  const auto slot = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slot.dim() == 1 && slot.size(0) == B, "rope_store_decode_attention: slot_mapping [B]");
  const int64_t* sp = slot.data_ptr<int64_t>();
  const int64_t slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < B; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < slots, "rope_store_decode_attention: slot out of range");
  const auto x = qkv.stride(1) == 1 ? qkv : qkv.contiguous();
  const auto cc = cos.contiguous();
  const auto sc = sin.contiguous();
  auto q = at::empty({B, H, D}, x.options());
  float* qp = q.data_ptr<float>();
  void* kp = k_cache.data_ptr();
  void* vp = v_cache.data_ptr();
  for (int64_t t = 0; t < B; ++t)  // a few kilobytes: RoPE into q and the K slot, V copied to its slot
    for (int64_t kh = 0; kh < KVH; ++kh)
      rope_store_task(pg, x.data_ptr<float>(), x.stride(0), cc.data_ptr<float>(), sc.data_ptr<float>(), sp, qp, kp, vp,
                      t, kh);
  auto out = at::empty({B, H * D}, x.options());
  TORCH_CHECK(window >= 0, "rope_store_decode_attention: window >= 0");
  attend(pg, qp, kp, vp, out.data_ptr<float>(), static_cast<float>(scale), window);
  return out;
}

SOT_NAMESPACE_END
