// The C++ CPU kernels bound as `sot_engine.kernels._cpp` (bindings.h); each mirrors a function of
// sot_engine/kernels/reference.py (same arguments, same result up to fp32 rounding) for float32 activations.
// Declares one variant's namespace (target.h): module.cpp includes it once per variant (#undef SOT_OPS_H between).
#ifndef SOT_OPS_H
#define SOT_OPS_H

#include "target.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <mutex>
#include <vector>

SOT_NAMESPACE_BEGIN

// [a, b) of n items for part `part` of `parts`, in units of `unit` items (the last unit may be short)
inline std::pair<int64_t, int64_t> share(int64_t n, int part, int parts, int64_t unit = 1) {
  const int64_t units = (n + unit - 1) / unit;
  return {std::min(n, unit * (units * part / parts)), std::min(n, unit * (units * (part + 1) / parts))};
}

// linear.cpp: out = x @ w^T for w float32, bfloat16, or int8 with scale [N, G] float32 (a scale per K / G weights)
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale);
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale);
bool linear_kernel_applies(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale);
int64_t linear_max_rows();

// attention.cpp
// causal attention of the packed new tokens q [T, H, D] of each sequence over its paged context (cu_seqlens_q [B + 1])
at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q,
                                   const at::Tensor& context_lens, double scale, int64_t window);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  std::optional<int64_t> max_context_len, int64_t window = 0);
// the decode half of a layer's attention in one call: RoPE on the q and k heads of the fused qkv [B, (H + 2 KVH) * D],
// k and v stored at their slots, then paged decode attention -> [B, H * D]
at::Tensor rope_store_decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                       at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                       const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                       int64_t window = 0);

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
// y = w * (x * rsqrt(mean(x^2) + eps)) for one row of n
void norm_row(const float* x, const float* w, float* y, int64_t n, float eps);

// silu(g) * u over n elements (silu(g) = g / (1 + e^-g), as torch computes it)
void silu_mul_row(const float* g, const float* u, float* o, int64_t n);

// ---- building blocks the fused decode loop (decode.cpp) shares with the kernels above

// A weight matrix as the linear kernel reads it (checked by weight_view: contiguous, a supported storage)
struct WeightView {
  const void* data;
  at::ScalarType dtype;  // float32, bfloat16, int8, or uint8: 4-bit values, two a byte (linear_int8.cpp)
  const float* scale;  // int8: [N, G]; 4-bit: [N, 2, G] (the scales, then the mins); else nullptr
  int64_t G, N, K;
  bool bf16_act = false;  // bfloat16 weights at bf16 precision: x rounded to bf16 too (linear_bf16.cpp)
  bool int8_act = false;  // int8 or 4-bit weights at int8 precision: x quantized too (linear_int8.cpp)
  // packed (int8 precision only): blocks of 8 rows interleaved 4 bytes at a time, data [N / 8, K / 32, 8 * 32 (int8)
  // or 8 * 16 (4-bit) bytes], scale [N / 8, K / 32, S, 8] (linear_int8.cpp); G is then K / 32
  bool packed = false;
  int64_t S = 1;
  // packed with float16 scales and mins / weight sums (what a Q4_0 / Q4_1 / Q8_0 file holds): hscale instead of
  // scale, same shape
  const uint16_t* hscale = nullptr;
  int64_t row_bytes() const { return dtype == at::kByte ? K / 2 : K * int64_t(c10::elementSize(dtype)); }
  // floats of scale per weight row (a packed block's 8 rows at 8 times it)
  int64_t scale_row() const { return packed ? S * G : (dtype == at::kByte ? 2 * G : G); }
  int64_t row_unit() const { return packed ? 8 : 1; }  // a row range must start and end on a multiple of it
};
WeightView weight_view(const at::Tensor& w, const std::optional<at::Tensor>& scale);
// out[m, n] (rows ldo apart) = x[m] . w[n] for the calling thread's share `part` of `parts` of the N outputs
void linear_part(const float* x, int64_t ldx, const WeightView& w, float* out, int64_t ldo, int64_t M, int part,
                 int parts);

// simd.h's vector width for this variant: "avx512f", "avx2+fma" or "scalar" (elementwise.cpp)
std::string simd_name();

