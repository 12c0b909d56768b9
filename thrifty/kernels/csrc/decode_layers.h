// The decoder layers of a decode step in one call: llama.run_compiled's loop, over the same ops
// (cpu_ops.cpp) and the same linear kernels, without Python between them. A SmolLM2 step makes
// some 270 op calls; from Python each costs a few microseconds of interpreter, argument
// conversion and cache misses (the weights stream through the caches between calls), which
// adds up to more than a millisecond a step (benchmarks/decode_step.py).
//
// Included by cpu_ops.cpp after its ops. A layer's linears are either another extension's
// kernel (a LinearFn from its capsule, linear_abi.h) or, for a weight kept dense in float32,
// torch's linear, as layers.linear calls it. Python binds the layers once (llama.py) and calls
// run() each decode step; the GIL is released while it runs.
#pragma once

#include <ATen/ops/linear.h>

#include "linear_abi.h"

#include <optional>
#include <tuple>
#include <vector>

#pragma GCC visibility push(hidden)
namespace thrifty_decode {

namespace py = pybind11;

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
    if (!t[0].is_none()) {
      const auto cap = t[0].cast<py::capsule>();
      TORCH_CHECK(cap.name() != nullptr &&
                      std::string(cap.name()) == thrifty_abi::kLinearCapsule,
                  "a linear's kernel must be a ", thrifty_abi::kLinearCapsule, " capsule");
      l.fn = reinterpret_cast<thrifty_abi::LinearFn>(cap.get_pointer());
    }
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

struct Layer {
  torch::Tensor input_norm, post_norm;
  double eps;
  Linear qkv, o, gate_up, down;
  torch::Tensor k_cache, v_cache;
  int64_t heads, kv_heads;
  double scale;
};

class Layers {
 public:
  void add(torch::Tensor input_norm, torch::Tensor post_norm, double eps, const py::tuple& qkv,
           const py::tuple& o, const py::tuple& gate_up, const py::tuple& down,
           torch::Tensor k_cache, torch::Tensor v_cache, int64_t heads, int64_t kv_heads,
           double scale) {
    layers_.push_back(Layer{std::move(input_norm), std::move(post_norm), eps, Linear::of(qkv),
                            Linear::of(o), Linear::of(gate_up), Linear::of(down),
                            std::move(k_cache), std::move(v_cache), heads, kv_heads, scale});
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // Every layer over x (B, hidden), one new token per sequence: the residual add fused into
  // each norm, q and k rotated and k, v stored in one pass over the fused qkv, attention read
  // through the block tables. Returns (the last MLP output, the residual stream).
  std::tuple<torch::Tensor, torch::Tensor> run(torch::Tensor x, const torch::Tensor& cos,
                                               const torch::Tensor& sin, const torch::Tensor& slots,
                                               const torch::Tensor& block_tables,
                                               const torch::Tensor& context_lens) const {
    TORCH_CHECK(!layers_.empty(), "no layers bound");
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
    return {x, residual};
  }

 private:
  std::vector<Layer> layers_;
};

inline void bind(py::module& m) {
  py::class_<Layers>(m, "DecodeLayers")
      .def(py::init<>())
      .def("add", &Layers::add, "bind one decoder layer: norms, linears, caches, heads")
      .def("__len__", &Layers::size)
      .def("run", &Layers::run, py::call_guard<py::gil_scoped_release>(),
           "every layer over one new token per sequence: (last MLP output, residual)");
}

}  // namespace thrifty_decode
#pragma GCC visibility pop
