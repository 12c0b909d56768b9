// The many-rows path of the compact-weight linears (ggml_gemv.cpp, fp8_gemm.cpp, fp8_avx2.cpp):
// y = x @ W^T (+ bias), W dequantized a panel of rows at a time by the caller's `dequant` into
// x's dtype and handed to torch's matmul; the whole weight never is.
#pragma once

#include <ATen/Parallel.h>
#include "torch_api.h"

#include <algorithm>
#include <cstdint>

namespace thrifty_panel {

// Rows a panel: a multiple of 16 that gives every thread a panel, between lo and hi (big enough
// that torch's matmul runs at speed, small enough to stay in cache).
inline int64_t panel_rows(int64_t N, int64_t lo, int64_t hi) {
  const int64_t per_thread = (N + at::get_num_threads() - 1) / at::get_num_threads();
  return std::clamp<int64_t>((per_thread + 15) / 16 * 16, lo, hi);
}

// y (M, N) = x (M, K) @ W^T (+ bias, undefined for none), x contiguous; dequant(n0, n1, panel)
// writes rows [n0, n1) of W into `panel` ((n1 - n0, K), x's dtype). Each thread dequantizes and
// multiplies its own panels, torch's matmul running single-threaded inside the parallel region:
// one region per call (a region per panel costs a barrier each, which a busy machine turns into
// a scheduler wait).
template <typename Dequant>
void panel_gemm(const torch::Tensor& x, const torch::Tensor& bias, torch::Tensor& y, int64_t rows,
                const Dequant& dequant) {
  const int64_t N = y.size(1), K = x.size(1);
  const int64_t n_panels = (N + rows - 1) / rows;
  const bool inference = c10::InferenceMode::is_enabled();  // thread-local: pass it on
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
    c10::InferenceMode guard(inference);
    torch::Tensor panel = torch::empty({std::min(N, rows), K}, x.options());
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * rows, n1 = std::min(N, n0 + rows);
      torch::Tensor w = panel.narrow(0, 0, n1 - n0);
      dequant(n0, n1, w);
      torch::Tensor out = y.narrow(1, n0, n1 - n0);
      if (bias.defined()) {
        out.copy_(at::addmm(bias.narrow(0, n0, n1 - n0), x, w.t()));
      } else {
        out.copy_(at::mm(x, w.t()));
      }
    }
  });
}

}  // namespace thrifty_panel
