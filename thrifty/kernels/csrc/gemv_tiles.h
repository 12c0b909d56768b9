// The outer loop of the row-dot GEMVs (ggml_gemv.cpp, fp8_avx2.cpp): output rows in tiles of 16,
// threads over tiles, up to MaxMB rows of x per pass over a tile (whose bytes stay in cache), the
// 16 row sums of a tile reduced by one transpose-add. Written against vec16.h, so it runs on
// either build.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "vec16.h"

namespace thrifty_vec {

constexpr int kTile = 16;  // output rows per tile

inline f16v load16(const float* p, mask16 k) { return load(p, k); }
inline f16v load16(const at::BFloat16* p, mask16 k) {
  alignas(64) float t[16];
  for (int i = 0; i < 16; ++i) t[i] = k >> i & 1 ? static_cast<float>(p[i]) : 0.f;
  return load(t);
}

template <typename T>
inline void store16(T* out, f16v v, mask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    store(out, v, k);
  } else {
#if defined(__AVX512BF16__)
    _mm256_mask_storeu_epi16(out, k, (__m256i)_mm512_cvtneps_pbh(v));
#else
    alignas(64) float t[16];
    store(t, v, kAll);
    for (int i = 0; i < 16; ++i)
      if (k >> i & 1) out[i] = at::BFloat16(t[i]);  // round to nearest even, as cvtneps_pbh
#endif
  }
}

// y (M, N) = the row dots + bias. `dot(n, m0, mb, out)` sets out[m] to 16 lanes whose sum is
// y[m0 + m, n] without the bias, for m < mb <= MaxMB; row_bytes (the weight bytes of one output
// row) sets the grain: about 16 KB of weight per task.
template <int MaxMB, typename T, typename Dot>
void gemv_tiles(int64_t N, int64_t row_bytes, const T* bias, T* y, int64_t M, const Dot& dot) {
  const int64_t n_tiles = (N + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, (16 << 10) / (kTile * std::max<int64_t>(1, row_bytes)));
  at::parallel_for(0, n_tiles, grain, [&](int64_t t0, int64_t t1) {
    alignas(64) f16v acc[MaxMB][kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTile;
      const int rows = static_cast<int>(std::min<int64_t>(kTile, N - n0));
      const mask16 k = first_lanes(rows);
      const f16v b = bias ? load16(bias + n0, k) : zero();
      for (int64_t m0 = 0; m0 < M; m0 += MaxMB) {
        const int mb = static_cast<int>(std::min<int64_t>(MaxMB, M - m0));
        for (int r = 0; r < kTile; ++r) {
          f16v one[MaxMB];
          if (r < rows) {
            dot(n0 + r, m0, mb, one);
          } else {
            for (int m = 0; m < mb; ++m) one[m] = zero();
          }
          for (int m = 0; m < mb; ++m) acc[m][r] = one[m];
        }
        for (int m = 0; m < mb; ++m) {
          store16(y + (m0 + m) * N + n0, add(reduce16(acc[m]), b), k);
        }
      }
    }
  });
}

}  // namespace thrifty_vec
