// y = x @ (W * S)^T (+ b) for an FP8 (E4M3) weight W (N, K) with float32 block scales S: one
// scale per `block_rows` x 128 block (block_rows in 16, 32, 64, 128; edge blocks partial).
//
// Few rows of x (decode): the weight's bytes are read once. Each 64 bytes of W become 64 bf16
// values with two byte lookups (vpermi2b: a 128-entry table of the high bytes and one of the
// low bytes of E4M3's magnitudes in bf16, exact since E4M3 fits in bf16), the sign ORed in, and
// two byte interleaves. The interleave leaves the words in the order
// {0-7, 16-23, 32-39, 48-55} and {8-15, 24-31, 40-47, 56-63}, so x is permuted the same way once
// per call. Products go through AVX-512 BF16 dot products (vdpbf16ps) into a float32 sum per
// 128-column block, which is then scaled and accumulated: the scale is applied inside the kernel
// and no dequantized weight is ever written. Blocking as in bf16_gemv.cpp: output rows in tiles
// of 16 (a tile never straddles a scale block), MB rows of x times R = 16 / MB rows of W per
// micro-kernel, one 16-way transpose-add at the end.
//
// Many rows of x (prefill): dequantize a panel of rows at a time into x's dtype and call
// torch's matmul on it; the panel stays in cache, the whole weight is never materialised.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include "torch_api.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fp8_check.h"
#include "panel_gemm.h"

namespace {

using thrifty_fp8::kBlockK;
constexpr int kTile = 16;
constexpr int64_t kGrainBytes = 32 << 10;  // below this much W per thread, stay on one thread
constexpr int64_t kPanelRows = 256;        // rows of W dequantized at a time for large M

struct Tables {
  alignas(64) uint8_t hi[128];
  alignas(64) uint8_t lo[128];
  Tables() {
    for (int i = 0; i < 128; ++i) {
      const int e = i >> 3, m = i & 7;
      const float v = e == 0 ? m * 0x1p-9f : std::ldexp(1.0f + m / 8.0f, e - 7);
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof(bits));
      if (i == 127) bits = 0x7FC00000u;  // E4M3FN's NaN
      hi[i] = static_cast<uint8_t>(bits >> 24);
      lo[i] = static_cast<uint8_t>(bits >> 16);
    }
  }
};
const Tables kTables;

struct Decoder {
  __m512i hi0, hi1, lo0, lo1, sign;
  Decoder()
      : hi0(_mm512_load_si512(kTables.hi)),
        hi1(_mm512_load_si512(kTables.hi + 64)),
        lo0(_mm512_load_si512(kTables.lo)),
        lo1(_mm512_load_si512(kTables.lo + 64)),
        sign(_mm512_set1_epi8(static_cast<char>(0x80))) {}

  // 64 E4M3 bytes -> two vectors of 32 bf16 in the interleaved order described above.
  inline void decode(__m512i b, __m512i& a_out, __m512i& b_out) const {
    __m512i h = _mm512_permutex2var_epi8(hi0, b, hi1);  // index bit 6 picks the table half
    const __m512i l = _mm512_permutex2var_epi8(lo0, b, lo1);
    h = _mm512_ternarylogic_epi32(h, b, sign, 0xF8);  // h | (b & 0x80)
    a_out = _mm512_unpacklo_epi8(l, h);
    b_out = _mm512_unpackhi_epi8(l, h);
  }
};

// Element e of a 64-chunk sits in word (e % 16) / 8 ? b : a, at (e / 16) * 8 + e % 8: the
// indices (into a, then b) that put elements 0-31 and 32-63 back in order.
struct Natural {
  __m512i idx0, idx1;
  Natural() {
    alignas(64) uint16_t i0[32], i1[32];
    for (int e = 0; e < 64; ++e) {
      const uint16_t src = static_cast<uint16_t>(((e % 16) / 8) * 32 + (e / 16) * 8 + e % 8);
      (e < 32 ? i0 : i1)[e % 32] = src;
    }
    idx0 = _mm512_load_si512(i0);
    idx1 = _mm512_load_si512(i1);
  }
};