// linear_bf16.cpp: out = bf16(x) @ w^T for bfloat16 w, the products exact, the sums float32; on AMX where
// compiled for it and the OS grants the tile state (amx_ready), else the float32 kernel on the rounded x.
bool amx_compiled();  // built for AMX-BF16 (the amx variant, or -march=native on such a CPU)
bool amx_ready();     // ... and the OS granted the tile state (SOT_NO_AMX=1: never)
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, bool amx);
// linear_int8.cpp: out = x @ w^T at int8 precision for int8 w with a scale per 32 weights of a row: x quantized per
// 32 of a row (scale amax / 127), integer dot products (AVX2 or AVX-512 VNNI, chosen at run time), float32 scales
// int8 w may have a scale per 16 instead (GGUF's Q6_K)
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale);
// ... for 4-bit w [N, K / 2] uint8 (byte b of a 32-group: weight b in the low nibble, b + 16 in the high one) with
// scale_min [N, 2, K / 32] float32: w = scale * nibble + min
at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale_min);
// (values int8, scales, scales times the group's sum of values)
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8_activations(const at::Tensor& x);
// out[:, n0 : n1] at int8 precision (w.int8_act: int8 or 4-bit w)
void linear_int8_rows(const float* x, int64_t ldx, const WeightView& w, float* out, int64_t ldo, int64_t M,
                      int64_t n0, int64_t n1);
std::string int8_isa();  // the instruction set the int8 kernel runs on: "avx512vnni", "avx2" or "scalar"
std::string set_int8_isa(const std::string& name);  // force one this CPU has (or "auto"); returns the previous
// out[:, n0 : n1] of it (n0 a multiple of 16 for the AMX path)
void linear_bf16_rows(const float* x, int64_t ldx, const WeightView& w, float* out, int64_t ldo, int64_t M, int64_t n0,
                      int64_t n1, bool amx);

// Checked views of the pools and the batch's block tables / context lengths (attention.cpp)
struct Paged {
  int64_t B, H, D, BS, KVH, G, max_blocks, total = 0;  // total: context tokens of the batch
  bool bf16 = false;  // the pools hold bfloat16 (else float32)
  at::Tensor tables, lens;  // int64, contiguous
};
Paged check_paged(const char* what, int64_t B, int64_t H, int64_t D, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& context_lens);
// per-thread scratch of attend_task / attend_part, grown as contexts grow
struct AttendScratch {
  std::vector<const void*> krows, vrows;
  std::vector<float> scores, inv, q;
};
// RoPE of the q heads of KV group kh of row s of qkv [B, (H + 2 KVH) D] into q [B, H, D]; k head kh rotated into
// its slot of k_cache, v head kh copied into v_cache
void rope_store_task(const Paged& pg, const float* qkv, int64_t ldqkv, const float* cos, const float* sin,
                     const int64_t* slots, float* q, void* k_cache, void* v_cache, int64_t s, int64_t kh);
// task t's K/V rows of the context before the new token into L2 (the fused loop: the next task's while this one runs,
// its first task's while the qkv matmul does); SOT_NO_TASK_PREFETCH=1 turns it off (A/B runs)
void prefetch_task(const Paged& pg, const void* kp, const void* vp, int64_t t, int64_t window);
// attention of row s's query heads of KV group kh (task t = s * KVH + kh): q, out [B, H, D]; over the context's
// last `window` keys (0: all of it)
void attend_task(const Paged& pg, const float* q, const void* k_cache, const void* v_cache, float* out, float scale,
                 int64_t t, AttendScratch& scratch, int64_t window = 0);

