// Paged decode attention, float32 queries over float32 or bf16 K/V pools (a bf16 pool halves the bytes a step
// reads; its rows are widened exactly, every product and sum is float32): one query per sequence over its paged
// context, the contract of kernels.reference.paged_decode_attention. A task is one (sequence, KV head) and its G
// query heads (GQA): the addresses of the context's K and V rows are listed once, then the scores of all G heads
// (score_rows: each K row read once from memory, up to 4 heads x 4 tokens of independent FMA chains at a time), one
// softmax per head, and the weighted sums of the V rows for several heads at once (weighted_all: each V row read
// once per pass). Measured with SmolLM2's shapes (G = 3, D = 64, bf16 pool), 240 contexts of 60 tokens in L2, one
// thread: 1.5-1.6 ms with one head's 4 chains at a time and a scalar max, 1.1-1.2 ms now.
//
// Where one task a (sequence, KV head) would read a shared prefix once per sequence, or leave threads idle (one
// long sequence has KVH tasks), the batch is cut into parts instead (plan_attention): a prefix group's K/V rows once
// against all its members' queries (cascade), long contexts in chunks, each part's output merged by log-sum-exp.
// Prefill (paged_prefill_attention) is the same span kernel over blocks of 16 new tokens, each token's causal (and
// window) limit a mask over the span its block reads.
#include "ops.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

