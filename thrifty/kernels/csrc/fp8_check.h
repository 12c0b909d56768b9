// Argument checks shared by the FP8 linears on the weight's own (N, K) layout (fp8_gemm.cpp,
// fp8_avx2.cpp).
#pragma once

#include "torch_api.h"

#include <cstdint>
#include <optional>

namespace thrifty_fp8 {

constexpr int kBlockK = 128;  // columns per scale block

// x (..., K) in float32 or bf16, a contiguous float8_e4m3fn weight (N, K), float32 scales, one
// per block_rows x 128 block (edge blocks partial), an optional bias of N values in x's dtype.
inline void check(const torch::Tensor& x, const torch::Tensor& weight,
                  const torch::Tensor& scale, int64_t block_rows,
                  const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu() && scale.device().is_cpu(),
                    "fp8_linear: CPU tensors only");
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat8_e4m3fn && weight.dim() == 2 &&
                        weight.is_contiguous(),
                    "fp8_linear: weight must be a contiguous float8_e4m3fn (out, in) matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "fp8_linear: x is ", x.sizes(),
                    " but weight is ", weight.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                    "fp8_linear: x must be float32 or bfloat16");
  TORCH_CHECK_VALUE(block_rows == 16 || block_rows == 32 || block_rows == 64 || block_rows == 128,
                    "fp8_linear: block_rows must be 16, 32, 64 or 128");
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 &&
                        scale.size(0) == (N + block_rows - 1) / block_rows &&
                        scale.size(1) == (K + kBlockK - 1) / kBlockK,
                    "fp8_linear: scale must be contiguous float32 of shape (ceil(N / block_rows), "
                    "ceil(K / 128)), got ", scale.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                          bias->size(0) == N && bias->is_contiguous() && bias->device().is_cpu(),
                      "fp8_linear: bias must be a contiguous vector of out_features in x's dtype");
  }
}

}  // namespace thrifty_fp8
