// C++ CPU kernels for the embedded (fp32, small-batch decode) path, bound as `kernels._cpp`.
//
//   linear(x [M, K], w [N, K]) -> [M, N]            weight matmul for 2 <= M <= 8 (else at::linear)
//   paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len)
//                                                   same contract as kernels.reference
//
// Both are memory-bound at decode: each weight row / each K and V row is read from memory once and
// used for every row of the batch / every query head of its KV group. Plain IEEE fp32 (no
// -ffast-math); AVX2+FMA intrinsics when the compiler targets them, a scalar loop otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SOT_AVX2 1
#endif

namespace {

#ifdef SOT_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t k = 0;
  float s = 0.f;
#ifdef SOT_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc1);
  }
  for (; k + 8 <= n; k += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// y[i] = y[i] * c + p * x[i]  (the online-softmax update of one accumulator row)
inline void scale_axpy(float* y, float c, float p, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = y[i] * c + p * x[i];
}

// ---------------------------------------------------------------------------------------------
// linear: out[m, n] = sum_k x[m, k] * w[n, k]. A micro-kernel computes an MR x NR tile (MR rows of
// x against NR rows of w) in registers; for one block of NR weight rows every m-tile runs before
// the next block, so each weight row comes from memory once and is re-read from L1 for later tiles.
#ifdef SOT_AVX2
#if defined(__AVX512F__) && defined(__AVX512VL__)
constexpr int NR = 4;  // 32 vector registers: 16 accumulators fit
#else
constexpr int NR = 2;  // 16 vector registers
#endif
#else
constexpr int NR = 2;
#endif

template <int MR, int NB>
inline void tile(const float* x, const float* w, float* out, int64_t K, int64_t N) {
  // x: MR rows of stride K; w: NB rows of stride K; out: MR rows of stride N
  float res[MR][NB];
  int64_t k = 0;
#ifdef SOT_AVX2
  __m256 acc[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm256_loadu_ps(w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      __m256 xv = _mm256_loadu_ps(x + i * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) res[i][j] = hsum(acc[i][j]);
#else
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) res[i][j] = 0.f;
#endif
  for (; k < K; ++k)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NB; ++j) res[i][j] += x[i * K + k] * w[j * K + k];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) out[i * N + j] = res[i][j];
}

template <int NB>
inline void rows_block(const float* x, const float* w, float* out, int64_t M, int64_t K, int64_t N) {
  constexpr int MR = 4;  // NR * MR accumulators (+ NR + 1 live loads)
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<MR, NB>(x + m * K, w, out + m * N, K, N);
  switch (M - m) {
    case 3: tile<3, NB>(x + m * K, w, out + m * N, K, N); break;
    case 2: tile<2, NB>(x + m * K, w, out + m * N, K, N); break;
    case 1: tile<1, NB>(x + m * K, w, out + m * N, K, N); break;
    default: break;
  }
}

// Rows of x for which `linear` uses the kernel. Measured on a 2-core AVX-512 machine against MKL
// (SmolLM2 shapes): 1.1-1.9x faster at M = 4 and 8, even to 12% slower at M = 1 (MKL's gemv streams
// as well) and at M = 16 (compute starts to matter); those go to at::linear.
constexpr int64_t kMinRows = 2, kMaxRows = 8;

bool kernel_applies(const torch::Tensor& x, const torch::Tensor& w) {
  return x.dim() == 2 && w.dim() == 2 && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
         x.device().is_cpu() && w.device().is_cpu() && x.size(1) == w.size(1) && x.size(0) > 0 &&
         !(at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad()));
}

// the kernel itself, any M (tests call it directly)
torch::Tensor linear_rows(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(kernel_applies(x, w), "linear_rows: x [M, K] and w [N, K], float32 CPU, no autograd");
  const auto xc = x.contiguous();
  const auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto out = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t nblocks = (N + NR - 1) / NR;
  // ~64 KiB of weights per task at least, so small matrices do not pay for threads they cannot use
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, K * NR));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * NR;
      if (n + NR <= N) {
        rows_block<NR>(xp, wp + n * K, op + n, M, K, N);
      } else {
        for (int64_t j = n; j < N; ++j) rows_block<1>(xp, wp + j * K, op + j, M, K, N);
      }
    }
  });
  return out;
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w) {
  RECORD_FUNCTION("sot_cpp::linear", std::vector<c10::IValue>());  // visible to torch.profiler
  if (kernel_applies(x, w) && x.size(0) >= kMinRows && x.size(0) <= kMaxRows) return linear_rows(x, w);
  return at::linear(x, w);
}

