// A decode step's whole layer loop in one call: per layer RMSNorm, the qkv matmul, RoPE + KV store + paged
// attention, the o matmul, add + RMSNorm, gate/up with SwiGLU, the down matmul; the final norm at the end.
//
// Why: called op by op from Python, the ~10 calls a layer cost their dispatch, allocations and a fork/join
// of the thread pool each, a third of a SmolLM2 step on 2 cores. Here the threads enter one OpenMP region
// per step and meet at a barrier after each phase whose output every thread reads (5 a layer; 7 where attention
// runs in parts, attention.cpp's plan_attention). The small
// per-row work is split or duplicated so that no phase needs more: every thread keeps its own copy of the
// residual stream and normalizes it itself (a few KiB); each matmul is split by weight rows, SwiGLU rides
// with its gate/up slice, RoPE + store + attention is split by (sequence, KV head). Same arithmetic as
// the single kernels (linear_part, rope_store_task, attend_task, norm_row), so results match them.
#include "ops.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <chrono>

#ifdef _OPENMP
#include <omp.h>
#endif

SOT_NAMESPACE_BEGIN
namespace {

void check_f32_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.device().is_cpu(),
              "DecodeLayers: ", what, " must be a contiguous float32 CPU vector of ", n);
}

// rows [a, b) of w as their own matrix
WeightView rows(const WeightView& w, int64_t a, int64_t b) {
  WeightView r = w;
  r.data = static_cast<const char*>(w.data) + a * w.row_bytes();
  r.scale = w.scale ? w.scale + a * w.scale_row() : nullptr;
  r.hscale = w.hscale ? w.hscale + a * w.scale_row() : nullptr;
  r.N = b - a;
  return r;
}

void grow(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

inline void barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}


}  // namespace

DecodeLayers::DecodeLayers(std::vector<at::Tensor> ln1, std::vector<at::Tensor> ln2, std::vector<at::Tensor> mats,
                           std::vector<std::optional<at::Tensor>> scales, at::Tensor final_norm,
                           std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, int64_t num_heads,
                           double eps, double scale, bool bf16_act, std::vector<int64_t> windows, bool int8_act)
    : windows_(std::move(windows)), eps_(static_cast<float>(eps)), scale_(static_cast<float>(scale)) {
  const size_t L = ln1.size();
  TORCH_CHECK(L > 0 && ln2.size() == L && mats.size() == 4 * L && scales.size() == 4 * L && k_caches.size() == L &&
                  v_caches.size() == L,
              "DecodeLayers: per layer 2 norms, 4 matrices (+ 4 scales), a K and a V pool");
  if (windows_.empty()) windows_.assign(L, 0);
  TORCH_CHECK(windows_.size() == L, "DecodeLayers: one window per layer");
  for (int64_t w : windows_) TORCH_CHECK(w >= 0, "DecodeLayers: windows >= 0 (0: the whole context)");
  k0_ = k_caches[0];
  v0_ = v_caches[0];
  TORCH_CHECK(k0_.dim() == 4 && (k0_.scalar_type() == at::kFloat || k0_.scalar_type() == at::kBFloat16),
              "DecodeLayers: float32 or bfloat16 pools [blocks, bs, kvh, D]");
  H_ = num_heads, KVH_ = k0_.size(2), D_ = k0_.size(3), hidden_ = final_norm.size(0);
  TORCH_CHECK(H_ > 0 && H_ % KVH_ == 0 && D_ % 2 == 0, "DecodeLayers: head shapes");
  check_f32_vector(final_norm, hidden_, "the final norm");
  final_norm_ = final_norm.data_ptr<float>();
  keep_.push_back(final_norm);
  for (size_t l = 0; l < L; ++l) {
    check_f32_vector(ln1[l], hidden_, "a norm weight");
    check_f32_vector(ln2[l], hidden_, "a norm weight");
    for (auto* c : {&k_caches[l], &v_caches[l]})
      TORCH_CHECK(c->sizes() == k0_.sizes() && c->scalar_type() == k0_.scalar_type() && c->is_contiguous() &&
                      c->device().is_cpu(),
                  "DecodeLayers: every layer's pools alike, contiguous, one dtype, CPU");
    WeightView w[4];
    for (int i = 0; i < 4; ++i) {
      w[i] = weight_view(mats[4 * l + i], scales[4 * l + i]);
      TORCH_CHECK(!bf16_act || w[i].dtype == at::kBFloat16, "DecodeLayers: bf16 precision needs bfloat16 matrices");
      w[i].bf16_act = bf16_act;
      // 4-bit matrices are at int8 precision always, int8 ones when int8_act (any mix: the GGUF's own types)
      TORCH_CHECK(!int8_act || w[i].dtype == at::kByte || w[i].packed ||
                      (w[i].dtype == at::kChar && w[i].K % 32 == 0 && (w[i].K == 32 * w[i].G || w[i].K == 16 * w[i].G)),
                  "DecodeLayers: int8 precision needs int8 matrices with a scale per 32 (or 16) weights, or 4-bit ones");
      w[i].int8_act = w[i].int8_act || int8_act;
      keep_.push_back(mats[4 * l + i]);
      if (scales[4 * l + i]) keep_.push_back(*scales[4 * l + i]);
    }
    if (l == 0) F_ = w[2].N / 2;
    TORCH_CHECK(F_ % w[2].row_unit() == 0, "DecodeLayers: packed gate/up matrices need a multiple of 8 rows each");
    TORCH_CHECK(w[0].K == hidden_ && w[0].N == (H_ + 2 * KVH_) * D_ && w[1].K == H_ * D_ && w[1].N == hidden_ &&
                    w[2].K == hidden_ && w[2].N == 2 * F_ && w[3].K == F_ && w[3].N == hidden_,
                "DecodeLayers: layer ", l, ": matrix shapes do not fit the model");
    layers_.push_back({ln1[l].data_ptr<float>(), ln2[l].data_ptr<float>(), w[0], w[1], rows(w[2], 0, F_),
                       rows(w[2], F_, 2 * F_), w[3]});
    keep_.insert(keep_.end(), {ln1[l], ln2[l], k_caches[l], v_caches[l]});
    k_.push_back(k_caches[l].data_ptr());
    v_.push_back(v_caches[l].data_ptr());
  }
}

