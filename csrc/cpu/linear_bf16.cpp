// Weight matmul at bf16 precision: out[m, n] = sum_k bf16(x[m, k]) * w[n, k] for bfloat16 weights, the products
// exact in float32 and the sums float32 (sot_engine/kernels/weights.py: Bf16MatmulWeight).
//
// Why: at float32 the fp32 FMA units bound a decode step of 8-16 rows (2 GFLOP a SmolLM2 step at 8 rows, ~100
// GFLOP/s a core), so it costs 1.5-3x a 1-row step that only streams the weights. AMX's TDPBF16PS runs ~2 TFLOP/s
// a core (measured here), so with it a step of up to 16 rows is bound by the weight stream like a 1-row step.
//
// AMX tiles: C[16 x 16] fp32 += A[16 x 32] bf16 . B[32 x 16] bf16, B in pairs (row r of B holds k = 2r, 2r + 1 of
// each column). The weights are A as they lie ([N, K] row-major: a tile is 16 weight rows x 32 k, rows K * 2
// bytes apart), so they need no repacking and the embedding table stays shared with a tied lm_head; x is packed
// into B per call (a few KiB), and C holds out transposed (n x m), written back row by row.
// Without AMX (not compiled for it, or the kernel refuses the tile state), or where the shapes do not fit the
// tiles (K not a multiple of 32, the last N % 16 rows), x is rounded to bf16 and the float32 kernel runs on it:
// the same products, the sums in another order.
#include "ops.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#if defined(SOT_HAS_AMX) && defined(__linux__)
#define SOT_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

SOT_NAMESPACE_BEGIN
namespace {

constexpr int64_t kTileN = 16;  // weight rows of an A tile
constexpr int64_t kTileK = 32;  // k of a tile (64 bytes of bf16)

// x rounded to bf16 and widened back (the fallback's input): what the AMX path multiplies, exactly
void round_rows(const float* x, int64_t ldx, int64_t M, int64_t K, float* xr) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xr[m * K + k] = static_cast<float>(bf16(x[m * ldx + k]));
}

void fallback_rows(const float* x, int64_t ldx, const WeightView& w, float* out, int64_t ldo, int64_t M,
                   int64_t n0, int64_t n1) {
  if (n1 <= n0) return;
  thread_local std::vector<float> xr;
  if (static_cast<int64_t>(xr.size()) < M * w.K) xr.resize(M * w.K);
  round_rows(x, ldx, M, w.K, xr.data());
  WeightView part = w;
  part.bf16_act = false;
  part.data = static_cast<const bf16*>(w.data) + n0 * w.K;
  part.N = n1 - n0;
  linear_part(xr.data(), w.K, part, out + n0, ldo, M, 0, 1);
}

#if defined(SOT_AMX)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Software prefetch into L2 this many bytes ahead in the weight stream (0: none). Measured on 270 MB of SmolLM2
// bf16 matrices (2 threads, 1 / 8 rows, ms): none 10-16 / 15-16; 4 KiB 10 / 9-11; 16 KiB 10-11 / 10; 64 KiB 9-10 /
// 9-11 (this VM's noise is +-20%).
#ifndef SOT_AMX_PF
#define SOT_AMX_PF 16384
#endif

// Tiles 0, 1: C of two 16-row weight blocks (16 rows x MC x rows of float32); 2, 3: their A (16 weight rows x 32
// k); 4: B (16 pairs of k x MC x rows). MC = M up to 16 (B then holds no padding, and for M = 1 is x itself), else 16.
void load_tiles(int64_t MC) {
  TileConfig c;
  for (int t = 0; t < 5; ++t) c.rows[t] = 16, c.colsb[t] = t == 2 || t == 3 ? 64 : static_cast<uint16_t>(4 * MC);
  _tile_loadconfig(&c);
}

// x [M, K] -> B tiles of MC columns: xp[(mt * K / 2 + p) * MC + c] = the bf16 pair (x[m, 2p], x[m, 2p + 1]),
// m = MC mt + c (zero past M); tile (mt, kb) is the 16 MC words from (mt * K / 2 + 16 kb) * MC
void pack_x(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t MC, uint32_t* xp) {
  const int64_t P = K / 2, MT = (M + MC - 1) / MC;
  alignas(64) uint32_t row[16];
  for (int64_t mt = 0; mt < MT; ++mt) {
    uint32_t* dst = xp + mt * P * MC;
    for (int64_t c = 0; c < MC; ++c) {
      const int64_t m = mt * MC + c;
      if (m >= M) {
        for (int64_t p = 0; p < P; ++p) dst[p * MC + c] = 0;
        continue;
      }
      const float* xm = x + m * ldx;
      for (int64_t k = 0; k < K; k += kTileK) {  // 32 floats -> 16 pairs (round to nearest even)
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xm + k + 16), _mm512_loadu_ps(xm + k));
        uint32_t* d = dst + (k / 2) * MC + c;
        if (MC == 1) {
          _mm512_storeu_si512(d, reinterpret_cast<const __m512i&>(v));
          continue;
        }
        _mm512_store_si512(row, reinterpret_cast<const __m512i&>(v));
        for (int i = 0; i < 16; ++i) d[i * MC] = row[i];
      }
    }
  }
}

