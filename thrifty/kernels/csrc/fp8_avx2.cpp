// y = x @ (W * S)^T (+ b) for an FP8 (E4M3) weight W (N, K) in the checkpoint's layout with
// float32 block scales S (one per block_rows x 128 block), float32 or bf16 x, on CPUs with AVX2,
// FMA and F16C but no AVX-512 (the AVX-512 twins are fp8_gemm.cpp and fp8_packed.cpp).
//
// Decode, exact and without lookups. An E4M3 byte s.eeee.mmm sign-extended to 32 bits, shifted
// left by 20 and masked with 0x87F00000 is the float s.0000eeee.mmm0...: E4M3's exponent field
// under float's bias of 127 instead of 7, i.e. the value times 2^-120, subnormals included
// (both formats put them at the same place). Three integer ops per 8 weights. The 2^120 goes
// into the block scale, so each weight is (q 2^-120)(S 2^120) = q S, the float32 product the
// reference computes. Where a scale is 2^7 or more (S 2^120 would overflow; no quantizer writes
// such a scale, but a checkpoint may), the byte is made a half instead (16-bit lanes, shift 7,
// mask 0xBF80: the value times 2^-8) and widened by vcvtph2ps: 1.25x slower here, as exact.
//
// Few rows of x (decode): the weight's bytes are read once, output rows in tiles of 16, up to
// kMaxMB rows of x per pass over a tile (gemv_tiles.h), x in float32. Many rows (prefill): a
// panel of rows at a time is dequantized to float32 and handed to torch's float32 matmul (AVX2
// has no faster bf16 one); the whole weight never is.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include "torch_api.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fp8_check.h"
#include "gemv_tiles.h"
#include "panel_gemm.h"
#include "vec16.h"

namespace {

namespace V = thrifty_vec;
using thrifty_fp8::kBlockK;

constexpr int kMaxMB = 4;  // 2 x 4 accumulators + the decoded weight fit AVX2's 16 registers
constexpr int64_t kPanelRows = 256, kMinPanelRows = 32;  // rows dequantized at a time (prefill)
// Bytes ahead of the ones decoded that are prefetched (the next rows of the tile follow).
constexpr int64_t kAhead = 1024;

// 8 E4M3 bytes -> 8 floats, each q * 2^-120.
inline __m256 decode8(const uint8_t* p) {
  const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(0x87F00000u));
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(w, 20), mask));
}

// 16 E4M3 bytes -> 16 floats, each q * 2^-120 (Wide) or q * 2^-8 (through halves).
template <bool Wide>
inline V::f16v decode16(const uint8_t* p) {
  if constexpr (Wide) {
    return {decode8(p), decode8(p + 8)};
  } else {
    const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i h =
        _mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16(static_cast<short>(0xBF80)));
    return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)),
            _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
  }
}

// What decode16<Wide> leaves out of each value: the block scale is multiplied by it.
template <bool Wide>
constexpr float kUnit = Wide ? 0x1p120f : 0x1p8f;

// The last len < 16 bytes of a row, zero-padded.
template <bool Wide>
inline V::f16v decode_tail(const uint8_t* p, int64_t len) {
  alignas(16) uint8_t buf[16] = {};
  std::memcpy(buf, p, len);
  return decode16<Wide>(buf);
}

struct Shape {
  int64_t N, K, Kp, block_rows, SK;  // Kp: x's padded row stride; SK: scale blocks per row

  const float* scales(const float* scale, int64_t n) const { return scale + (n / block_rows) * SK; }
};

