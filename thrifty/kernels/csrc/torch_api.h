// The part of torch the kernels use: tensors with their methods, the few factory functions they
// call, at::parallel_for, and pybind11 with torch's tensor casters. <torch/extension.h> pulls in
// the whole C++ frontend (nn, optim, data) as well; parsing it costs ~45 s of a ~55 s build on a
// 2-core CPU, once for each of the four extensions a fresh install compiles.
#pragma once

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/utils/pybind.h>

// torch::Tensor, torch::empty, torch::kFloat...: the names <torch/extension.h> gives, from at::.
namespace torch {
using namespace at;
}  // namespace torch