// a C tile stored as buf[j * 16 + c] (weight row n0 + j, x row MC mt + c) into out, transposed back
inline void scatter_c(const float* buf, float* out, int64_t ldo, int64_t M, int64_t MC, int64_t mt, int64_t n0) {
  const int64_t rows = std::min<int64_t>(MC, M - mt * MC);
  for (int64_t c = 0; c < rows; ++c) {
    float* o = out + (mt * MC + c) * ldo + n0;
    for (int j = 0; j < 16; ++j) o[j] = buf[j * 16 + c];
  }
}

// out[:, n0 : n0 + 16 (x2 with kTwo)] from the weight block(s) at row n0, every x tile
template <bool kTwo>
void amx_block(const bf16* w, int64_t K, const uint32_t* xp, int64_t M, int64_t MC, float* out, int64_t ldo,
               int64_t n0) {
  const int64_t KB = K / kTileK, P = K / 2, ldw = K * static_cast<int64_t>(sizeof(bf16));
  const bf16* w0 = w + n0 * K;
  const bf16* w1 = w0 + kTileN * K;
  for (int64_t mt = 0; mt * MC < M; ++mt) {
    const uint32_t* xb = xp + mt * P * MC;
    _tile_zero(0);
    if constexpr (kTwo) _tile_zero(1);
    for (int64_t kb = 0; kb < KB; ++kb) {
      if (SOT_AMX_PF > 0 && mt == 0) {
        // the block's bytes in order, as far ahead of the share consumed so far
        const char* pf = reinterpret_cast<const char*>(w0) + kb * (kTwo ? 32 : 16) * 64 + SOT_AMX_PF;
        for (int r = 0; r < (kTwo ? 32 : 16); ++r) _mm_prefetch(pf + r * 64, _MM_HINT_T1);
      }
      _tile_loadd(4, xb + kb * 16 * MC, 4 * MC);
      _tile_loadd(2, w0 + kb * kTileK, ldw);
      _tile_dpbf16ps(0, 2, 4);
      if constexpr (kTwo) {
        _tile_loadd(3, w1 + kb * kTileK, ldw);
        _tile_dpbf16ps(1, 3, 4);
      }
    }
    alignas(64) float buf[16 * 16];  // (gcc's tile intrinsics take the tile number as a literal)
    _tile_stored(0, buf, 64);
    scatter_c(buf, out, ldo, M, MC, mt, n0);
    if constexpr (kTwo) {
      _tile_stored(1, buf, 64);
      scatter_c(buf, out, ldo, M, MC, mt, n0 + kTileN);
    }
  }
}
#endif

}  // namespace

bool amx_compiled() {
#if defined(SOT_AMX)
  return true;
#else
  return false;
#endif
}

bool amx_ready() {
#if defined(SOT_AMX)
  // Linux hands out AMX's 8 KiB tile state per process on request (arch_prctl ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); SOT_NO_AMX=1 keeps the fallback (tests and A/B runs)
  static const bool ok = !std::getenv("SOT_NO_AMX") && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
#else
  return false;
#endif
}

void linear_bf16_rows(const float* x, int64_t ldx, const WeightView& w, float* out, int64_t ldo, int64_t M, int64_t n0,
                      int64_t n1, bool amx) {
  TORCH_CHECK(w.dtype == at::kBFloat16, "linear_bf16: bfloat16 weights");
#if defined(SOT_AMX)
  if (amx && amx_ready() && w.K % kTileK == 0 && n1 - n0 >= kTileN) {
    thread_local std::vector<uint32_t> xp;
    const int64_t MC = std::min<int64_t>(M, 16), MT = (M + MC - 1) / MC, full = n0 + (n1 - n0) / kTileN * kTileN;
    if (static_cast<int64_t>(xp.size()) < MT * MC * w.K / 2) xp.resize(MT * MC * w.K / 2);
    pack_x(x, ldx, M, w.K, MC, xp.data());
    load_tiles(MC);  // every call: another library (oneDNN) may have configured this thread's tiles since
    const bf16* wp = static_cast<const bf16*>(w.data);
    int64_t n = n0;
    for (; n + 2 * kTileN <= full; n += 2 * kTileN) amx_block<true>(wp, w.K, xp.data(), M, MC, out, ldo, n);
    if (n < full) amx_block<false>(wp, w.K, xp.data(), M, MC, out, ldo, n);
    _tile_release();
    return fallback_rows(x, ldx, w, out, ldo, M, full, n1);
  }
#endif
  (void)amx;
  fallback_rows(x, ldx, w, out, ldo, M, n0, n1);
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, bool amx) {
  RECORD_FUNCTION("sot_cpp::linear_bf16", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && w.dim() == 2 &&
                  w.scalar_type() == at::kBFloat16 && w.device().is_cpu() && x.size(1) == w.size(1),
              "linear_bf16: x [M, K] float32, w [N, K] bfloat16, CPU");
  const auto xc = x.stride(1) == 1 ? x : x.contiguous();
  const auto wc = w.contiguous();
  const WeightView wv = weight_view(wc, std::nullopt);
  const int64_t M = xc.size(0), N = wv.N;
  auto out = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return out;
  const int64_t units = (N + 2 * kTileN - 1) / (2 * kTileN);  // pairs of 16-row blocks
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    linear_bf16_rows(xc.data_ptr<float>(), xc.stride(0), wv, out.data_ptr<float>(), N, M, u0 * 2 * kTileN,
                     std::min(N, u1 * 2 * kTileN), amx);
  });
  return out;
}

SOT_NAMESPACE_END