inline __m512 reduce16(const __m512* v) {
  __m512 u[8];
  for (int i = 0; i < 8; ++i) {
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  __m512 w[4];
  for (int i = 0; i < 4; ++i) {
    __m512d a = _mm512_castps_pd(u[2 * i]), b = _mm512_castps_pd(u[2 * i + 1]);
    w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 z[2];
  for (int i = 0; i < 2; ++i) {
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                       _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

// x (M, K) bf16 -> (M, Kp) with Kp = K rounded up to 64, zero-padded, each 64-chunk reordered to
// the decoder's word order.
torch::Tensor permute_x(const torch::Tensor& x2, int64_t Kp) {
  const int64_t M = x2.size(0), K = x2.size(1);
  torch::Tensor out = torch::zeros({M, Kp}, x2.options());
  auto src = reinterpret_cast<const uint16_t*>(x2.data_ptr());
  auto dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < Kp; c += 64) {
      for (int half = 0; half < 2; ++half) {
        for (int lane = 0; lane < 4; ++lane) {
          for (int j = 0; j < 8; ++j) {
            const int64_t k = c + lane * 16 + half * 8 + j;
            dst[m * Kp + c + half * 32 + lane * 8 + j] = k < K ? src[m * K + k] : 0;
          }
        }
      }
    }
  }
  return out;
}

// Lane m * R + r of the result: dot(x[m], W[r] * S[tile's block row]) for m < mb, r < nr.
// Each row of W is read start to end, so a tile streams its 16 rows' bytes in memory order (the
// hardware prefetcher keeps up with one sequential stream, not with rows read side by side).
// With few rows of x that leaves one chain of dot products waiting on each other's latency, so
// each row of x gets A accumulators, the 64-byte halves and chunks of a block spread over them.
template <int MB>
inline __m512 micro(const Decoder& dec, const uint16_t* x, int mb, int64_t Kp, const uint8_t* w,
                    int nr, int64_t K, const float* srow) {
  constexpr int R = kTile / MB;
  constexpr int A = MB >= 4 ? 1 : 4 / MB;
  const uint16_t* xp[MB];
  for (int m = 0; m < MB; ++m) xp[m] = x + std::min(m, mb - 1) * Kp;
  __m512 acc[kTile];
  for (int i = 0; i < kTile; ++i) acc[i] = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const uint8_t* wr = w + std::min(r, nr - 1) * K;
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += kBlockK, ++kb) {
      __m512 part[MB][A];
      for (int m = 0; m < MB; ++m)
        for (int a = 0; a < A; ++a) part[m][a] = _mm512_setzero_ps();
#pragma GCC unroll 2
      for (int c = 0; c < kBlockK / 64; ++c) {
        const int64_t k = k0 + 64 * c;
        if (k >= K) break;
        __m512i bytes;
        if (k + 64 <= K) {
          bytes = _mm512_loadu_si512(wr + k);
        } else {  // zero bytes decode to +0; x is zero-padded there too
          bytes = _mm512_maskz_loadu_epi8((~0ull) >> (64 - (K - k)), wr + k);
        }
        __m512i wa, wb;
        dec.decode(bytes, wa, wb);
        for (int m = 0; m < MB; ++m) {
          const uint16_t* xk = xp[m] + k;
          __m512& pa = part[m][(2 * c) % A];
          pa = _mm512_dpbf16_ps(pa, (__m512bh)_mm512_loadu_si512(xk), (__m512bh)wa);
          __m512& pb = part[m][(2 * c + 1) % A];
          pb = _mm512_dpbf16_ps(pb, (__m512bh)_mm512_loadu_si512(xk + 32), (__m512bh)wb);
        }
      }
      const __m512 s = _mm512_set1_ps(srow[kb]);
      for (int m = 0; m < MB; ++m) {
        __m512 sum = part[m][0];
        for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, part[m][a]);
        acc[m * R + r] = _mm512_fmadd_ps(sum, s, acc[m * R + r]);
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
void gemv(const uint16_t* x, int64_t Kp, const uint8_t* w, const float* scale, int64_t block_rows,
          const uint16_t* bias, uint16_t* y, int64_t M, int64_t N, int64_t K) {
  constexpr int R = kTile / MB;
  const int64_t SK = (K + kBlockK - 1) / kBlockK;
  const int64_t n_tiles = (N + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / (kTile * K));
  at::parallel_for(0, n_tiles, grain, [&](int64_t t0, int64_t t1) {
    const Decoder dec;
    alignas(64) float bvec[kTile];
    alignas(32) uint16_t out[kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTile;
      const int tile_rows = static_cast<int>(std::min<int64_t>(kTile, N - n0));
      const float* srow = scale + (n0 / block_rows) * SK;  // one block row per tile
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mb = static_cast<int>(std::min<int64_t>(MB, M - m0));
        for (int s = 0; s < tile_rows; s += R) {
          const int nr = std::min(R, tile_rows - s);
          __m512 sums = micro<MB>(dec, x + m0 * Kp, mb, Kp, w + (n0 + s) * K, nr, K, srow);
          if (bias != nullptr) {
            for (int i = 0; i < kTile; ++i) bvec[i] = bf16_to_float(bias[n0 + s + std::min(i % R, nr - 1)]);
            sums = _mm512_add_ps(sums, _mm512_load_ps(bvec));
          }
          _mm256_store_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(sums));
          for (int m = 0; m < mb; ++m)
            std::memcpy(y + (m0 + m) * N + n0 + s, out + m * R, nr * sizeof(uint16_t));
        }
      }
    }
  });
}

// Rows [n0, n1) of W * S -> out (n1 - n0, K) in float32 or bf16 (rounded once from float32).
template <typename T>
void dequant_rows(const uint8_t* w, const float* scale, int64_t block_rows, int64_t K,
                  int64_t n0, int64_t n1, T* out) {
  const int64_t SK = (K + kBlockK - 1) / kBlockK;
  at::parallel_for(n0, n1, std::max<int64_t>(1, (64 << 10) / K), [&](int64_t r0, int64_t r1) {
    const Decoder dec;
    const Natural nat;
    for (int64_t n = r0; n < r1; ++n) {
      const uint8_t* wr = w + n * K;
      const float* srow = scale + (n / block_rows) * SK;
      T* o = out + (n - n0) * K;
      for (int64_t k = 0; k < K; k += 64) {
        const int64_t len = std::min<int64_t>(64, K - k);
        const __m512i bytes = _mm512_maskz_loadu_epi8((~0ull) >> (64 - len), wr + k);
        __m512i a, b;
        dec.decode(bytes, a, b);
        const __m512i halves[2] = {_mm512_permutex2var_epi16(a, nat.idx0, b),
                                   _mm512_permutex2var_epi16(a, nat.idx1, b)};
        const __m512 s = _mm512_set1_ps(srow[k / kBlockK]);  // a 64-chunk is in one block
        for (int g = 0; g < 4 && g * 16 < len; ++g) {
          const __m256i words = g % 2 == 0 ? _mm512_castsi512_si256(halves[g / 2])
                                           : _mm512_extracti64x4_epi64(halves[g / 2], 1);
          const __m512 v = _mm512_mul_ps(
              _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16)), s);
          const int64_t left = len - g * 16;
          const __mmask16 m = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
          if constexpr (std::is_same_v<T, float>) {
            _mm512_mask_storeu_ps(o + k + g * 16, m, v);
          } else {
            _mm256_mask_storeu_epi16(o + k + g * 16, m, (__m256i)_mm512_cvtneps_pbh(v));
          }
        }
      }
    }
  });
}

