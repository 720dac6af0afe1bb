// Paged decode attention, float32: one query per sequence over its paged context, the contract of
// kernels.reference.paged_decode_attention. A task is one (sequence, KV head) and its G query heads
// (GQA): the addresses of the context's K and V rows are listed once, then the scores of all G
// heads (each K row read once from memory), one softmax per head, and per head the weighted sum of
// the V rows in registers (V rows come from memory for the first head, from cache for the others).
#include "ops.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace sot_cpu {
namespace {

#if defined(SOT_SIMD_VECTOR)
// out[0:NV*kLanes] = c * sum_p w[p] * (rows[p] + d0)[0:NV*kLanes], the NV accumulators in registers
template <int NV>
inline void weighted_chunk(float* out, const float* w, const float* const* rows, int64_t n, int64_t d0, float c) {
  vf acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = vzero();
  for (int64_t p = 0; p < n; ++p) {
    const vf wp = vset1(w[p]);
    const float* r = rows[p] + d0;
    for (int i = 0; i < NV; ++i) acc[i] = vfma(wp, vload(r + i * kLanes), acc[i]);
  }
  for (int i = 0; i < NV; ++i) vstore(out + d0 + i * kLanes, vmul(acc[i], vset1(c)));
}
#endif

// out[0:D] = c * sum_p w[p] * rows[p][0:D]
void weighted_rows(float* out, const float* w, const float* const* rows, int64_t n, int64_t D, float c) {
  int64_t d0 = 0;
#if defined(SOT_SIMD_VECTOR)
  for (; d0 + 4 * kLanes <= D; d0 += 4 * kLanes) weighted_chunk<4>(out, w, rows, n, d0, c);
  switch ((D - d0) / kLanes) {
    case 3: weighted_chunk<3>(out, w, rows, n, d0, c); break;
    case 2: weighted_chunk<2>(out, w, rows, n, d0, c); break;
    case 1: weighted_chunk<1>(out, w, rows, n, d0, c); break;
    default: break;
  }
  d0 += (D - d0) / kLanes * kLanes;
#endif
  for (; d0 < D; ++d0) {
    float a = 0.f;
    for (int64_t p = 0; p < n; ++p) a += w[p] * rows[p][d0];
    out[d0] = a * c;
  }
}

}  // namespace

Paged check_paged(const char* what, int64_t B, int64_t H, int64_t D, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& context_lens) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), what,
              ": caches [blocks, block_size, kv_heads, D]");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
                  k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              what, " (C++): float32 CPU tensors only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), what, ": contiguous pools");
  Paged p{B, H, D, k_cache.size(1), k_cache.size(2), 0, 0};
  TORCH_CHECK(k_cache.size(3) == D && p.KVH > 0 && H % p.KVH == 0, what, ": head shapes");
  p.G = H / p.KVH;
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

void attend_task(const Paged& pg, const float* qp, const float* kp, const float* vp, float* op, float sc, int64_t t,
                 AttendScratch& scratch) {
  const int64_t H = pg.H, D = pg.D, BS = pg.BS, KVH = pg.KVH, G = pg.G, max_blocks = pg.max_blocks;
  const int64_t* tp = pg.tables.data_ptr<int64_t>();
  const int64_t s = t / KVH, kh = t % KVH, ctx = pg.lens.data_ptr<int64_t>()[s];
  if (static_cast<int64_t>(scratch.krows.size()) < ctx) {
    scratch.krows.resize(ctx);
    scratch.vrows.resize(ctx);
  }
  if (static_cast<int64_t>(scratch.scores.size()) < G * ctx) scratch.scores.resize(G * ctx);
  const float** krows = scratch.krows.data();
  const float** vrows = scratch.vrows.data();
  float* scores = scratch.scores.data();
  const float* qg = qp + (s * H + kh * G) * D;  // G consecutive query heads
  float* og = op + (s * H + kh * G) * D;
  for (int64_t p0 = 0; p0 < ctx; p0 += BS) {  // the context's rows, block by block
    const int64_t base = (tp[s * max_blocks + p0 / BS] * BS * KVH + kh) * D;
    for (int64_t r = 0; r < std::min(BS, ctx - p0); ++r) {
      krows[p0 + r] = kp + base + r * KVH * D;
      vrows[p0 + r] = vp + base + r * KVH * D;
    }
  }
  for (int64_t p = 0; p < ctx; ++p)
    for (int64_t g = 0; g < G; ++g) scores[g * ctx + p] = dot(qg + g * D, krows[p], D) * sc;
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * ctx;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < ctx; ++p) mx = std::max(mx, sg[p]);
    const float sum = exp_shift_sum(sg, ctx, mx);
    weighted_rows(og + g * D, sg, vrows, ctx, D, sum > 0.f ? 1.f / sum : 0.f);  // ctx == 0: zeros
  }
}

