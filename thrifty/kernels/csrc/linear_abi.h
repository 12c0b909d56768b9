// A linear's kernel as another extension calls it, without Python in between: the GGUF build
// (ggml_gemv.cpp) exports its row-count dispatch as a capsule holding a LinearFn (and its
// embedding rows as a RowsFn), and the decode step's loop (decode_layers.h, in cpu_ops.cpp)
// calls it. Both extensions are
// built by the same compiler against the same libtorch, so a torch::Tensor crosses as it is.
#pragma once

#include "torch_api.h"

#include <optional>

namespace thrifty_abi {

// y = x @ W^T + bias, W as the format keeps it: (weight, scale) and the format's two numbers
// (for GGUF: the format's code and its group size).
using LinearFn = torch::Tensor (*)(const torch::Tensor& x, const torch::Tensor& weight,
                                   const torch::Tensor& scale,
                                   const std::optional<torch::Tensor>& bias, int64_t a, int64_t b);

inline constexpr const char* kLinearCapsule = "thrifty.linear";

// Rows `ids` of a table as the format keeps it, in `dtype`: the token embedding.
using RowsFn = torch::Tensor (*)(const torch::Tensor& weight, const torch::Tensor& scale,
                                 const torch::Tensor& ids, int64_t a, int64_t b,
                                 at::ScalarType dtype);

inline constexpr const char* kRowsCapsule = "thrifty.rows";

}  // namespace thrifty_abi