torch::Tensor fp8_gemv(const torch::Tensor& x, const torch::Tensor& weight,
                       const torch::Tensor& scale, int64_t block_rows,
                       const std::optional<torch::Tensor>& bias) {
  thrifty_fp8::check(x, weight, scale, block_rows, bias);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kBFloat16, "fp8_gemv: x must be bfloat16");
  const int64_t N = weight.size(0), K = weight.size(1);
  const torch::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  torch::Tensor y = torch::empty(out_shape, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const int64_t Kp = (K + 63) / 64 * 64;
  const torch::Tensor xp = permute_x(x2, Kp);
  auto xptr = reinterpret_cast<const uint16_t*>(xp.data_ptr());
  auto wp = reinterpret_cast<const uint8_t*>(weight.data_ptr());
  auto sp = scale.data_ptr<float>();
  auto bp = bias.has_value() ? reinterpret_cast<const uint16_t*>(bias->data_ptr()) : nullptr;
  auto yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  if (M == 1) {
    gemv<1>(xptr, Kp, wp, sp, block_rows, bp, yp, M, N, K);
  } else if (M == 2) {
    gemv<2>(xptr, Kp, wp, sp, block_rows, bp, yp, M, N, K);
  } else {
    gemv<4>(xptr, Kp, wp, sp, block_rows, bp, yp, M, N, K);
  }
  return y;
}

