// torch bindings of the CUDA paged decode kernel (paged_decode.cu), module `sot_engine.kernels._cuda`.
//
// Everything a caller can get wrong is checked here (a ValueError naming the argument); the launch goes
// on the current CUDA stream of q's device. The split-K workspace comes from torch's caching allocator,
// so a call can be captured in a CUDA graph.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "paged_decode.h"

#define CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, "paged_decode_attention (CUDA): ", __VA_ARGS__)

namespace {

sot::DType to_dtype(at::ScalarType t) {
  if (t == at::kHalf) return sot::DType::kFloat16;
  if (t == at::kBFloat16) return sot::DType::kBFloat16;
  CHECK_ARG(t == at::kFloat, "dtype ", t, " is not float32, float16 or bfloat16");
  return sot::DType::kFloat32;
}

void check_pool(const at::Tensor& c, const char* name) {
  const int64_t vec = 16 / c.element_size();  // elements per 16-byte vector load
  CHECK_ARG(c.stride(3) == 1 && c.stride(0) % vec == 0 && c.stride(1) % vec == 0 && c.stride(2) % vec == 0 &&
                reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0,
            name, " rows must start on 16 bytes: unit stride on head_dim, other strides multiples of ", vec,
            " elements, an aligned base; got strides ", c.strides());
}

int num_sms(c10::DeviceIndex device) {
  int n = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(err == cudaSuccess, "paged_decode_attention (CUDA): cannot read the SM count: ", cudaGetErrorString(err));
  return n;
}

std::tuple<at::Tensor, std::optional<at::Tensor>> paged_decode_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
    const at::Tensor& context_lens, double scale, int64_t max_context_len, int64_t partition_size,
    std::optional<at::Tensor> out, bool return_lse, int64_t window) {
  CHECK_ARG(q.is_cuda(), "q must be a CUDA tensor, got one on ", q.device());
  for (const at::Tensor* t : {&k_cache, &v_cache, &block_tables, &context_lens})
    CHECK_ARG(t->device() == q.device(), "every tensor must be on ", q.device(), ", got one on ", t->device());
  CHECK_ARG(q.dim() == 3, "q must be [B, H, D], got ", q.sizes());
  CHECK_ARG(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
            "K/V caches must be [num_blocks, block_size, kv_heads, head_dim] of one shape, got ", k_cache.sizes(),
            " and ", v_cache.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(2);
  CHECK_ARG(k_cache.size(3) == D, "q head_dim ", D, " != cache head_dim ", k_cache.size(3));
  CHECK_ARG(sot::paged_decode_supports_head_dim(D), "head_dim ", D, " is not compiled (see HEAD_DIMS)");
  CHECK_ARG(KVH > 0 && H % KVH == 0, H, " query heads do not split into ", KVH, " KV heads");
  CHECK_ARG(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
            "q, K and V must share a dtype, got ", q.scalar_type(), ", ", k_cache.scalar_type(), ", ",
            v_cache.scalar_type());
  const sot::DType dtype = to_dtype(q.scalar_type());
  CHECK_ARG(q.stride(2) == 1, "q needs a unit stride on head_dim");
  check_pool(k_cache, "k_cache");
  check_pool(v_cache, "v_cache");
  CHECK_ARG(block_tables.dim() == 2 && block_tables.size(0) == B, "block_tables must be [B, max_blocks], got ",
            block_tables.sizes());
  CHECK_ARG(context_lens.dim() == 1 && context_lens.size(0) == B, "context_lens must be [B], got ",
            context_lens.sizes());
  CHECK_ARG(!at::isFloatingType(block_tables.scalar_type()) && !at::isFloatingType(context_lens.scalar_type()),
            "block_tables and context_lens must be integer tensors");
  CHECK_ARG(max_context_len >= 1 && max_context_len <= INT32_MAX, "max_context_len must be >= 1, got ",
            max_context_len);
  CHECK_ARG(partition_size >= 0, "partition_size must be >= 0 (0: automatic), got ", partition_size);
  CHECK_ARG(window >= 0 && window <= INT32_MAX, "window must be >= 0 (0: the whole context), got ", window);
  if (out.has_value())
    CHECK_ARG(out->sizes() == q.sizes() && out->scalar_type() == q.scalar_type() && out->device() == q.device() &&
                  out->stride(2) == 1,
              "out must be ", q.sizes(), " ", q.scalar_type(), " on ", q.device(), " with a unit last stride");

  c10::cuda::CUDAGuard guard(q.device());
  // int32 metadata for the kernel; no copy when the caller keeps it so already
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor lens = context_lens.to(at::kInt).contiguous();
  const at::Tensor o = out.has_value() ? *out : at::empty({B, H, D}, q.options());
  std::optional<at::Tensor> lse;
  if (return_lse) lse = at::empty({B, H}, q.options().dtype(at::kFloat));

  // keys any query reads: the partitions split the window, not the whole context
  const int max_len = static_cast<int>(window > 0 ? std::min(max_context_len, window) : max_context_len);
  const int psize = partition_size > 0 ? static_cast<int>(std::min<int64_t>(partition_size, max_len))
                                       : sot::paged_decode_partition_size(B, H, KVH, max_len, num_sms(q.get_device()));
  const int parts = (max_len + psize - 1) / psize;
  at::Tensor workspace;
  if (parts > 1)
    workspace = at::empty({static_cast<int64_t>(sot::paged_decode_workspace_floats(B, H, D, parts))},
                          q.options().dtype(at::kFloat));

  sot::PagedDecodeArgs a{};
  a.q = q.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.block_tables = tables.data_ptr<int32_t>();
  a.context_lens = lens.data_ptr<int32_t>();
  a.out = o.data_ptr();
  a.lse = return_lse ? lse->data_ptr<float>() : nullptr;
  a.workspace = parts > 1 ? workspace.data_ptr<float>() : nullptr;
  a.q_stride_b = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.out_stride_b = o.stride(0);
  a.out_stride_h = o.stride(1);
  a.table_stride = tables.stride(0);
  a.k_stride_block = k_cache.stride(0);
  a.k_stride_row = k_cache.stride(1);
  a.k_stride_head = k_cache.stride(2);
  a.v_stride_block = v_cache.stride(0);
  a.v_stride_row = v_cache.stride(1);
  a.v_stride_head = v_cache.stride(2);
  a.batch = static_cast<int>(B);
  a.num_heads = static_cast<int>(H);
  a.num_kv_heads = static_cast<int>(KVH);
  a.head_dim = static_cast<int>(D);
  a.block_size = static_cast<int>(k_cache.size(1));
  a.partition_size = psize;
  a.num_partitions = parts;
  a.window = static_cast<int>(window);
  a.scale = static_cast<float>(scale);
  a.dtype = dtype;
  const cudaError_t err = sot::launch_paged_decode(a, c10::cuda::getCurrentCUDAStream(q.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, "paged_decode_attention (CUDA): launch failed: ", cudaGetErrorString(err));
  return {o, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sot-engine CUDA kernels (csrc/cuda): paged decode attention";
  m.def("paged_decode_attention", &paged_decode_attention,
        "q [B, H, D] over the paged K/V pool -> (out [B, H, D], lse [B, H] float32 or None); "
        "partition_size 0 picks the split-K partitions for this GPU",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("scale"), py::arg("max_context_len"), py::arg("partition_size") = 0, py::arg("out") = py::none(),
        py::arg("return_lse") = false, py::arg("window") = 0);
  m.def("default_partition_size", &sot::paged_decode_partition_size,
        "tokens per partition the kernel picks for a batch on a GPU with `num_sms` multiprocessors",
        py::arg("batch"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("max_context_len"),
        py::arg("num_sms"));
  m.def("heads_per_block", &sot::paged_decode_heads_per_block, "query heads one thread block computes",
        py::arg("group"));
  py::list dims;
  for (int d : sot::kHeadDims) dims.append(d);
  m.attr("HEAD_DIMS") = py::tuple(dims);
}
