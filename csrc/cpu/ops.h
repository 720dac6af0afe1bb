// The C++ CPU kernels bound as `kernels._cpp` (bindings.cpp); each mirrors a function of
// kernels/reference.py (same arguments, same result up to fp32 rounding) for float32 activations.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace sot_cpu {

// linear.cpp: out = x @ w^T for w float32, bfloat16, or int8 with scale [N, G] float32 (a scale per K / G weights)
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale);
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale);
bool linear_kernel_applies(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale);
int64_t linear_max_rows();
int64_t linear_min_rows(at::ScalarType weight_dtype);

// attention.cpp
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  std::optional<int64_t> max_context_len);
// the decode half of a layer's attention in one call: RoPE on the q and k heads of the fused qkv [B, (H + 2 KVH) * D],
// k and v stored at their slots, then paged decode attention -> [B, H * D]
at::Tensor rope_store_decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                       at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                       const at::Tensor& block_tables, const at::Tensor& context_lens, double scale);

// elementwise.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);
at::Tensor silu_mul(const at::Tensor& x);
// one head: o[i] = x1 c - x2 s, o[half + i] = x2 c + x1 s with x1 = x[0:half], x2 = x[half:2 half]
void rope_head(const float* x, const float* c, const float* s, float* o, int64_t half);

}  // namespace sot_cpu
