// Runs csrc/cuda/paged_decode.cu on the CPU, for checking the kernels' logic where there is no GPU.
//
// The CUDA execution model, literally: every thread of a block is an OS thread; __syncthreads is a
// barrier over the block, __shfl_xor_sync an exchange through memory between two barriers of the warp,
// `__shared__` a static (blocks run one after another). A kernel must not return early in some threads
// of a block and not others (neither may it on a GPU, where it has __syncthreads after the return). The test (test_cuda_decode_emulated.py) compiles
// this file with g++ against the CUDA toolkit's headers, after rewriting the .cu's `<<<...>>>` launches
// into emu_launch calls. It checks indexing, masking, the online softmax and both merges; it says
// nothing about speed, memory coalescing or the real compiler's code.
#define __global__
#define __device__
#define __host__
#define __shared__ static
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#undef __launch_bounds__
#define __launch_bounds__(...)

#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace emu {
struct Block {
  explicit Block(unsigned threads) : sync(threads), xchg(threads) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w)
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> xchg;
};
thread_local Block* block = nullptr;
}  // namespace emu

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;

inline void __syncthreads() { emu::block->sync.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask: every lane calls*/, float v, int lane_mask) {
  const unsigned t = threadIdx.x, w = t / 32;
  emu::block->xchg[t] = v;
  emu::block->warps[w]->arrive_and_wait();
  const float r = emu::block->xchg[w * 32 + ((t % 32) ^ unsigned(lane_mask))];
  emu::block->warps[w]->arrive_and_wait();
  return r;
}

template <typename T>
inline T __ldg(const T* p) { return *p; }

inline int min(int a, int b) { return a < b ? a : b; }  // CUDA's device min
inline int max(int a, int b) { return a > b ? a : b; }  // and max

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// One OS thread per CUDA thread of a block, reused for every block of the grid in turn; a barrier between
// blocks keeps a block's `__shared__` statics from being overwritten while the previous block still runs.
template <typename Kernel, typename... Args>
void emu_launch(Kernel kernel, dim3 grid, dim3 threads, Args... args) {
  emu::Block blk(threads.x);
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads.x; ++t)
    pool.emplace_back([&, t] {
      emu::block = &blk;
      threadIdx = make_uint3(t, 0, 0);
      blockDim = threads;
      gridDim = grid;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = make_uint3(x, y, z);
            kernel(args...);
            blk.sync.arrive_and_wait();
          }
    });
  for (auto& th : pool) th.join();
}

#include "paged_decode_emulated.cu"  // the .cu with its launches rewritten (written by the test)

extern "C" {
size_t emu_args_size() { return sizeof(sot::PagedDecodeArgs); }
int emu_launch_paged_decode(const sot::PagedDecodeArgs* a) { return int(sot::launch_paged_decode(*a, nullptr)); }
int emu_partition_size(int batch, int heads, int kv_heads, int max_len, int sms) {
  return sot::paged_decode_partition_size(batch, heads, kv_heads, max_len, sms);
}
int emu_heads_per_block(int group) { return sot::paged_decode_heads_per_block(group); }
}