at::Tensor DecodeLayers::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                 const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens) {
  RECORD_FUNCTION("sot_cpp::decode_layers", std::vector<c10::IValue>());
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t B = x.size(0), half = D_ / 2, nqkv = (H_ + 2 * KVH_) * D_;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden_ && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.device().is_cpu() && B > 0,
              "DecodeLayers: x [B, hidden] contiguous float32 CPU");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == half && t->scalar_type() == at::kFloat &&
                    t->is_contiguous(),
                "DecodeLayers: cos and sin [B, D/2] contiguous float32");
  const Paged pg = check_paged("DecodeLayers", B, H_, D_, k0_, v0_, block_tables, context_lens);
  const auto slot = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slot.dim() == 1 && slot.size(0) == B, "DecodeLayers: slot_mapping [B]");
  const int64_t* sp = slot.data_ptr<int64_t>();
  for (int64_t t = 0; t < B; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < k0_.size(0) * k0_.size(1), "DecodeLayers: slot out of range");

  grow(qkv_, B * nqkv), grow(q_, B * H_ * D_), grow(o_, B * H_ * D_), grow(x_, B * hidden_), grow(act_, B * F_);
  const int nt = std::max(1, at::get_num_threads());
  if (static_cast<int>(scratch_.size()) < nt) scratch_.resize(nt);
  auto out = at::empty({B, hidden_}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  float *qkv = qkv_.data(), *q = q_.data(), *o = o_.data(), *xs = x_.data(), *act = act_.data();
  float* outp = out.data_ptr<float>();
  const int64_t tasks = B * KVH_;
  // shared prefixes and long contexts: parts, then a merge (window-0 layers; a sliding window keeps the tasks)
  const AttnPlan plan = plan_attention(pg, nt);
  if (plan.active) grow(part_o_, plan.num_slots * H_ / KVH_ * D_), grow(part_lse_, plan.num_slots * H_ / KVH_);
  float *part_o = part_o_.data(), *part_lse = part_lse_.data();
  double matmul = 0.0, attention = 0.0;
  using clock = std::chrono::steady_clock;

#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), parts = omp_get_num_threads();
#else
    const int tid = 0, parts = 1;
#endif
    ThreadScratch& ts = scratch_[tid];
    grow(ts.h, B * hidden_), grow(ts.y, B * hidden_);
    const auto [fa, fb] = share(F_, tid, parts, 16);
    grow(ts.g, B * std::max<int64_t>(1, fb - fa)), grow(ts.u, B * std::max<int64_t>(1, fb - fa));
    float *h = ts.h.data(), *y = ts.y.data();
    const auto [ta, tb] = share(tasks, tid, parts);
    const auto [pa, pb] = plan.active ? plan.range(tid, parts) : std::pair<int64_t, int64_t>{0, 0};
    clock::time_point t0;
    // the residual stream (private copy) += the last matmul's output, then y = its norm
    auto add_norm = [&](const float* add, const float* w) {
      for (int64_t m = 0; m < B; ++m) {
        float* hm = h + m * hidden_;
        if (add)
          for (int64_t i = 0; i < hidden_; ++i) hm[i] += add[m * hidden_ + i];
        norm_row(hm, w, y + m * hidden_, hidden_, eps_);
      }
    };
    auto matmul_begin = [&] {
      if (tid == 0) t0 = clock::now();
    };
    auto matmul_end = [&] {
      barrier();
      if (tid == 0) matmul += std::chrono::duration<double>(clock::now() - t0).count();
    };
    std::copy(xp, xp + B * hidden_, h);
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      add_norm(l == 0 ? nullptr : xs, L.ln1);
      const bool parted = plan.active && windows_[l] == 0;
      if (parted && pa < pb)  // streams in while the qkv matmul computes
        prefetch_part(pg, plan, pa, k_[l], v_[l]);
      else if (!parted && ta < tb)
        prefetch_task(pg, k_[l], v_[l], ta, windows_[l]);
      matmul_begin();
      linear_part(y, hidden_, L.qkv, qkv, nqkv, B, tid, parts);
      matmul_end();
      if (tid == 0) t0 = clock::now();
      if (parted) {  // a part reads other sequences' queries and rows: every RoPE + store first, the merge last
        for (int64_t t = ta; t < tb; ++t)
          rope_store_task(pg, qkv, nqkv, cp, snp, sp, q, k_[l], v_[l], t / KVH_, t % KVH_);
        barrier();
        for (int64_t p = pa; p < pb; ++p) {
          if (p + 1 < pb) prefetch_part(pg, plan, p + 1, k_[l], v_[l]);
          attend_part(pg, plan, p, q, k_[l], v_[l], scale_, part_o, part_lse, ts.attn);
        }
        barrier();
        for (int64_t t = ta; t < tb; ++t) merge_task(pg, plan, t, part_o, part_lse, o);
      } else {
        // a task's RoPE + store writes only what its own attention reads (its query heads, its sequence's slot of
        // its KV head: the last block, never shared), so one thread does both with no barrier between them
        for (int64_t t = ta; t < tb; ++t) {
          if (t + 1 < tb) prefetch_task(pg, k_[l], v_[l], t + 1, windows_[l]);  // the next task's rows, meanwhile
          rope_store_task(pg, qkv, nqkv, cp, snp, sp, q, k_[l], v_[l], t / KVH_, t % KVH_);
          attend_task(pg, q, k_[l], v_[l], o, scale_, t, ts.attn, windows_[l]);
        }
      }
      barrier();
      if (tid == 0) attention += std::chrono::duration<double>(clock::now() - t0).count();
      matmul_begin();
      linear_part(o, H_ * D_, L.o, xs, hidden_, B, tid, parts);
      matmul_end();
      add_norm(xs, L.ln2);
      matmul_begin();
      if (fb > fa) {  // this thread's slice of the gate and up rows, then SwiGLU on it
        const int64_t n = fb - fa;
        linear_part(y, hidden_, rows(L.gate, fa, fb), ts.g.data(), n, B, 0, 1);
        linear_part(y, hidden_, rows(L.up, fa, fb), ts.u.data(), n, B, 0, 1);
        for (int64_t m = 0; m < B; ++m) silu_mul_row(ts.g.data() + m * n, ts.u.data() + m * n, act + m * F_ + fa, n);
      }
      matmul_end();
      matmul_begin();
      linear_part(act, F_, L.down, xs, hidden_, B, tid, parts);
      matmul_end();
    }
    if (tid == 0) {
      for (int64_t i = 0; i < B * hidden_; ++i) h[i] += xs[i];
      for (int64_t m = 0; m < B; ++m) norm_row(h + m * hidden_, final_norm_, outp + m * hidden_, hidden_, eps_);
    }
  }
  matmul_seconds += matmul;
  attention_seconds += attention;
  return out;
}

SOT_NAMESPACE_END
