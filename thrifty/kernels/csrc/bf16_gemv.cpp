// y = x @ W^T (+ b) for bf16 x (M, K), W (N, K), b (N,) with few rows M: the decode-time matmul.
//
// At small M the weight is read once and barely reused, so the job is to stream W from DRAM at
// full bandwidth while doing AVX-512 BF16 dot products (vdpbf16ps: 32 bf16 products summed in
// pairs into 16 fp32 lanes). W stays in the checkpoint's row-major layout: no prepacking.
//
// Blocking: output rows go in tiles of 16, split across threads (at::parallel_for, OpenMP).
// Inside a tile a micro-kernel keeps 16 accumulators, MB rows of x times R = 16 / MB rows of W,
// and folds them with one 16-way transpose-add (reduce16) into 16 sums. The first pass over a
// tile pulls W from DRAM; the passes for the other row blocks of x find it in L1/L2.
// Tails: K with masked loads (zeros add nothing); rows of x or W past the end repeat the last
// row and their results are dropped.
//
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16; the Python side loads it only on
// CPUs that have avx512_bf16.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include "torch_api.h"

#include "linear_abi.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kTile = 16;  // output rows per tile, and accumulators per micro-kernel
constexpr int64_t kSequentialMaxK = 4096;  // MB * K: x stays in L1 (8 KB) beside W
constexpr int64_t kSequentialMaxM = 8;
constexpr int64_t kGrainBytes = 64 << 10;  // below this much W per thread, stay on one thread

// Lane m * R + r of the result is dot(x[m], w[r]) over K, for m < mb rows of x and r < nr rows
// of w (the other lanes hold repeats). kSequential reads the R rows of w one after another: one
// contiguous run, which the hardware prefetcher streams best while x (reloaded for every row)
// stays in L1. Otherwise the rows go side by side, 32 columns at a time, loading x once for all
// R rows: better once MB rows of x no longer fit in L1 beside the stream, or once many passes
// over a cached tile make the loads count. (Software prefetch and blocking K measured slower.)
template <int MB, bool kSequential>
inline __m512 micro(const uint16_t* x, int mb, const uint16_t* w, int nr, int64_t K) {
  constexpr int R = kTile / MB;
  const uint16_t* xp[MB];
  const uint16_t* wp[R];
  for (int m = 0; m < MB; ++m) xp[m] = x + std::min(m, mb - 1) * K;
  for (int r = 0; r < R; ++r) wp[r] = w + std::min(r, nr - 1) * K;
  const int64_t k32 = K & ~int64_t{31};
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K - k32)) - 1);
  __m512 acc[kTile];
  for (int i = 0; i < kTile; ++i) acc[i] = _mm512_setzero_ps();
  // 32 columns of row r of w against the MB rows of x; at the tail, zeros past K add nothing.
  auto dot = [&](int r, int64_t k, bool at_tail) {
    auto load = [&](const uint16_t* p) {
      return (__m512bh)(at_tail ? _mm512_maskz_loadu_epi16(tail, p) : _mm512_loadu_si512(p));
    };
    const __m512bh wv = load(wp[r] + k);
    for (int m = 0; m < MB; ++m)
      acc[m * R + r] = _mm512_dpbf16_ps(acc[m * R + r], load(xp[m] + k), wv);
  };
  if constexpr (kSequential) {
    for (int r = 0; r < R; ++r) {
      for (int64_t k = 0; k < k32; k += 32) dot(r, k, false);
      if (k32 < K) dot(r, k32, true);
    }
  } else {
    for (int64_t k = 0; k < k32; k += 32)
      for (int r = 0; r < R; ++r) dot(r, k, false);
    if (k32 < K)
      for (int r = 0; r < R; ++r) dot(r, k32, true);
  }
  return thrifty_simd::reduce16(acc);
}

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <int MB, bool kSequential>
void gemv(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t M,
          int64_t N, int64_t K) {
  constexpr int R = kTile / MB;
  const int64_t n_tiles = (N + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / (kTile * K * 2));
  at::parallel_for(0, n_tiles, grain, [&](int64_t t0, int64_t t1) {
    alignas(64) float bvec[kTile];
    alignas(32) uint16_t out[kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTile;
      const int tile_rows = static_cast<int>(std::min<int64_t>(kTile, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mb = static_cast<int>(std::min<int64_t>(MB, M - m0));
        for (int s = 0; s < tile_rows; s += R) {
          const int nr = std::min(R, tile_rows - s);
          __m512 sums = micro<MB, kSequential>(x + m0 * K, mb, w + (n0 + s) * K, nr, K);
          if (bias != nullptr) {
            for (int i = 0; i < kTile; ++i)
              bvec[i] = bf16_to_float(bias[n0 + s + std::min(i % R, nr - 1)]);
            sums = _mm512_add_ps(sums, _mm512_load_ps(bvec));
          }
          // Round to nearest even, as a float -> bf16 cast does.
          _mm256_store_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(sums));
          for (int m = 0; m < mb; ++m)
            std::memcpy(y + (m0 + m) * N + n0 + s, out + m * R, nr * sizeof(uint16_t));
        }
      }
    }
  });
}

torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& weight,
                          const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(),
                    "bf16_linear: CPU tensors only");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
                    "bf16_linear: x and weight must be bfloat16");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.is_contiguous(),
                    "bf16_linear: weight must be a contiguous (out_features, in_features) matrix");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), "bf16_linear: x is ",
                    x.sizes(), " but weight is ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(K > 0, "bf16_linear: in_features must be positive");
  const uint16_t* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kBFloat16 && bias->dim() == 1 &&
                          bias->size(0) == N && bias->is_contiguous() && bias->device().is_cpu(),
                      "bf16_linear: bias must be a contiguous bfloat16 vector of out_features");
    bp = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  const torch::Tensor x2 = x.reshape({-1, K}).contiguous();  // (M, K)
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  torch::Tensor y = torch::empty(out_shape, x.options());
  if (M == 0 || N == 0) return y;
  auto xp = reinterpret_cast<const uint16_t*>(x2.data_ptr());
  auto wp = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  auto yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  // Measured on Zen 4 (benchmarks/kernels_bf16.py): up to 8 rows, two rows of x per pass beat
  // four or eight, since more rows of W per micro-kernel keep more of the stream in flight, and
  // the passes after the first over a tile find it in L1/L2. Past 8 rows those passes dominate:
  // the side-by-side order, with fewer loads per dot product, and four rows of x per pass win.
  if (M == 1) {
    if (K <= kSequentialMaxK) gemv<1, true>(xp, wp, bp, yp, M, N, K);
    else gemv<1, false>(xp, wp, bp, yp, M, N, K);
  } else if (M <= kSequentialMaxM && 2 * K <= kSequentialMaxK) {
    gemv<2, true>(xp, wp, bp, yp, M, N, K);
  } else if (M < 16) {
    gemv<2, false>(xp, wp, bp, yp, M, N, K);
  } else {
    gemv<4, false>(xp, wp, bp, yp, M, N, K);
  }
  return y;
}

// ---- Packed weights: one kernel for every batch size --------------------------------------
//
// bf16: W (N, K) packed as (N / 16, K / 2, 32): panel p holds output rows 16p .. 16p + 15, and
// for each pair of columns (2j, 2j + 1) its 32 values are W[16p + i, 2j + e] at lane 2i + e. One
// dpbf16 of that row of the panel against x[m, 2j : 2j + 2] broadcast to all lanes adds the
// pair's products to 16 outputs at once: no horizontal sums, and a panel is one contiguous
// stream. float32: the same with one column per step, (N / 16, K, 16), and FMAs.
// A micro-kernel keeps MR rows of x times NR panels of accumulators in registers.
constexpr int kPanelRows = 16;
constexpr int kMaxMR = 6, kNR = 4;  // 24 accumulators + 4 weight vectors + 1 broadcast <= 32

struct Bf16Panels {
  using T = uint16_t;
  using W = __m512bh;
  static constexpr int kCols = 2;  // columns of x consumed per step
  static W load(const T* p) { return (W)_mm512_loadu_si512(p); }
  static W broadcast(const T* x) {
    int32_t pair;
    std::memcpy(&pair, x, sizeof(pair));
    return (W)_mm512_set1_epi32(pair);
  }
  static __m512 fma(__m512 acc, W x, W w) { return _mm512_dpbf16_ps(acc, x, w); }
  static __m512 load_bias(const T* p) { return thrifty_simd::load_f32(p, 0xFFFF); }
  static void store(T* y, __m512 v) {  // round to nearest even, as a float -> bf16 cast does
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(v));
  }
};

struct F32Panels {
  using T = float;
  using W = __m512;
  static constexpr int kCols = 1;
  static W load(const T* p) { return _mm512_loadu_ps(p); }
  static W broadcast(const T* x) { return _mm512_set1_ps(*x); }
  static __m512 fma(__m512 acc, W x, W w) { return _mm512_fmadd_ps(x, w, acc); }
  static __m512 load_bias(const T* p) { return _mm512_loadu_ps(p); }
  static void store(T* y, __m512 v) { _mm512_storeu_ps(y, v); }
};