// A decode batch's attention cut into parts where one task a (sequence, KV head) would read a shared prefix once per
// sequence, or leave threads idle (plan_attention). A part: rows [lo, hi) of sequence rep's context in KV head kh
// against the queries of sequences members[m0 .. m0 + nm): a prefix group's members over the blocks they all share
// (those K/V rows read once for all of them: cascade attention), or one sequence over a chunk of its own rows. It
// writes each member's normalized partial output and log-sum-exp (slots out .. out + nm - 1); merge_task combines
// a task's slots exactly (the merge of FlashInfer's cascade). Inactive where plain tasks do as well, and with
// SOT_NO_ATTN_PARTS set (A/B runs: benchmarks.attention_cpu).
struct AttnPart {
  int64_t rep, kh, lo, hi, m0, nm, out;
};
struct AttnPlan {
  bool active = false;
  std::vector<AttnPart> parts;
  std::vector<int64_t> members;  // sequences, a group's consecutive
  std::vector<double> cost;  // cumulative cost of parts [0, i): threads take contiguous runs of equal cost
  std::vector<int64_t> first, slots;  // task t's slots: slots[first[t] .. first[t + 1])
  int64_t num_slots = 0;
  // this thread's parts [a, b) of `threads`
  std::pair<int64_t, int64_t> range(int tid, int threads) const;
};
AttnPlan plan_attention(const Paged& pg, int threads);
// the plan's parts (rep, kh, lo, hi, members) for a batch's block tables; empty where inactive (tests, study)
std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, std::vector<int64_t>>> attention_plan(
    const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size, int64_t kv_heads,
    int64_t heads, int64_t threads);
// part p: its slots' outputs into part_o [slots, G, D] and log-sum-exps into part_lse [slots, G]
void attend_part(const Paged& pg, const AttnPlan& plan, int64_t p, const float* q, const void* k_cache,
                 const void* v_cache, float scale, float* part_o, float* part_lse, AttendScratch& scratch);
void prefetch_part(const Paged& pg, const AttnPlan& plan, int64_t p, const void* k_cache, const void* v_cache);
// task t's (s, kh) G heads of out [B, H, D] from its slots
void merge_task(const Paged& pg, const AttnPlan& plan, int64_t t, const float* part_o, const float* part_lse,
                float* out);


// decode.cpp: a decode step's whole layer loop in one call (bound as _cpp.DecodeLayers). Built once per model
// and KV pool; each call runs every layer of the batch's B <= linear_max_rows() rows in one OpenMP region.
class DecodeLayers {
 public:
  // per layer l: ln1[l], ln2[l]; mats[4 l .. 4 l + 3] = qkv, o, gate_up, down (scales[i]: int8 only);
  // k_caches[l], v_caches[l] the layer's pools; bf16_act: bfloat16 matrices at bf16 precision (linear_bf16.cpp);
  // windows[l]: layer l's sliding attention window (0: the whole context; empty: none anywhere)
  DecodeLayers(std::vector<at::Tensor> ln1, std::vector<at::Tensor> ln2, std::vector<at::Tensor> mats,
               std::vector<std::optional<at::Tensor>> scales, at::Tensor final_norm, std::vector<at::Tensor> k_caches,
               std::vector<at::Tensor> v_caches, int64_t num_heads, double eps, double scale, bool bf16_act = false,
               std::vector<int64_t> windows = {}, bool int8_act = false);
  // x [B, hidden] embeddings -> final-normed hidden states [B, hidden]; K/V of the new tokens stored
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slot_mapping,
                     const at::Tensor& block_tables, const at::Tensor& context_lens);
  double matmul_seconds = 0.0;  // wall time in the weight-matmul phases (each up to its barrier), summed over calls
  double attention_seconds = 0.0;  // the same for the RoPE + store + attention phases

 private:
  struct Layer {
    const float *ln1, *ln2;
    WeightView qkv, o, gate, up, down;
  };
  struct ThreadScratch {  // per thread: its own copy of the residual stream, normed rows, gate/up slices
    std::vector<float> h, y, g, u;
    AttendScratch attn;
  };
  std::vector<at::Tensor> keep_;  // owners of the memory the views point into
  std::vector<Layer> layers_;
  std::vector<void*> k_, v_;  // pools of pg.bf16 ? bfloat16 : float32
  std::vector<int64_t> windows_;  // per layer, 0: the whole context
  at::Tensor k0_, v0_;  // the first layer's pools, for shapes (all layers' are alike)
  const float* final_norm_;
  int64_t hidden_, H_, KVH_, D_, F_;
  float eps_, scale_;
  std::vector<float> qkv_, q_, o_, x_, act_, part_o_, part_lse_;  // shared between the threads, grown with B
  std::vector<ThreadScratch> scratch_;
  std::mutex mu_;  // one step at a time (the buffers are reused)
};

SOT_NAMESPACE_END

#endif  // SOT_OPS_H