void rope_store_task(const Paged& pg, const float* qkv, int64_t ldqkv, const float* cos, const float* sin,
                     const int64_t* slots, float* q, float* k_cache, float* v_cache, int64_t s, int64_t kh) {
  const int64_t H = pg.H, KVH = pg.KVH, D = pg.D, G = pg.G, half = D / 2;
  const float* row = qkv + s * ldqkv;
  const float* c = cos + s * half;
  const float* sn = sin + s * half;
  for (int64_t h = kh * G; h < (kh + 1) * G; ++h) rope_head(row + h * D, c, sn, q + (s * H + h) * D, half);
  rope_head(row + (H + kh) * D, c, sn, k_cache + (slots[s] * KVH + kh) * D, half);
  std::memcpy(v_cache + (slots[s] * KVH + kh) * D, row + (H + KVH + kh) * D, D * sizeof(float));
}

namespace {

// out [B, H, D] = attention of q [B, H, D] (contiguous) over the paged context
void attend(const Paged& pg, const float* qp, const float* kp, const float* vp, float* op, float sc) {
  // one thread unless there are >= ~64 KiB of K/V rows to read per task on average
  const int64_t tasks = pg.B * pg.KVH;
  const int64_t bytes_per_task = std::max<int64_t>(1, pg.total * pg.D * 8 / std::max<int64_t>(1, pg.B));
  const int64_t grain = std::max<int64_t>(1, (int64_t{64} << 10) / bytes_per_task);
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    AttendScratch scratch;
    for (int64_t t = t0; t < t1; ++t) attend_task(pg, qp, kp, vp, op, sc, t, scratch);
  });
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  std::optional<int64_t> max_context_len) {
  RECORD_FUNCTION("sot_cpp::paged_decode_attention", std::vector<c10::IValue>());
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.device().is_cpu(),
              "paged_decode_attention: q [B, H, D] float32 CPU");
  (void)max_context_len;  // lengths are read on the host here anyway
  const Paged pg = check_paged("paged_decode_attention", q.size(0), q.size(1), q.size(2), k_cache, v_cache,
                               block_tables, context_lens);
  const auto qc = q.contiguous();
  auto out = at::empty_like(qc);
  attend(pg, qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), out.data_ptr<float>(),
         static_cast<float>(scale));
  return out;
}

at::Tensor rope_store_decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                       at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                       const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
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
  for (int64_t t = 0; t < B; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < slots, "rope_store_decode_attention: slot out of range");
  const auto x = qkv.stride(1) == 1 ? qkv : qkv.contiguous();
  const auto cc = cos.contiguous();
  const auto sc = sin.contiguous();
  auto q = at::empty({B, H, D}, x.options());
  float* qp = q.data_ptr<float>();
  float* kp = k_cache.data_ptr<float>();
  float* vp = v_cache.data_ptr<float>();
  for (int64_t t = 0; t < B; ++t)  // a few kilobytes: RoPE into q and the K slot, V copied to its slot
    for (int64_t kh = 0; kh < KVH; ++kh)
      rope_store_task(pg, x.data_ptr<float>(), x.stride(0), cc.data_ptr<float>(), sc.data_ptr<float>(), sp, qp, kp, vp,
                      t, kh);
  auto out = at::empty({B, H * D}, x.options());
  attend(pg, qp, kp, vp, out.data_ptr<float>(), static_cast<float>(scale));
  return out;
}

}  // namespace sot_cpu