SOT_NAMESPACE_BEGIN
namespace {

// plan_attention: a prefix group shares at least this many rows (below it the plain tasks do as well on a CPU:
// measured with SmolLM2's shapes, 8 sequences on 2 threads, the attention of a step took 1.5 / 1.1 ms with / without
// cascade at 40 shared tokens, 1.8 / 1.7 at 130, 3.1 / 3.5 at 300, 4.7 / 6.5 at 600, 7.2 / 12.1 at 1000; the
// threshold of kernels.cascade.cascade_pays); a chunk keeps at least kMinChunk rows; reading a row costs about as
// much as kRowCost query rows' products with it
constexpr int64_t kMinShared = 256, kMinChunk = 32;
constexpr double kRowCost = 4.0;

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

// Thread tid's run [a, b) of n items of cumulative cost cost[0..n] (cost[0] = 0): runs of about equal cost
std::pair<int64_t, int64_t> cost_range(const std::vector<double>& cost, int tid, int threads) {
  const int64_t n = static_cast<int64_t>(cost.size()) - 1;
  auto at = [&](int i) {  // the first item at or after i / threads of the cost
    if (i >= threads) return n;
    const double c = cost.back() * i / threads;
    return static_cast<int64_t>(std::lower_bound(cost.begin(), cost.end() - 1, c) - cost.begin());
  };
  return {at(tid), at(tid + 1)};
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

// rows [lo, end) of sequence s's context in KV head kh, K and V, into L2 (SOT_NO_TASK_PREFETCH=1: not, for A/B runs)
void prefetch_rows(const Paged& pg, const void* kp, const void* vp, int64_t s, int64_t kh, int64_t lo, int64_t end) {
#if defined(SOT_SIMD_VECTOR)
  static const bool off = std::getenv("SOT_NO_TASK_PREFETCH") != nullptr;
  if (off) return;
  const int64_t es = pg.bf16 ? 2 : 4, row = pg.D * es;
  for_each_row(pg, s, kh, lo, end, [&](int64_t, int64_t at) {
    prefetch_row(static_cast<const char*>(kp) + at * es, row, 1);
    prefetch_row(static_cast<const char*>(vp) + at * es, row, 1);
  });
#else
  (void)pg, (void)kp, (void)vp, (void)s, (void)kh, (void)lo, (void)end;
#endif
}

// Every row sees every key of the span
struct AllVisible {
  int64_t n;
  std::pair<int64_t, int64_t> operator()(int64_t) const { return {0, n}; }
};

// The attention of R query rows qg [R, D] (contiguous) over rows [lo, hi) of sequence s's context in KV head kh:
// og [R, D], row r over the keys visible(r) = [a, b) of the span (a causal or windowed mask; the others' weights
// zero); lse[r] their log-sum-exp (for a merge), where asked for
template <typename T, typename Visible = AllVisible>
void attend_span(const Paged& pg, const float* qg, int64_t R, const void* kp, const void* vp, int64_t s, int64_t kh,
                 int64_t lo, int64_t hi, float sc, float* og, float* lse, AttendScratch& scratch,
                 Visible visible = AllVisible{0}) {
  const int64_t D = pg.D, n = hi - lo;
  if (static_cast<int64_t>(scratch.krows.size()) < n) {
    scratch.krows.resize(n);
    scratch.vrows.resize(n);
  }
  if (static_cast<int64_t>(scratch.scores.size()) < R * n) scratch.scores.resize(R * n);
  if (static_cast<int64_t>(scratch.inv.size()) < R) scratch.inv.resize(R);
  const void** krows = scratch.krows.data();
  const void** vrows = scratch.vrows.data();
  float* scores = scratch.scores.data();
  float* inv = scratch.inv.data();
  for_each_row(pg, s, kh, lo, hi, [&](int64_t i, int64_t at) {
    krows[i] = static_cast<const T*>(kp) + at;
    vrows[i] = static_cast<const T*>(vp) + at;
  });
  score_rows<T>(qg, R, D, krows, vrows, n, sc, scores);
  if constexpr (std::is_same_v<Visible, AllVisible>) visible.n = n;
  for (int64_t r = 0; r < R; ++r) {
    const auto [a, b] = visible(r);
    float* sr = scores + r * n;
    std::fill(sr, sr + a, 0.f);
    std::fill(sr + b, sr + n, 0.f);
    const float m = max_of(sr + a, b - a), sum = exp_shift_sum(sr + a, b - a, m);
    inv[r] = sum > 0.f ? 1.f / sum : 0.f;  // n == 0: zeros
    if (lse) lse[r] = sum > 0.f ? m + std::log(sum) : -std::numeric_limits<float>::infinity();
  }
  weighted_all<T>(og, scores, n, vrows, D, R, inv);
}

template <typename T>
void attend_rows(const Paged& pg, const float* qp, const void* kp, const void* vp, float* op, float sc, int64_t t,
                 AttendScratch& scratch, int64_t window) {
  const int64_t s = t / pg.KVH, kh = t % pg.KVH, len = pg.lens.data_ptr<int64_t>()[s];
  const int64_t at = (s * pg.H + kh * pg.G) * pg.D;  // G consecutive query heads
  attend_span<T>(pg, qp + at, pg.G, kp, vp, s, kh, first_visible(len, window), len, sc, op + at, nullptr, scratch);
}

template <typename T>
void attend_part_rows(const Paged& pg, const AttnPlan& plan, int64_t p, const float* qp, const void* kp,
                      const void* vp, float sc, float* part_o, float* part_lse, AttendScratch& scratch) {
  const AttnPart& a = plan.parts[p];
  const int64_t G = pg.G, D = pg.D, R = a.nm * G;
  const float* qg = qp + (plan.members[a.m0] * pg.H + a.kh * G) * D;
  if (a.nm > 1) {  // the members' query heads of this KV head, gathered into one [R, D] block
    if (static_cast<int64_t>(scratch.q.size()) < R * D) scratch.q.resize(R * D);
    for (int64_t i = 0; i < a.nm; ++i)
      std::memcpy(scratch.q.data() + i * G * D, qp + (plan.members[a.m0 + i] * pg.H + a.kh * G) * D,
                  G * D * sizeof(float));
    qg = scratch.q.data();
  }
  attend_span<T>(pg, qg, R, kp, vp, a.rep, a.kh, a.lo, a.hi, sc, part_o + a.out * G * D, part_lse + a.out * G,
                 scratch);
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

// Shared prefixes (cascade) and chunks. A group: sequences whose block tables start with the same block ids, each
// of those blocks full and before the block of the sequence's new token (written this step, never shared).
AttnPlan plan_attention(const Paged& pg, int threads) {
  AttnPlan plan;
  if (std::getenv("SOT_NO_ATTN_PARTS")) return plan;  // one task a (sequence, KV head): A/B runs
  const int64_t B = pg.B, KVH = pg.KVH, BS = pg.BS, G = pg.G;
  const int64_t* tp = pg.tables.data_ptr<int64_t>();
  const int64_t* lp = pg.lens.data_ptr<int64_t>();
  auto table = [&](int64_t s) { return tp + s * pg.max_blocks; };
  std::vector<int64_t> shared(B, 0);  // context rows of each sequence its group's parts read
  std::vector<std::pair<int64_t, int64_t>> by_first;  // (first block, sequence) of those with a shareable block
  for (int64_t s = 0; s < B; ++s)
    if ((lp[s] - 1) / BS >= 1) by_first.emplace_back(table(s)[0], s);
  std::sort(by_first.begin(), by_first.end());
  struct Group {
    int64_t m0, nm, rows;
  };
  std::vector<Group> groups;
  for (size_t i = 0; i < by_first.size();) {
    size_t j = i;
    while (j < by_first.size() && by_first[j].first == by_first[i].first) ++j;
    if (j - i >= 2) {
      int64_t n = pg.max_blocks;
      for (size_t r = i; r < j; ++r) n = std::min(n, (lp[by_first[r].second] - 1) / BS);
      const int64_t* t0 = table(by_first[i].second);
      int64_t k = 0;
      for (; k < n; ++k) {
        bool same = true;
        for (size_t r = i + 1; r < j && same; ++r) same = table(by_first[r].second)[k] == t0[k];
        if (!same) break;
      }
      if (k * BS >= kMinShared) {
        groups.push_back({static_cast<int64_t>(plan.members.size()), static_cast<int64_t>(j - i), k * BS});
        for (size_t r = i; r < j; ++r) {
          plan.members.push_back(by_first[r].second);
          shared[by_first[r].second] = k * BS;
        }
      }
    }
    i = j;
  }
  std::vector<int64_t> single(B);  // each sequence as a group of one, for its own parts
  for (int64_t s = 0; s < B; ++s) {
    single[s] = static_cast<int64_t>(plan.members.size());
    plan.members.push_back(s);
  }
  // the spans before chunking, each for every KV head; a part's cost: its rows read, and their products with its
  // queries
  std::vector<AttnPart> whole;
  for (const Group& g : groups) whole.push_back({plan.members[g.m0], 0, 0, g.rows, g.m0, g.nm, 0});
  for (int64_t s = 0; s < B; ++s) whole.push_back({s, 0, shared[s], lp[s], single[s], 1, 0});
  auto cost_of = [&](const AttnPart& a) { return static_cast<double>(a.hi - a.lo) * (a.nm * G + kRowCost); };
  double total = 0.0;
  for (const AttnPart& a : whole) total += KVH * cost_of(a);
  // no part above a third of a thread's share: contiguous runs of parts then balance to within that. A chunk's
  // KV heads are consecutive parts, so that a thread reads its rows' whole pool rows (every head's, side by side
  // in the pool), not one head's 1 / KVH of each
  const double cap = threads > 1 ? total / (3.0 * threads) : total;
  bool split = false;
  for (const AttnPart& a : whole) {
    const int64_t rows = a.hi - a.lo;
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(std::ceil(cost_of(a) / cap)),
                                                             rows / kMinChunk));
    split = split || n > 1;
    for (int64_t c = 0; c < n; ++c)
      for (int64_t kh = 0; kh < KVH; ++kh) {
        AttnPart part = a;
        part.kh = kh, part.lo = a.lo + rows * c / n, part.hi = a.lo + rows * (c + 1) / n;
        plan.parts.push_back(part);
      }
  }
  plan.active = !groups.empty() || split;
  if (!plan.active) return plan;
  // slots, then each task's list of them
  std::vector<int64_t> count(B * KVH + 1, 0);
  plan.cost.assign(1, 0.0);
  for (AttnPart& a : plan.parts) {
    a.out = plan.num_slots;
    plan.num_slots += a.nm;
    for (int64_t i = 0; i < a.nm; ++i) ++count[plan.members[a.m0 + i] * KVH + a.kh + 1];
    plan.cost.push_back(plan.cost.back() + cost_of(a));
  }
  for (int64_t t = 0; t < B * KVH; ++t) count[t + 1] += count[t];
  plan.first = count;
  plan.slots.resize(plan.num_slots);
  for (const AttnPart& a : plan.parts)
    for (int64_t i = 0; i < a.nm; ++i) plan.slots[count[plan.members[a.m0 + i] * KVH + a.kh]++] = a.out + i;
  return plan;
}

std::pair<int64_t, int64_t> AttnPlan::range(int tid, int threads) const { return cost_range(cost, tid, threads); }

std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, std::vector<int64_t>>> attention_plan(
    const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size, int64_t kv_heads,
    int64_t heads, int64_t threads) {
  TORCH_CHECK(block_size > 0 && kv_heads > 0 && heads % kv_heads == 0 && threads > 0, "attention_plan: shapes");
  Paged pg{context_lens.numel(), heads, 1, block_size, kv_heads, heads / kv_heads, 0};
  pg.tables = block_tables.to(at::kLong).contiguous();
  pg.lens = context_lens.to(at::kLong).contiguous();
  TORCH_CHECK(pg.tables.dim() == 2 && pg.tables.size(0) == pg.B, "attention_plan: block_tables [B, max_blocks]");
  pg.max_blocks = pg.tables.size(1);
  const AttnPlan plan = plan_attention(pg, static_cast<int>(threads));
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, std::vector<int64_t>>> out;
  if (!plan.active) return out;
  for (const AttnPart& a : plan.parts)
    out.emplace_back(a.rep, a.kh, a.lo, a.hi,
                     std::vector<int64_t>(plan.members.begin() + a.m0, plan.members.begin() + a.m0 + a.nm));
  return out;
}

void attend_part(const Paged& pg, const AttnPlan& plan, int64_t p, const float* q, const void* kp, const void* vp,
                 float sc, float* part_o, float* part_lse, AttendScratch& scratch) {
  if (pg.bf16) return attend_part_rows<bf16>(pg, plan, p, q, kp, vp, sc, part_o, part_lse, scratch);
  attend_part_rows<float>(pg, plan, p, q, kp, vp, sc, part_o, part_lse, scratch);
}

void merge_task(const Paged& pg, const AttnPlan& plan, int64_t t, const float* part_o, const float* part_lse,
                float* out) {
  const int64_t G = pg.G, D = pg.D, s = t / pg.KVH, kh = t % pg.KVH;
  const int64_t* sl = plan.slots.data() + plan.first[t];
  const int64_t n = plan.first[t + 1] - plan.first[t];
  for (int64_t g = 0; g < G; ++g) {
    float* o = out + (s * pg.H + kh * G + g) * D;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, part_lse[sl[i] * G + g]);
    float wsum = 0.f;
    std::fill(o, o + D, 0.f);
    for (int64_t i = 0; i < n; ++i) {
      const float lse = part_lse[sl[i] * G + g];
      if (lse == -std::numeric_limits<float>::infinity()) continue;  // an empty part
      const float w = std::exp(lse - m);
      const float* po = part_o + (sl[i] * G + g) * D;
      for (int64_t d = 0; d < D; ++d) o[d] += w * po[d];
      wsum += w;
    }
    const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}

void prefetch_part(const Paged& pg, const AttnPlan& plan, int64_t p, const void* kp, const void* vp) {
  if (p >= static_cast<int64_t>(plan.parts.size())) return;
  const AttnPart& a = plan.parts[p];
  prefetch_rows(pg, kp, vp, a.rep, a.kh, a.lo, a.hi);
}

void prefetch_task(const Paged& pg, const void* kp, const void* vp, int64_t t, int64_t window) {
  if (t >= pg.B * pg.KVH) return;
  const int64_t s = t / pg.KVH, len = pg.lens.data_ptr<int64_t>()[s];
  // the rows attend_rows reads but the new one (stored after this)
  prefetch_rows(pg, kp, vp, s, t % pg.KVH, first_visible(len, window), len - 1);
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
  const int threads = at::get_num_threads();
  const AttnPlan plan = window > 0 ? AttnPlan{} : plan_attention(pg, threads);
  if (plan.active) {  // each thread its run of parts (of equal cost), then each task's merge
    std::vector<float> part_o(plan.num_slots * pg.G * pg.D), part_lse(plan.num_slots * pg.G);
    at::parallel_for(0, threads, 1, [&](int64_t i0, int64_t i1) {
      AttendScratch scratch;
      for (int64_t i = i0; i < i1; ++i) {
        const auto [p0, p1] = plan.range(static_cast<int>(i), threads);
        for (int64_t p = p0; p < p1; ++p)
          attend_part(pg, plan, p, qp, kp, vp, sc, part_o.data(), part_lse.data(), scratch);
      }
    });
    at::parallel_for(0, pg.B * pg.KVH, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) merge_task(pg, plan, t, part_o.data(), part_lse.data(), op);
    });
    return;
  }
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

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q,
                                   const at::Tensor& context_lens, double scale, int64_t window) {
  RECORD_FUNCTION("sot_cpp::paged_prefill_attention", std::vector<c10::IValue>());
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.device().is_cpu(),
              "paged_prefill_attention: q [T, H, D] float32 CPU");
  TORCH_CHECK(window >= 0, "paged_prefill_attention: window >= 0");
  const int64_t B = context_lens.numel(), T = q.size(0), H = q.size(1), D = q.size(2);
  const Paged pg = check_paged("paged_prefill_attention", B, H, D, k_cache, v_cache, block_tables, context_lens);
  const auto cu = cu_seqlens_q.to(at::kLong).contiguous();
  TORCH_CHECK(cu.dim() == 1 && cu.numel() == B + 1, "paged_prefill_attention: cu_seqlens_q [B + 1]");
  const int64_t* cp = cu.data_ptr<int64_t>();
  const int64_t* lp = pg.lens.data_ptr<int64_t>();
  TORCH_CHECK(cp[0] == 0 && cp[B] == T, "paged_prefill_attention: cu_seqlens_q from 0 to the T queries");
  for (int64_t s = 0; s < B; ++s)
    TORCH_CHECK(cp[s + 1] >= cp[s] && cp[s + 1] - cp[s] <= lp[s],
                "paged_prefill_attention: a sequence's new tokens are the last of its context");
  const auto qc = q.contiguous();
  auto out = at::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t KVH = pg.KVH, G = pg.G;
  // a task: a block of up to kQueryBlock new tokens of sequence s, KV head kh, over the keys its last token sees
  // (each token's own causal / window limit a mask over the span): the span's rows read once for all of them
  constexpr int64_t kQueryBlock = 16;
  struct Task {
    int64_t s, kh, t0, t1, lo, hi;
  };
  std::vector<Task> tasks;
  std::vector<double> cost(1, 0.0);
  for (int64_t s = 0; s < B; ++s) {
    const int64_t first_pos = lp[s] - (cp[s + 1] - cp[s]);  // position of the sequence's first new token
    for (int64_t t0 = cp[s]; t0 < cp[s + 1]; t0 += kQueryBlock) {
      const int64_t t1 = std::min(t0 + kQueryBlock, cp[s + 1]);
      const int64_t lo = first_visible(first_pos + (t0 - cp[s]) + 1, window), hi = first_pos + (t1 - cp[s]);
      for (int64_t kh = 0; kh < KVH; ++kh) {
        tasks.push_back({s, kh, t0, t1, lo, hi});
        cost.push_back(cost.back() + static_cast<double>(hi - lo) * ((t1 - t0) * G + kRowCost));
      }
    }
  }
  const int threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t i0, int64_t i1) {
    AttendScratch scratch;
    std::vector<float> o;
    for (int64_t i = i0; i < i1; ++i) {
      const auto [a, b] = cost_range(cost, static_cast<int>(i), threads);
      for (int64_t j = a; j < b; ++j) {
        const Task& k = tasks[j];
        const int64_t nq = k.t1 - k.t0, R = nq * G, pos0 = k.hi - nq;  // pos0: the block's first token's position
        if (static_cast<int64_t>(scratch.q.size()) < R * D) scratch.q.resize(R * D);
        if (static_cast<int64_t>(o.size()) < R * D) o.resize(R * D);
        for (int64_t t = 0; t < nq; ++t)
          std::memcpy(scratch.q.data() + t * G * D, qp + ((k.t0 + t) * H + k.kh * G) * D, G * D * sizeof(float));
        // row r: token r / G at pos0 + r / G sees keys [first_visible(pos + 1, window), pos] of the span [lo, hi)
        auto visible = [&](int64_t r) {
          const int64_t pos = pos0 + r / G;
          return std::pair<int64_t, int64_t>{first_visible(pos + 1, window) - k.lo, pos + 1 - k.lo};
        };
        auto attend = [&](auto t) {
          using E = decltype(t);
          attend_span<E>(pg, scratch.q.data(), R, k_cache.data_ptr(), v_cache.data_ptr(), k.s, k.kh, k.lo, k.hi, sc,
                         o.data(), nullptr, scratch, visible);
        };
        if (pg.bf16)
          attend(bf16{});
        else
          attend(float{});
        for (int64_t t = 0; t < nq; ++t)
          std::memcpy(op + ((k.t0 + t) * H + k.kh * G) * D, o.data() + t * G * D, G * D * sizeof(float));
      }
    }
  });
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