template <typename P, int MR, int NR>
inline void packed_micro(const typename P::T* x, int64_t K, const typename P::T* panel,
                         int64_t stride, const typename P::T* bias, typename P::T* y, int64_t N) {
  constexpr int64_t step = kPanelRows * P::kCols;  // panel elements per step
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < K / P::kCols; ++j) {
    typename P::W w[NR];
    for (int r = 0; r < NR; ++r) w[r] = P::load(panel + r * stride + j * step);
    for (int m = 0; m < MR; ++m) {
      const typename P::W xb = P::broadcast(x + m * K + j * P::kCols);
      for (int r = 0; r < NR; ++r) acc[m][r] = P::fma(acc[m][r], xb, w[r]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    const __m512 b = bias == nullptr ? _mm512_setzero_ps() : P::load_bias(bias + r * kPanelRows);
    for (int m = 0; m < MR; ++m) P::store(y + m * N + r * kPanelRows, _mm512_add_ps(acc[m][r], b));
  }
}

template <typename P, int NR>
void packed_rows(int mr, const typename P::T* x, int64_t K, const typename P::T* panel,
                 int64_t stride, const typename P::T* bias, typename P::T* y, int64_t N) {
  switch (mr) {
    case 1: return packed_micro<P, 1, NR>(x, K, panel, stride, bias, y, N);
    case 2: return packed_micro<P, 2, NR>(x, K, panel, stride, bias, y, N);
    case 3: return packed_micro<P, 3, NR>(x, K, panel, stride, bias, y, N);
    case 4: return packed_micro<P, 4, NR>(x, K, panel, stride, bias, y, N);
    case 5: return packed_micro<P, 5, NR>(x, K, panel, stride, bias, y, N);
    default: return packed_micro<P, 6, NR>(x, K, panel, stride, bias, y, N);
  }
}

template <typename P>
void packed_gemm(const typename P::T* xp, const typename P::T* wp, const typename P::T* bp,
                 typename P::T* yp, int64_t M, int64_t N, int64_t K) {
  const int64_t panels = N / kPanelRows, stride = K * kPanelRows;  // elements per panel
  const int64_t groups = (panels + kNR - 1) / kNR;
  const int64_t grain =
      std::max<int64_t>(1, kGrainBytes / (kNR * stride * int64_t(sizeof(typename P::T))));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t p0 = g * kNR;
      const int nr = static_cast<int>(std::min<int64_t>(kNR, panels - p0));
      const auto* panel = wp + p0 * stride;
      const auto* b = bp == nullptr ? nullptr : bp + p0 * kPanelRows;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMaxMR, M - m0));
        const auto* xm = xp + m0 * K;
        auto* ym = yp + m0 * N + p0 * kPanelRows;
        switch (nr) {
          case 1: packed_rows<P, 1>(mr, xm, K, panel, stride, b, ym, N); break;
          case 2: packed_rows<P, 2>(mr, xm, K, panel, stride, b, ym, N); break;
          case 3: packed_rows<P, 3>(mr, xm, K, panel, stride, b, ym, N); break;
          default: packed_rows<P, 4>(mr, xm, K, panel, stride, b, ym, N); break;
        }
      }
    }
  });
}

// y = x @ W^T + bias for x (..., K) and W packed: bf16 (N / 16, K / 2, 32) or float32
// (N / 16, K, 16), x, bias and y in the weight's dtype.
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed,
                            const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && packed.device().is_cpu(),
                    "packed_linear: CPU tensors only");
  const auto dtype = packed.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kBFloat16 || dtype == at::kFloat,
                    "packed_linear: the weight must be bfloat16 or float32");
  TORCH_CHECK_VALUE(x.scalar_type() == dtype, "packed_linear: x must have the weight's dtype");
  const int64_t cols = dtype == at::kBFloat16 ? 2 : 1;
  TORCH_CHECK_VALUE(packed.dim() == 3 && packed.size(2) == cols * kPanelRows &&
                        packed.is_contiguous(),
                    "packed_linear: weight must be packed as (N / 16, K / ", cols, ", ",
                    cols * kPanelRows, ")");
  const int64_t N = packed.size(0) * kPanelRows, K = packed.size(1) * cols;
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "packed_linear: x is ", x.sizes(),
                    " but the packed weight has in_features ", K);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == dtype && bias->dim() == 1 && bias->size(0) == N &&
                          bias->is_contiguous() && bias->device().is_cpu(),
                      "packed_linear: bias must be a contiguous vector of N in the weight's dtype");
  }
  const torch::Tensor x2 = x.reshape({-1, K}).contiguous();  // (M, K)
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  torch::Tensor y = torch::empty(out_shape, x.options());
  if (M == 0 || N == 0 || K == 0) return K == 0 ? y.zero_() : y;
  if (dtype == at::kBFloat16) {
    auto ptr = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
    packed_gemm<Bf16Panels>(ptr(x2), ptr(packed), bias.has_value() ? ptr(*bias) : nullptr,
                            ptr(y), M, N, K);
  } else {
    packed_gemm<F32Panels>(x2.data_ptr<float>(), packed.data_ptr<float>(),
                           bias.has_value() ? bias->data_ptr<float>() : nullptr,
                           y.data_ptr<float>(), M, N, K);
  }
  return y;
}

// packed_linear as the decode step's compiled loop calls it (linear_abi.h; no scale, a, b).
torch::Tensor packed_linear_abi(const torch::Tensor& x, const torch::Tensor& packed,
                                const torch::Tensor&, const std::optional<torch::Tensor>& bias,
                                int64_t, int64_t) {
  return packed_linear(x, packed, bias);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_linear", &bf16_linear, "y = x @ weight^T + bias in bf16 for few rows of x");
  m.def("packed_linear", &packed_linear,
        "y = x @ W^T + bias, W packed in panels of 16 rows (bf16 or float32)");
  m.attr("linear_capsule") = py::capsule(
      reinterpret_cast<void*>(static_cast<thrifty_abi::LinearFn>(&packed_linear_abi)),
      thrifty_abi::kLinearCapsule);
}