// ---------------------------------------------------------------------------------------------
// paged decode attention: one query per sequence. A task is one (sequence, KV head): the G query
// heads that share that KV head read each K and V row once, with an online softmax kept per
// query head and updated once per pool block.
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, double scale,
                                     std::optional<int64_t> max_context_len) {
  RECORD_FUNCTION("sot_cpp::paged_decode_attention", std::vector<c10::IValue>());
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode_attention: q [B, H, D], caches [blocks, block_size, kv_heads, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat && q.device().is_cpu() && k_cache.device().is_cpu(),
              "paged_decode_attention (C++): float32 CPU tensors only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && KVH > 0 && H % KVH == 0, "paged_decode_attention: head shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: contiguous pools");
  const int64_t G = H / KVH;
  const auto qc = q.contiguous();
  const auto tables = block_tables.to(at::kLong).contiguous();
  const auto lens = context_lens.to(at::kLong).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && lens.numel() == B,
              "paged_decode_attention: block_tables [B, max_blocks], context_lens [B]");
  (void)max_context_len;  // lengths are read on the host here anyway
  auto out = at::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t max_blocks = tables.size(1), nb_pool = k_cache.size(0);
  const float sc = static_cast<float>(scale);
  for (int64_t s = 0; s < B; ++s)
    TORCH_CHECK(lp[s] >= 0 && lp[s] <= max_blocks * BS, "paged_decode_attention: context_lens out of range");

  at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(G * D), m(G), l(G), scores(G * BS);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / KVH, kh = t % KVH, ctx = lp[s];
      const float* qg = qp + (s * H + kh * G) * D;  // G consecutive query heads
      float* og = op + (s * H + kh * G) * D;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t p0 = 0; p0 < ctx; p0 += BS) {
        const int64_t blk = tp[s * max_blocks + p0 / BS];
        TORCH_CHECK(blk >= 0 && blk < nb_pool, "paged_decode_attention: block id out of range");
        const int64_t n = std::min(BS, ctx - p0);
        const float* kb = kp + (blk * BS * KVH + kh) * D;  // row r at kb + r * KVH * D
        const float* vb = vp + (blk * BS * KVH + kh) * D;
        for (int64_t r = 0; r < n; ++r)
          for (int64_t g = 0; g < G; ++g) scores[g * BS + r] = dot(qg + g * D, kb + r * KVH * D, D) * sc;
        for (int64_t g = 0; g < G; ++g) {
          float* sg = scores.data() + g * BS;
          float mx = m[g];
          for (int64_t r = 0; r < n; ++r) mx = std::max(mx, sg[r]);
          const float c = std::exp(m[g] - mx);  // 0 on the first block (m = -inf)
          float lsum = l[g] * c;
          for (int64_t r = 0; r < n; ++r) {
            sg[r] = std::exp(sg[r] - mx);
            lsum += sg[r];
          }
          m[g] = mx;
          l[g] = lsum;
          float* ag = acc.data() + g * D;
          scale_axpy(ag, c, sg[0], vb, D);
          for (int64_t r = 1; r < n; ++r) scale_axpy(ag, 1.f, sg[r], vb + r * KVH * D, D);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t i = 0; i < D; ++i) og[g * D + i] = acc[g * D + i] * inv;
      }
    }
  });
  return out;
}

std::string build_info() {
  std::string s = "sot_csrc:";
#ifdef SOT_AVX2
  s += " avx2+fma";
#else
  s += " scalar";
#endif
#if defined(__AVX512F__) && defined(__AVX512VL__)
  s += " avx512vl-registers";
#endif
#ifdef _OPENMP
  s += " openmp";
#endif
  return s;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sot-engine C++ CPU kernels (csrc/cpu)";
  m.def("linear", &linear, "x [M, K] @ w[N, K]^T: the kernel for fp32 and MIN_ROWS <= M <= MAX_ROWS, else at::linear",
        py::arg("x"), py::arg("w"));
  m.def("linear_rows", &linear_rows, "the linear kernel for any M (fp32, CPU)", py::arg("x"), py::arg("w"));
  m.def("paged_decode_attention", &paged_decode_attention, "fp32 paged decode attention (GQA)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"), py::arg("max_context_len") = py::none());
  m.def("build_info", &build_info);
  m.attr("MIN_ROWS") = kMinRows;
  m.attr("MAX_ROWS") = kMaxRows;
}