// acc[m] (16 lanes whose sum is x[m] . (row * its scales)) for m < mb. x rows are Kp floats,
// zero past K. Chunks of 16 go in pairs; with one row of x the pair's two chunks feed two
// accumulators, so consecutive FMAs do not wait on each other (more rows of x are independent
// chains of their own, and registers run short).
template <bool Wide, int MB>
inline void row_dot(const Shape& S, const uint8_t* row, const float* srow, const float* x,
                    int mb, V::f16v* acc) {
  V::f16v a[MB], b[MB];
  for (int m = 0; m < MB; ++m) a[m] = b[m] = V::zero();
  const int64_t full = S.K / 16 * 16;
  int64_t k = 0;
  for (int64_t kb = 0; kb < S.SK; ++kb) {
    const V::f16v s = V::set1(srow[kb] * kUnit<Wide>);
    const int64_t end = std::min(full, (kb + 1) * kBlockK);
    for (; k + 32 <= end; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k + kAhead), _MM_HINT_T0);
      const V::f16v w0 = V::mul(decode16<Wide>(row + k), s),
                    w1 = V::mul(decode16<Wide>(row + k + 16), s);
      if constexpr (MB == 1) {
        a[0] = V::fmadd(w0, V::load(x + k), a[0]);
        b[0] = V::fmadd(w1, V::load(x + k + 16), b[0]);
      } else {
        for (int m = 0; m < MB; ++m) {
          if (m >= mb) break;
          const float* xm = x + m * S.Kp + k;
          a[m] = V::fmadd(w1, V::load(xm + 16), V::fmadd(w0, V::load(xm), a[m]));
        }
      }
    }
    if (k < end) {  // a block's odd chunk (K % 32 == 16 or 112 columns left)
      const V::f16v w = V::mul(decode16<Wide>(row + k), s);
      for (int m = 0; m < mb; ++m) a[m] = V::fmadd(w, V::load(x + m * S.Kp + k), a[m]);
      k += 16;
    }
  }
  if (full < S.K) {  // the row's last K % 16 weights, in the last block
    const V::f16v w = V::mul(decode_tail<Wide>(row + full, S.K - full),
                             V::set1(srow[S.SK - 1] * kUnit<Wide>));
    for (int m = 0; m < mb; ++m) a[m] = V::fmadd(w, V::load(x + m * S.Kp + full), a[m]);
  }
  for (int m = 0; m < mb; ++m) acc[m] = MB == 1 ? V::add(a[m], b[m]) : a[m];
}

// x (M, K) in float32 or bf16 -> float32 (M, Kp), zero past K.
template <typename T>
void widen_x(const T* x, int64_t M, int64_t K, int64_t Kp, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) out[m * Kp + k] = static_cast<float>(x[m * K + k]);
    std::fill(out + m * Kp + K, out + (m + 1) * Kp, 0.f);
  }
}

template <bool Wide, typename T>
void gemv(const Shape& S, const float* x, const uint8_t* w, const float* scale, const T* bias,
          T* y, int64_t M) {
  V::gemv_tiles<kMaxMB>(S.N, S.K, bias, y, M, [&](int64_t n, int64_t m0, int mb, V::f16v* out) {
    const uint8_t* row = w + n * S.K;
    const float* xm = x + m0 * S.Kp;
    const float* srow = S.scales(scale, n);
    switch (mb) {
      case 1: return row_dot<Wide, 1>(S, row, srow, xm, mb, out);
      case 2: return row_dot<Wide, 2>(S, row, srow, xm, mb, out);
      default: return row_dot<Wide, 4>(S, row, srow, xm, mb, out);
    }
  });
}

// Rows [n0, n1) of W * S -> out (n1 - n0, K) float32.
template <bool Wide>
void dequant_rows(const Shape& S, const uint8_t* w, const float* scale, int64_t n0, int64_t n1,
                  float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * S.K;
    const float* srow = S.scales(scale, n);
    float* o = out + (n - n0) * S.K;
    for (int64_t k = 0; k < S.K; k += 16) {
      const int64_t len = std::min<int64_t>(16, S.K - k);
      const V::f16v s = V::set1(srow[k / kBlockK] * kUnit<Wide>);  // 16 columns: one block
      const V::f16v v =
          V::mul(len == 16 ? decode16<Wide>(row + k) : decode_tail<Wide>(row + k, len), s);
      V::store(o + k, v, V::first_lanes(len));
    }
  }
}

Shape shape_of(const torch::Tensor& weight, int64_t block_rows) {
  const int64_t N = weight.size(0), K = weight.size(1);
  return {N, K, (K + 15) / 16 * 16, block_rows, (K + kBlockK - 1) / kBlockK};
}

