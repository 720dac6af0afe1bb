// Paged decode attention in CUDA (FlashDecoding / vLLM paged attention v2 style), for reading.
//
// Decode is one query token per sequence: the work is streaming each sequence's K/V rows from memory
// once, so the design is about bytes, not FLOPs.
//
// Grid: one thread block per (sequence, head chunk, partition).
//  - head chunk: HEADS query heads of one KV head (HEADS = the GQA group when it is <= 8). All of them
//    are computed from the same K/V registers, so each K/V byte is read once per group, not per head.
//  - partition (split-K): a sequence's context is cut into partitions of `partition_size` tokens so that
//    a small batch with long contexts still has enough blocks to fill the GPU; each block writes its
//    partition's normalized output and log-sum-exp, and a second kernel merges them exactly.
// Inside a block (128 threads): a K or V row (HEAD_DIM elements) is TPT threads x 16 bytes, so every
// thread does one 16-byte vector load per row and a warp reads whole rows, coalesced. The block's
// 128 / TPT "token slots" each walk their own tokens of the partition with a private online softmax
// (running max m, sum l, output accumulator, all fp32, per query head); the score q.k of a token is
// reduced over its TPT threads with warp shuffles. No __syncthreads in the main loop: the slots merge
// once at the end through shared memory (the same log-sum-exp merge as between partitions).
// Every thread keeps UNROLL tokens' K and V loads in flight before using the first one.
#include "paged_decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

namespace sot {
namespace {

constexpr int kWarpSize = 32;
constexpr int kNumThreads = 128;        // 4 warps; at HEADS = 8 (~250 registers a thread) 2 blocks fit an SM
constexpr int kMaxHeadsPerBlock = 8;    // q and the accumulators live in registers: 2 * HEADS * VEC floats
constexpr int kPartitionAlign = 64;     // partitions are whole block steps (a step is at most 64 tokens)
constexpr int kMinPartition = 256;      // below this a partition's fixed cost (q load, merge, reduce) dominates
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------ element types: 16 bytes <-> floats
template <typename T> struct Elem;
template <> struct Elem<float> {
  static constexpr int kVec = 4;  // elements per 16-byte vector
  __device__ static float to_float(float x) { return x; }
  __device__ static float from_float(float x) { return x; }
  __device__ static void unpack(const uint4& r, float* f) {
    f[0] = __uint_as_float(r.x); f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z); f[3] = __uint_as_float(r.w);
  }
};
template <> struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ static void unpack(const uint4& r, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 t = __half22float2(h[j]);
      f[2 * j] = t.x; f[2 * j + 1] = t.y;
    }
  }
};
template <> struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ static void unpack(const uint4& r, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 t = __bfloat1622float2(h[j]);
      f[2 * j] = t.x; f[2 * j + 1] = t.y;
    }
  }
};

// tokens each thread loads per step: more loads in flight for small head chunks, fewer registers for large
__host__ __device__ constexpr int unroll_for(int heads) { return heads <= 2 ? 4 : 2; }

