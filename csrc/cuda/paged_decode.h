// Paged decode attention in CUDA: the host-side interface of paged_decode.cu.
//
// Plain C++ over raw pointers and a cudaStream_t (no torch headers), so the kernels compile with nvcc
// alone; bindings.cpp checks torch tensors and fills PagedDecodeArgs.
//
// Semantics are those of kernels.reference.paged_decode_attention: one query token per sequence,
// q [B, H, D] against the sequence's first context_lens[s] tokens of the paged K/V pool
// [num_blocks, block_size, KVH, D] (token t in block block_tables[s][t / block_size], row
// t % block_size), softmax(scale * q.k) @ v, H a multiple of KVH (GQA). With a sliding window only the
// context's last `window` tokens are attended to (and read).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace sot {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct PagedDecodeArgs {
  // inputs; q, K, V share one dtype. K/V rows (unit stride on D) must start on 16 bytes: vector loads.
  const void* q;                 // [B, H, D], strides (q_stride_b, q_stride_h, 1)
  const void* k_cache;           // [num_blocks, block_size, KVH, D]
  const void* v_cache;
  const int32_t* block_tables;   // [B, table_stride]: pool block ids, at least ceil(len / block_size) per row
  const int32_t* context_lens;   // [B], each >= 1 and <= max_context_len used to size num_partitions
  // outputs
  void* out;                     // [B, H, D] in q's dtype, strides (out_stride_b, out_stride_h, 1)
  float* lse;                    // [B, H] contiguous, natural-log log-sum-exp of the scaled scores; or null
  float* workspace;              // num_partitions > 1: workspace_floats(...) floats; else unused (may be null)
  int64_t q_stride_b, q_stride_h, out_stride_b, out_stride_h, table_stride;  // in elements
  int64_t k_stride_block, k_stride_row, k_stride_head;
  int64_t v_stride_block, v_stride_row, v_stride_head;
  int batch, num_heads, num_kv_heads, head_dim, block_size;
  int partition_size;            // tokens per split-K partition (>= 1)
  int num_partitions;            // ceil(min(max_context_len, window or max) / partition_size)
  int window;                    // > 0: keys a query sees (its context's last ones); 0: the whole context
  float scale;                   // softmax scale, usually head_dim^-0.5
  DType dtype;
};

// head_dim values the kernels are compiled for (a template parameter: a row is TPT threads x 16 bytes)
constexpr int kHeadDims[] = {64, 128};
constexpr bool paged_decode_supports_head_dim(int head_dim) {
  for (int d : kHeadDims)
    if (d == head_dim) return true;
  return false;
}

// Query heads one thread block computes: the largest divisor of the GQA group up to 8. They share
// every K/V load; a group above 8 (or a prime like 11) is split over several blocks, each re-reading K/V.
int paged_decode_heads_per_block(int group);

// Default tokens per partition, so that about two waves of thread blocks cover num_sms SMs (see .cu).
int paged_decode_partition_size(int batch, int num_heads, int num_kv_heads, int max_context_len, int num_sms);

// floats of workspace a split run needs: partial outputs [B, H, P, D], then log2-sum-exps [B, H, P]
size_t paged_decode_workspace_floats(int batch, int num_heads, int head_dim, int num_partitions);

// Enqueues the partition kernel (and the reduce kernel when num_partitions > 1) on `stream`.
// Returns cudaErrorInvalidValue for arguments outside what the kernels handle, else the launch status.
cudaError_t launch_paged_decode(const PagedDecodeArgs& args, cudaStream_t stream);

}  // namespace sot
