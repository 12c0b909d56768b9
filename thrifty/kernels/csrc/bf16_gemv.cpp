// y = x @ W^T (+ b) for bf16 x (M, K), W (N, K), b (N,) with few rows M: the decode-time matmul.
//
// At small M the weight is read once and barely reused, so the job is to stream W from DRAM at
// full bandwidth while doing AVX-512 BF16 dot products (vdpbf16ps: 32 bf16 products summed in
// pairs into 16 fp32 lanes). W stays in the checkpoint's row-major layout: no prepacking.
//
// Blocking: output rows go in tiles of 16, split across threads (at::parallel_for, OpenMP).
// Inside a tile a micro-kernel keeps 16 accumulators, MB rows of x times R = 16 / MB rows of W,
// and folds them with one 16-way transpose-add (reduce16) into 16 sums. The first pass over a
// tile pulls W from DRAM; the passes for the remaining row blocks of x find it in L1/L2.
// Tails: K with masked loads (zeros add nothing); rows of x or W past the end repeat the last
// row and their results are dropped.
//
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16; the Python side loads it only on
// CPUs that have avx512_bf16.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kTile = 16;           // output rows per tile, and accumulators per micro-kernel
constexpr int64_t kGrainBytes = 64 << 10;  // below this much W per thread, stay on one thread

// Lane i of the result is the sum of the 16 lanes of v[i].
inline __m512 reduce16(const __m512* v) {
  __m512 u[8];  // per 128-bit lane: pairs of partial sums of v[2i], v[2i+1]
  for (int i = 0; i < 8; ++i) {
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  __m512 w[4];  // per 128-bit lane: one partial sum of each of v[4i..4i+3]
  for (int i = 0; i < 4; ++i) {
    __m512d a = _mm512_castps_pd(u[2 * i]), b = _mm512_castps_pd(u[2 * i + 1]);
    w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 z[2];  // add 128-bit lanes pairwise (0+1, 2+3), twice
  for (int i = 0; i < 2; ++i) {
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                       _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

// Lane m * R + r of the result is dot(x[m], w[r]) over K, for m < mb rows of x and r < nr rows
// of w (the other lanes hold repeats). The rows of w are read one after another: a tile is one
// contiguous run of memory, the pattern the hardware prefetcher streams best (software
// prefetch and interleaving the rows both measured slower).
template <int MB>
inline __m512 micro(const uint16_t* x, int mb, const uint16_t* w, int nr, int64_t K) {
  constexpr int R = kTile / MB;
  const uint16_t* xp[MB];
  for (int m = 0; m < MB; ++m) xp[m] = x + std::min(m, mb - 1) * K;
  const int64_t k32 = K & ~int64_t{31};
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K - k32)) - 1);
  __m512 acc[kTile];
  for (int i = 0; i < kTile; ++i) acc[i] = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const uint16_t* wr = w + std::min(r, nr - 1) * K;
    int64_t k = 0;
    for (; k < k32; k += 32) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
      for (int m = 0; m < MB; ++m)
        acc[m * R + r] = _mm512_dpbf16_ps(acc[m * R + r], (__m512bh)_mm512_loadu_si512(xp[m] + k), wv);
    }
    if (k < K) {  // zeros past the end add nothing
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + k);
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, xp[m] + k);
        acc[m * R + r] = _mm512_dpbf16_ps(acc[m * R + r], xv, wv);
      }
    }
  }
  return reduce16(acc);
}

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <int MB>
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
          __m512 sums = micro<MB>(x + m0 * K, mb, w + (n0 + s) * K, nr, K);
          if (bias != nullptr) {
            for (int i = 0; i < kTile; ++i) bvec[i] = bf16_to_float(bias[n0 + s + std::min(i % R, nr - 1)]);
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
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), "bf16_linear: CPU tensors only");
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
  // More rows of W per micro-kernel keep more DRAM streams in flight; two rows of x already
  // hide the reloads of a W tile from cache (see benchmarks/kernels_bf16.py).
  if (M == 1) {
    gemv<1>(xp, wp, bp, yp, M, N, K);
  } else {
    gemv<2>(xp, wp, bp, yp, M, N, K);
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_linear", &bf16_linear, "y = x @ weight^T + bias in bf16 for few rows of x");
}