// ------------------------------------------------------------------ kernel 1: one partition
template <typename T, int HEAD_DIM, int HEADS>
__global__ void __launch_bounds__(kNumThreads) paged_decode_partition_kernel(const PagedDecodeArgs a) {
  constexpr int VEC = Elem<T>::kVec;
  constexpr int TPT = HEAD_DIM / VEC;          // threads per token row, one 16-byte vector each
  constexpr int SLOTS = kNumThreads / TPT;     // tokens the block reads side by side
  constexpr int UNROLL = unroll_for(HEADS);
  constexpr int STEP = SLOTS * UNROLL;         // tokens per iteration of the block
  static_assert(TPT <= kWarpSize && kWarpSize % TPT == 0, "a token row must fit in one warp");
  static_assert(kPartitionAlign % STEP == 0, "partitions must be whole steps");

  const int seq = blockIdx.x;
  const int head0 = blockIdx.y * HEADS;                    // first query head of this block
  const int kv_head = head0 / (a.num_heads / a.num_kv_heads);
  const int part = blockIdx.z;
  const int ctx = a.context_lens[seq];
  // partitions split the window (the whole context without one): keys before it are never read
  const int start = (a.window > 0 ? max(ctx - a.window, 0) : 0) + part * a.partition_size;
  if (start >= ctx) return;  // a short sequence of a ragged batch: the reduce never reads this slot
  const int end = min(start + a.partition_size, ctx);

  const int slot = threadIdx.x / TPT;  // which token of each group of SLOTS consecutive tokens
  const int lane = threadIdx.x % TPT;  // which 16 bytes of the row

  // q slice in fp32, pre-scaled by scale * log2(e): the softmax then runs on exp2
  const T* q = static_cast<const T*>(a.q) + seq * a.q_stride_b + lane * VEC;
  float qf[HEADS][VEC];
#pragma unroll
  for (int h = 0; h < HEADS; ++h)
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      qf[h][i] = Elem<T>::to_float(q[(head0 + h) * a.q_stride_h + i]) * (a.scale * kLog2e);

  float m[HEADS], l[HEADS], acc[HEADS][VEC];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[h][i] = 0.f;
  }

  const int32_t* table = a.block_tables + seq * a.table_stride;
  const T* k_base = static_cast<const T*>(a.k_cache) + kv_head * a.k_stride_head + lane * VEC;
  const T* v_base = static_cast<const T*>(a.v_cache) + kv_head * a.v_stride_head + lane * VEC;

  for (int t0 = start; t0 < end; t0 += STEP) {
    // 1. the pages of this thread's UNROLL tokens (t0 + u * SLOTS + slot), then all their K/V loads
    bool valid[UNROLL];
    int64_t page[UNROLL];
    int row[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int tok = t0 + u * SLOTS + slot;
      valid[u] = tok < end;  // false for a suffix of u; a thread's tokens are never read past `end`
      page[u] = valid[u] ? __ldg(table + tok / a.block_size) : 0;
      row[u] = tok % a.block_size;
    }
    uint4 kr[UNROLL], vr[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      kr[u] = vr[u] = make_uint4(0, 0, 0, 0);  // zeros for invalid tokens: the pool may hold NaN there
      if (valid[u]) {
        kr[u] = __ldg(reinterpret_cast<const uint4*>(k_base + page[u] * a.k_stride_block + row[u] * a.k_stride_row));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(v_base + page[u] * a.v_stride_block + row[u] * a.v_stride_row));
      }
    }
    // 2. scores (log2 units): partial dots over this thread's 16 bytes, summed over the TPT lanes of the row.
    // Every lane runs the shuffles (invalid tokens too) so the full-warp mask is always right.
    float s[UNROLL][HEADS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float kf[VEC];
      Elem<T>::unpack(kr[u], kf);
#pragma unroll
      for (int h = 0; h < HEADS; ++h) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) dot = fmaf(qf[h][i], kf[i], dot);
#pragma unroll
        for (int mask = TPT / 2; mask > 0; mask /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, mask);
        s[u][h] = dot;
      }
    }
    // 3. online softmax, once per UNROLL tokens: rescale the running state to the new max, add the tokens
    if (!valid[0]) continue;  // this slot has no token left (partition tail); the rest needs a finite max
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      float mx = m[h];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) mx = valid[u] ? fmaxf(mx, s[u][h]) : mx;
      const float alpha = exp2f(m[h] - mx);  // 0 on the slot's first tokens (m = -inf)
      m[h] = mx;
      l[h] *= alpha;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[h][i] *= alpha;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        s[u][h] = valid[u] ? exp2f(s[u][h] - mx) : 0.f;  // now the probability weight p
        l[h] += s[u][h];
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float vf[VEC];
      Elem<T>::unpack(vr[u], vf);
