// The small per-layer kernels of a decode step, float32: RMSNorm (fused with the residual add), RoPE,
// the KV store and the SwiGLU activation. Each is one pass over a few kilobytes, so what they save is
// the per-op cost of the torch reference (several ATen ops, allocations and dispatches each); they run
// on one thread unless the input is prefill-sized.
#include "ops.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <cmath>

SOT_NAMESPACE_BEGIN

std::string simd_name() { return SOT_SIMD; }
namespace {

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), what, ": float32 CPU tensors only");
}

// rows per task: >= ~64 KiB of data, so a decode step's few rows stay on the calling thread
int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, (int64_t{16} << 10) / std::max<int64_t>(1, row_elems)); }

}  // namespace

// y = w * (x * rsqrt(mean(x^2) + eps)): the reference's order of roundings
void norm_row(const float* x, const float* w, float* y, int64_t n, float eps) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

void rope_head(const float* x, const float* c, const float* s, float* o, int64_t half) {
  const float* x2 = x + half;
  for (int64_t i = 0; i < half; ++i) {
    o[i] = x[i] * c[i] - x2[i] * s[i];
    o[half + i] = x2[i] * c[i] + x[i] * s[i];
  }
}

void silu_mul_row(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
#if defined(SOT_SIMD_VECTOR)
  for (; i + kLanes <= n; i += kLanes) {
    const vf gv = vload(g + i);
    const vf sv = vdiv(gv, vadd(vset1(1.f), vexp(vsub(vzero(), gv))));
    vstore(o + i, vmul(sv, vload(u + i)));
  }
#endif
  for (; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  RECORD_FUNCTION("sot_cpp::rms_norm", std::vector<c10::IValue>());
  check_f32(x, "rms_norm");
  check_f32(weight, "rms_norm");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "rms_norm: weight [hidden] for x [..., hidden]");
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  auto out = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, xc.numel() / std::max<int64_t>(n, 1), grain_rows(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * n, wp, op + r * n, n, e);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  RECORD_FUNCTION("sot_cpp::add_rms_norm", std::vector<c10::IValue>());
  check_f32(x, "add_rms_norm");
  check_f32(residual, "add_rms_norm");
  check_f32(weight, "add_rms_norm");
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm: x and residual shapes differ");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "add_rms_norm: weight [hidden] for x [..., hidden]");
  const auto xc = x.contiguous();
  const auto rc = residual.contiguous();
  const auto wc = weight.contiguous();
  auto out = at::empty_like(xc);
  auto sum = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* rp = rc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, xc.numel() / std::max<int64_t>(n, 1), grain_rows(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* s = sp + r * n;
      for (int64_t i = 0; i < n; ++i) s[i] = xp[r * n + i] + rp[r * n + i];
      norm_row(s, wp, op + r * n, n, e);
    }
  });
  return {out, sum};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  RECORD_FUNCTION("sot_cpp::apply_rope", std::vector<c10::IValue>());
  check_f32(x, "apply_rope");
  check_f32(cos, "apply_rope");
  check_f32(sin, "apply_rope");
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "apply_rope: x [T, H, D] with D even");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.size(1) == half && sin.sizes() == cos.sizes(),
              "apply_rope: cos and sin [T, D/2]");
  const auto xc = x.stride(2) == 1 ? x : x.contiguous();  // q/k heads: a strided view of the fused qkv
  const auto cc = cos.contiguous();
  const auto sc = sin.contiguous();
  auto out = at::empty({T, H, D}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* cp = cc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t st = xc.stride(0), sh = xc.stride(1);
  at::parallel_for(0, T, grain_rows(H * D), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cp + t * half;
      const float* s = sp + t * half;
      for (int64_t h = 0; h < H; ++h) rope_head(xp + t * st + h * sh, c, s, op + (t * H + h) * D, half);
    }
  });
  return out;
}

void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  RECORD_FUNCTION("sot_cpp::store_kv", std::vector<c10::IValue>());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k, &v, &k_cache, &v_cache})
    check_f32(*t, "store_kv");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "store_kv: k, v [T, kv_heads, D]; caches [blocks, block_size, kv_heads, D]");
  TORCH_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), "store_kv: head shapes differ");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "store_kv: contiguous pools");
  const int64_t T = k.size(0), row = k.size(1) * k.size(2), slots = k_cache.size(0) * k_cache.size(1);
  const auto slot = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slot.dim() == 1 && slot.size(0) == T, "store_kv: slot_mapping [T]");
  const int64_t* sp = slot.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < slots, "store_kv: slot out of range");
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (const auto& [src_t, dst] : {std::pair{&k, kc}, std::pair{&v, vc}}) {
    // a token's [kv_heads, D] must be one contiguous run; the q/k/v views of the fused matmul output are
    const auto src = src_t->stride(2) == 1 && src_t->stride(1) == src_t->size(2) ? *src_t : src_t->contiguous();
    const float* p = src.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) std::memcpy(dst + sp[t] * row, p + t * src.stride(0), row * sizeof(float));
  }
}

at::Tensor silu_mul(const at::Tensor& x) {
  RECORD_FUNCTION("sot_cpp::silu_mul", std::vector<c10::IValue>());
  check_f32(x, "silu_mul");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "silu_mul: x [T, 2F] (gate then up)");
  const auto xc = x.contiguous();
  const int64_t T = xc.size(0), F = xc.size(1) / 2;
  auto out = at::empty({T, F}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, grain_rows(2 * F), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* g = xp + t * 2 * F;
      const float* u = g + F;
      float* o = op + t * F;
      silu_mul_row(g, u, o, F);
    }
  });
  return out;
}

SOT_NAMESPACE_END
