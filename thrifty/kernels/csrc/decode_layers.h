// A decode step's model body in one call: the token embedding, llama.run_compiled's loop over
// the decoder layers and the final norm, over the same ops (cpu_ops.cpp) and the same kernels,
// without Python between them. A SmolLM2 step makes some 270 op calls; from Python each costs
// a few microseconds of interpreter, argument conversion and cache misses (the weights stream
// through the caches between calls), which adds up to more than a millisecond a step
// (benchmarks/decode_step.py).
//
// Included by cpu_ops.cpp after its ops. A layer's linears are either another extension's
// kernel (a LinearFn from its capsule, linear_abi.h) or, for a weight kept dense in float32,
// torch's linear, as layers.linear calls it; the embedding likewise (a RowsFn, or torch's
// embedding of a dense table). Python binds the model once (llama.py) and calls forward() each
// decode step; the GIL is released while it runs.
#pragma once

#include <ATen/ops/embedding.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/linear.h>

#include "linear_abi.h"

#include <optional>
#include <string>
#include <vector>

#pragma GCC visibility push(hidden)
namespace thrifty_decode {

namespace py = pybind11;

// The function a capsule from another extension holds, checked by its name.
inline void* capsule_pointer(const py::handle& h, const char* name) {
  const auto cap = h.cast<py::capsule>();
  TORCH_CHECK(cap.name() != nullptr && std::string(cap.name()) == name, "expected a ", name,
              " capsule");
  return cap.get_pointer();
}

// One linear: fn(x, weight, scale, bias, a, b), or torch's linear where fn is null.
struct Linear {
  thrifty_abi::LinearFn fn = nullptr;
  torch::Tensor weight, scale;
  std::optional<torch::Tensor> bias;
  int64_t a = 0, b = 0;

  // From Python's (capsule or None, weight, scale or None, bias or None, a, b).
  static Linear of(const py::tuple& t) {
    TORCH_CHECK(t.size() == 6, "a linear is (kernel, weight, scale, bias, a, b)");
    Linear l;
    if (!t[0].is_none()) l.fn = reinterpret_cast<thrifty_abi::LinearFn>(
        capsule_pointer(t[0], thrifty_abi::kLinearCapsule));
    l.weight = t[1].cast<torch::Tensor>();
    if (!t[2].is_none()) l.scale = t[2].cast<torch::Tensor>();
    if (!t[3].is_none()) l.bias = t[3].cast<torch::Tensor>();
    l.a = t[4].cast<int64_t>();
    l.b = t[5].cast<int64_t>();
    return l;
  }

  torch::Tensor operator()(const torch::Tensor& x) const {
    if (fn != nullptr) return fn(x, weight, scale, bias, a, b);
    return at::linear(x, weight, bias);
  }
};

// The token embedding: fn(weight, scale, ids, a, b, dtype), or torch's embedding where fn is
// null.
struct Rows {
  thrifty_abi::RowsFn fn = nullptr;
  torch::Tensor weight, scale;
  int64_t a = 0, b = 0;

  // From Python's (capsule or None, weight, scale or None, a, b).
  static Rows of(const py::tuple& t) {
    TORCH_CHECK(t.size() == 5, "an embedding is (kernel, weight, scale, a, b)");
    Rows r;
    if (!t[0].is_none()) r.fn = reinterpret_cast<thrifty_abi::RowsFn>(
        capsule_pointer(t[0], thrifty_abi::kRowsCapsule));
    r.weight = t[1].cast<torch::Tensor>();
    if (!t[2].is_none()) r.scale = t[2].cast<torch::Tensor>();
    r.a = t[3].cast<int64_t>();
    r.b = t[4].cast<int64_t>();
    return r;
  }

  torch::Tensor operator()(const torch::Tensor& ids, at::ScalarType dtype) const {
    if (fn != nullptr) return fn(weight, scale, ids, a, b, dtype);
    return at::embedding(weight, ids);
  }
};

struct Layer {
  torch::Tensor input_norm, post_norm;
  double eps;
  Linear qkv, o, gate_up, down;
  torch::Tensor k_cache, v_cache;
  int64_t heads, kv_heads;
  double scale;
};

class Model {
 public:
  // The embedding (a Rows tuple), the rotary tables (positions, rotary_dim / 2), the final
  // norm, and the activations' dtype; then add() each layer in order.
  Model(const py::tuple& embed, torch::Tensor cos, torch::Tensor sin, torch::Tensor norm,
        double eps, at::ScalarType dtype)
      : embed_(Rows::of(embed)), cos_(std::move(cos)), sin_(std::move(sin)),
        norm_(std::move(norm)), eps_(eps), dtype_(dtype) {}

  void add(torch::Tensor input_norm, torch::Tensor post_norm, double eps, const py::tuple& qkv,
           const py::tuple& o, const py::tuple& gate_up, const py::tuple& down,
           torch::Tensor k_cache, torch::Tensor v_cache, int64_t heads, int64_t kv_heads,
           double scale) {
    layers_.push_back(Layer{std::move(input_norm), std::move(post_norm), eps, Linear::of(qkv),
                            Linear::of(o), Linear::of(gate_up), Linear::of(down),
                            std::move(k_cache), std::move(v_cache), heads, kv_heads, scale});
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // The hidden states (B, hidden) of one new token per sequence (ids, positions: (B,)), as
  // LlamaForCausalLM.forward computes them: per layer the residual add fused into each norm,
  // q and k rotated and k, v stored in their slots in one pass over the fused qkv, attention
  // read through the block tables.
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& positions,
                        const torch::Tensor& slots, const torch::Tensor& block_tables,
                        const torch::Tensor& context_lens) const {
    TORCH_CHECK(!layers_.empty(), "no layers bound");
    torch::Tensor x = embed_(ids, dtype_);
    const torch::Tensor cos = cos_.index_select(0, positions).to(dtype_);
    const torch::Tensor sin = sin_.index_select(0, positions).to(dtype_);
    torch::Tensor residual;
    for (const Layer& l : layers_) {
      if (!residual.defined()) {
        residual = x;
        x = rms_norm(x, l.input_norm, l.eps);
      } else {
        x = add_rms_norm(x, residual, l.input_norm, l.eps);
      }
      const torch::Tensor q = rope_store_kv(l.qkv(x), cos, sin, l.k_cache, l.v_cache, slots,
                                            l.heads, l.kv_heads);
      const torch::Tensor attn =
          paged_decode_attention(q, l.k_cache, l.v_cache, block_tables, context_lens, l.scale);
      x = add_rms_norm(l.o(attn), residual, l.post_norm, l.eps);
      x = l.down(silu_and_mul(l.gate_up(x)));
    }
    return add_rms_norm(x, residual, norm_, eps_);
  }

 private:
  Rows embed_;
  torch::Tensor cos_, sin_, norm_;
  double eps_;
  at::ScalarType dtype_;
  std::vector<Layer> layers_;
};

inline void bind(py::module& m) {
  py::class_<Model>(m, "DecodeModel")
      .def(py::init<py::tuple, torch::Tensor, torch::Tensor, torch::Tensor, double,
                    at::ScalarType>())
      .def("add", &Model::add, "bind the next decoder layer: norms, linears, caches, heads")
      .def("__len__", &Model::size)
      .def("forward", &Model::forward, py::call_guard<py::gil_scoped_release>(),
           "hidden states of one new token per sequence: embedding, layers, final norm");
}

}  // namespace thrifty_decode
#pragma GCC visibility pop