#pragma unroll
      for (int h = 0; h < HEADS; ++h)
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[h][i] = fmaf(s[u][h], vf[i], acc[h][i]);
    }
  }

  // 4. merge the slots: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s.
  // A slot that saw no token has m = -inf, l = 0, acc = 0 and weighs 0; M is finite (the partition has a token).
  __shared__ float s_m[SLOTS][HEADS], s_l[SLOTS][HEADS];
  __shared__ float s_acc[SLOTS][HEADS][HEAD_DIM];  // at most 32 KiB (16-bit, HEADS = 8)
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    if (lane == 0) {
      s_m[slot][h] = m[h];
      s_l[slot][h] = l[h];
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) s_acc[slot][h][lane * VEC + i] = acc[h][i];
  }
  __syncthreads();
  const bool split = a.num_partitions > 1;
  for (int idx = threadIdx.x; idx < HEADS * HEAD_DIM; idx += kNumThreads) {
    const int h = idx / HEAD_DIM, d = idx % HEAD_DIM;
    float mx = -INFINITY;
#pragma unroll
    for (int sl = 0; sl < SLOTS; ++sl) mx = fmaxf(mx, s_m[sl][h]);
    float sum = 0.f, o = 0.f;
#pragma unroll
    for (int sl = 0; sl < SLOTS; ++sl) {
      const float w = exp2f(s_m[sl][h] - mx);
      sum = fmaf(w, s_l[sl][h], sum);
      o = fmaf(w, s_acc[sl][h][d], o);
    }
    const int head = head0 + h;
    const float lse2 = mx + log2f(sum);  // log2-sum-exp of this partition's scores
    if (split) {  // fp32 partials for the reduce kernel: [B, H, P, D] then [B, H, P]
      const int64_t row_id = (int64_t(seq) * a.num_heads + head) * a.num_partitions + part;
      a.workspace[row_id * HEAD_DIM + d] = o / sum;
      if (d == 0) a.workspace[int64_t(a.batch) * a.num_heads * a.num_partitions * HEAD_DIM + row_id] = lse2;
    } else {
      static_cast<T*>(a.out)[seq * a.out_stride_b + head * a.out_stride_h + d] = Elem<T>::from_float(o / sum);
      if (d == 0 && a.lse != nullptr) a.lse[int64_t(seq) * a.num_heads + head] = lse2 * kLn2;
    }
  }
}

// ------------------------------------------------------------------ kernel 2: merge the partitions
// One block per (sequence, query head), a thread per output element:
// out = sum_p 2^(lse_p - M) o_p / sum_p 2^(lse_p - M), over the partitions this sequence wrote.
template <typename T>
__global__ void paged_decode_reduce_kernel(const PagedDecodeArgs a) {
  const int seq = blockIdx.x, head = blockIdx.y;
  const int len = a.window > 0 ? min(a.context_lens[seq], a.window) : a.context_lens[seq];
  const int n = ceil_div(len, a.partition_size);  // later slots were never written
  const int64_t row0 = (int64_t(seq) * a.num_heads + head) * a.num_partitions;
  const float* part_out = a.workspace + row0 * a.head_dim;
  const float* part_lse = a.workspace + int64_t(a.batch) * a.num_heads * a.num_partitions * a.head_dim + row0;
  float mx = -INFINITY;
  for (int p = 0; p < n; ++p) mx = fmaxf(mx, part_lse[p]);
  float sum = 0.f;
  for (int p = 0; p < n; ++p) sum += exp2f(part_lse[p] - mx);
  for (int d = threadIdx.x; d < a.head_dim; d += blockDim.x) {
    float o = 0.f;
    for (int p = 0; p < n; ++p) o = fmaf(exp2f(part_lse[p] - mx), part_out[p * a.head_dim + d], o);
    static_cast<T*>(a.out)[seq * a.out_stride_b + head * a.out_stride_h + d] = Elem<T>::from_float(o / sum);
  }
  if (threadIdx.x == 0 && a.lse != nullptr) a.lse[int64_t(seq) * a.num_heads + head] = (mx + log2f(sum)) * kLn2;
}

// ------------------------------------------------------------------ dispatch over the templates
template <typename T, int HEAD_DIM, int HEADS>
void launch_partitions(const PagedDecodeArgs& a, cudaStream_t stream) {
  const dim3 grid(a.batch, a.num_heads / HEADS, a.num_partitions);
  paged_decode_partition_kernel<T, HEAD_DIM, HEADS><<<grid, kNumThreads, 0, stream>>>(a);
}