std::vector<int64_t> out_shape(const torch::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// fn(std::bool_constant<Wide>{}): the wide decode unless a scale is 2^7 or more (S 2^120 would
// overflow). One pass over the scales, a few hundred floats a weight.
template <typename Fn>
void with_decode(const torch::Tensor& scale, Fn&& fn) {
  const float* sp = scale.data_ptr<float>();
  bool wide = true;
  for (int64_t i = 0; i < scale.numel(); ++i) wide &= sp[i] < 0x1p7f;
  if (wide) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

torch::Tensor fp8_gemv(const torch::Tensor& x, const torch::Tensor& weight,
                       const torch::Tensor& scale, int64_t block_rows,
                       const std::optional<torch::Tensor>& bias) {
  thrifty_fp8::check(x, weight, scale, block_rows, bias);
  const Shape S = shape_of(weight, block_rows);
  const torch::Tensor x2 = x.reshape({-1, S.K}).contiguous();
  const int64_t M = x2.size(0);
  torch::Tensor y = torch::empty({M, S.N}, x.options());
  if (M == 0 || S.N == 0) return y.view(out_shape(x, S.N));
  torch::Tensor xf;  // float32 x with rows of Kp: x itself where it already is
  if (x2.scalar_type() == at::kFloat && S.Kp == S.K) {
    xf = x2;
  } else {
    xf = torch::empty({M, S.Kp}, x.options().dtype(at::kFloat));
    if (x2.scalar_type() == at::kFloat) {
      widen_x(x2.data_ptr<float>(), M, S.K, S.Kp, xf.data_ptr<float>());
    } else {
      widen_x(reinterpret_cast<const at::BFloat16*>(x2.data_ptr()), M, S.K, S.Kp,
              xf.data_ptr<float>());
    }
  }
  auto wp = reinterpret_cast<const uint8_t*>(weight.data_ptr());
  const float* sp = scale.data_ptr<float>();
  with_decode(scale, [&](auto wide) {
    constexpr bool W = decltype(wide)::value;
    if (x.scalar_type() == at::kFloat) {
      gemv<W, float>(S, xf.data_ptr<float>(), wp, sp, bias ? bias->data_ptr<float>() : nullptr,
                     y.data_ptr<float>(), M);
    } else {
      gemv<W, at::BFloat16>(
          S, xf.data_ptr<float>(), wp, sp,
          bias ? reinterpret_cast<const at::BFloat16*>(bias->data_ptr()) : nullptr,
          reinterpret_cast<at::BFloat16*>(y.data_ptr()), M);
    }
  });
  return y.view(out_shape(x, S.N));
}

// Large M: panels of rows of W dequantized to float32 (panel_gemm.h) for torch's float32 matmul;
// bf16 x is widened once and the result rounded once.
torch::Tensor fp8_gemm(const torch::Tensor& x, const torch::Tensor& weight,
                       const torch::Tensor& scale, int64_t block_rows,
                       const std::optional<torch::Tensor>& bias) {
  thrifty_fp8::check(x, weight, scale, block_rows, bias);
  const Shape S = shape_of(weight, block_rows);
  const torch::Tensor x2 = x.reshape({-1, S.K}).contiguous().to(at::kFloat);
  const int64_t M = x2.size(0);
  torch::Tensor y = torch::empty({M, S.N}, x2.options());
  if (M == 0 || S.N == 0) return y.to(x.scalar_type()).view(out_shape(x, S.N));
  const torch::Tensor b = bias.has_value() ? bias->to(at::kFloat) : torch::Tensor();
  const int64_t rows = thrifty_panel::panel_rows(S.N, kMinPanelRows, kPanelRows);
  auto wp = reinterpret_cast<const uint8_t*>(weight.data_ptr());
  const float* sp = scale.data_ptr<float>();
  with_decode(scale, [&](auto wide) {
    thrifty_panel::panel_gemm(x2, b, y, rows, [&](int64_t n0, int64_t n1, torch::Tensor& w) {
      dequant_rows<decltype(wide)::value>(S, wp, sp, n0, n1, w.data_ptr<float>());
    });
  });
  return y.to(x.scalar_type()).view(out_shape(x, S.N));
}

torch::Tensor fp8_dequantize(const torch::Tensor& weight, const torch::Tensor& scale,
                             int64_t block_rows, at::ScalarType dtype) {
  thrifty_fp8::check(torch::empty({weight.size(1)}), weight, scale, block_rows, std::nullopt);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16,
                    "fp8_dequantize: dtype must be float32 or bfloat16");
  const Shape S = shape_of(weight, block_rows);
  torch::Tensor out = torch::empty({S.N, S.K}, weight.options().dtype(at::kFloat));
  if (S.N > 0 && S.K > 0) {
    auto wp = reinterpret_cast<const uint8_t*>(weight.data_ptr());
    const float* sp = scale.data_ptr<float>();
    with_decode(scale, [&](auto wide) {
      constexpr bool W = decltype(wide)::value;
      at::parallel_for(0, S.N, std::max<int64_t>(1, (64 << 10) / S.K), [&](int64_t n0, int64_t n1) {
        dequant_rows<W>(S, wp, sp, n0, n1, out.data_ptr<float>() + n0 * S.K);
      });
    });
  }
  return out.to(dtype);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp8_gemv", &fp8_gemv, "y = x @ (W * S)^T + b, few rows of x, W read once");
  m.def("fp8_gemm", &fp8_gemm, "y = x @ (W * S)^T + b, a dequantized panel of W at a time");
  m.def("fp8_dequantize", &fp8_dequantize, "W * S in float32 or bf16");
  m.attr("gemv_float32") = true;  // the GEMV takes float32 x as well as bf16
}