torch::Tensor fp8_dequantize(const torch::Tensor& weight, const torch::Tensor& scale,
                             int64_t block_rows, at::ScalarType dtype) {
  thrifty_fp8::check(torch::empty({weight.size(1)}), weight, scale, block_rows, std::nullopt);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16,
                    "fp8_dequantize: dtype must be float32 or bfloat16");
  const int64_t N = weight.size(0), K = weight.size(1);
  torch::Tensor out = torch::empty({N, K}, weight.options().dtype(dtype));
  if (N == 0 || K == 0) return out;
  auto wp = reinterpret_cast<const uint8_t*>(weight.data_ptr());
  if (dtype == at::kFloat) {
    dequant_rows<float>(wp, scale.data_ptr<float>(), block_rows, K, 0, N, out.data_ptr<float>());
  } else {
    dequant_rows<uint16_t>(wp, scale.data_ptr<float>(), block_rows, K, 0, N,
                           reinterpret_cast<uint16_t*>(out.data_ptr()));
  }
  return out;
}

// Large M: panels of kPanelRows rows of W dequantized into x's dtype (panel_gemm.h).
torch::Tensor fp8_gemm(const torch::Tensor& x, const torch::Tensor& weight,
                       const torch::Tensor& scale, int64_t block_rows,
                       const std::optional<torch::Tensor>& bias) {
  thrifty_fp8::check(x, weight, scale, block_rows, bias);
  const int64_t N = weight.size(0), K = weight.size(1);
  const torch::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  torch::Tensor y = torch::empty({M, N}, x.options());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (M == 0 || N == 0) return y.view(out_shape);
  auto wp = reinterpret_cast<const uint8_t*>(weight.data_ptr());
  const float* sp = scale.data_ptr<float>();
  thrifty_panel::panel_gemm(x2, bias.value_or(torch::Tensor()), y, kPanelRows,
                            [&](int64_t n0, int64_t n1, torch::Tensor& w) {
                              if (x.scalar_type() == at::kFloat) {
                                dequant_rows<float>(wp, sp, block_rows, K, n0, n1,
                                                    w.data_ptr<float>());
                              } else {
                                dequant_rows<uint16_t>(wp, sp, block_rows, K, n0, n1,
                                                       reinterpret_cast<uint16_t*>(w.data_ptr()));
                              }
                            });
  return y.view(out_shape);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp8_gemv", &fp8_gemv, "y = x @ (W * S)^T + b, bf16 x with few rows, scales in-kernel");
  m.def("fp8_gemm", &fp8_gemm, "y = x @ (W * S)^T + b, a dequantized panel of W at a time");
  m.def("fp8_dequantize", &fp8_dequantize, "W * S in float32 or bf16");
  m.attr("gemv_float32") = false;  // the GEMV takes bf16 x only
}