template <typename T, int HEAD_DIM>
bool launch_head_dim(const PagedDecodeArgs& a, int heads, cudaStream_t stream) {
  switch (heads) {
    case 1: launch_partitions<T, HEAD_DIM, 1>(a, stream); return true;
    case 2: launch_partitions<T, HEAD_DIM, 2>(a, stream); return true;
    case 3: launch_partitions<T, HEAD_DIM, 3>(a, stream); return true;
    case 4: launch_partitions<T, HEAD_DIM, 4>(a, stream); return true;
    case 5: launch_partitions<T, HEAD_DIM, 5>(a, stream); return true;
    case 6: launch_partitions<T, HEAD_DIM, 6>(a, stream); return true;
    case 7: launch_partitions<T, HEAD_DIM, 7>(a, stream); return true;
    case 8: launch_partitions<T, HEAD_DIM, 8>(a, stream); return true;
    default: return false;
  }
}

template <typename T>
bool launch_typed(const PagedDecodeArgs& a, cudaStream_t stream) {
  const int heads = paged_decode_heads_per_block(a.num_heads / a.num_kv_heads);
  bool ok = false;
  if (a.head_dim == 64) ok = launch_head_dim<T, 64>(a, heads, stream);  // one line per kHeadDims entry
  if (a.head_dim == 128) ok = launch_head_dim<T, 128>(a, heads, stream);
  if (ok && a.num_partitions > 1)
    paged_decode_reduce_kernel<T><<<dim3(a.batch, a.num_heads), a.head_dim, 0, stream>>>(a);
  return ok;
}

}  // namespace

int paged_decode_heads_per_block(int group) {
  for (int h = std::min(group, kMaxHeadsPerBlock); h > 1; --h)
    if (group % h == 0) return h;
  return 1;
}

// Split-K sizing. Without it a batch of B sequences is only B * H / HEADS blocks: B = 1 on a 32-head
// model is 32 blocks for 132 SMs. Cut each sequence into partitions until the grid has about
// 2 * num_sms blocks (two waves of one block per SM; the Triton kernel's target too, so the two compare
// on the same split; a knob to tune), in whole steps, never below kMinPartition tokens (each partition
// adds a q load, a merge and a reduce term). A large batch gets one partition: no workspace, no reduce.
int paged_decode_partition_size(int batch, int num_heads, int num_kv_heads, int max_context_len, int num_sms) {
  const int group = num_kv_heads > 0 ? std::max(num_heads / num_kv_heads, 1) : 1;
  const int blocks = std::max(1, batch * num_heads / paged_decode_heads_per_block(group));
  const int want_parts = ceil_div(2 * std::max(num_sms, 1), blocks);
  const int size = ceil_div(ceil_div(std::max(max_context_len, 1), want_parts), kPartitionAlign) * kPartitionAlign;
  return std::max(size, kMinPartition);
}

size_t paged_decode_workspace_floats(int batch, int num_heads, int head_dim, int num_partitions) {
  return size_t(batch) * num_heads * num_partitions * (head_dim + 1);
}

cudaError_t launch_paged_decode(const PagedDecodeArgs& a, cudaStream_t stream) {
  if (a.batch < 0 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0 || a.block_size <= 0 ||
      a.partition_size <= 0 || a.num_partitions <= 0 || a.window < 0 || !paged_decode_supports_head_dim(a.head_dim) ||
      (a.num_partitions > 1 && a.workspace == nullptr) || a.num_partitions > 65535 ||
      a.num_heads > 65535)
    return cudaErrorInvalidValue;
  if (a.batch == 0) return cudaSuccess;
  bool ok = false;
  switch (a.dtype) {
    case DType::kFloat32: ok = launch_typed<float>(a, stream); break;
    case DType::kFloat16: ok = launch_typed<__half>(a, stream); break;
    case DType::kBFloat16: ok = launch_typed<__nv_bfloat16>(a, stream); break;
  }
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace sot
