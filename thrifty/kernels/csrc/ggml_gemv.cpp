// y = x @ W^T (+ b) for a GGUF weight repacked into q4 / q5 / q8 (thrifty/quant/ggml.py): per
// group of G weights along a row, w = d * q + m with float32 d, m (q8: m = 0).
//
// Few rows of x (decode): the quantized bytes are read once. Each 16 bytes of nibbles become two
// vectors of 16 integers (low nibbles: q_0..15, high: q_16..31; q5 ORs its fifth bits in under a
// 16-bit mask), converted to float and multiplied with float32 x. The block-sum trick keeps the
// inner loop to one scale per group: sum_i x_i (d q_i + m) = d sum_i x_i q_i + m sum_i x_i, with
// x's group sums computed once per call, so the result is the dequantized float32 matmul up to
// summation order. With bf16 x, q4 and q5 take AVX-512 BF16 dot products instead (see
// pair_step): half the instructions per weight. Output rows go in tiles of 16 whose bytes stay in
// cache while up to 4 rows of x at a time pass over them; the 16 row sums of a tile are reduced
// by one transpose-add. On AVX2, one row of x (batch-1 decode) goes 4 output rows at a time
// straight to y instead (gemv1_i16: the tiles cost as much again as the dot products there).
//
// The float32 path runs on AVX-512 or, built with AVX2 + FMA flags for CPUs without AVX-512, on
// two AVX2 registers per 16 lanes (vec16.h); the bf16 dot-product path needs AVX-512 BF16.
//
// Many rows of x (prefill): a panel of rows of W at a time is dequantized into x's dtype and
// handed to torch's matmul (oneDNN, AMX where the CPU has it); the whole weight never is.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include "torch_api.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "gemv_tiles.h"
#if defined(__AVX512BF16__)
#include "ggml_panels.h"
#endif
#include "linear_abi.h"
#include "panel_gemm.h"
#include "vec16.h"

namespace {

namespace V = thrifty_vec;

// kQ4P, kQ5P: q4 and q5 in panels of 16 rows (ggml_panels.h; AVX-512 BF16 builds only).
enum Format : int64_t { kQ4 = 0, kQ5 = 1, kQ8 = 2, kQ4P = 3, kQ5P = 4 };

constexpr int kMaxMB = 8;  // rows of x per pass over a tile of W: each group decoded once for them
#ifndef KAHEAD
#define KAHEAD 2048
#endif
// Bytes ahead of the ones decoded that are prefetched: one core's hardware prefetcher alone
// leaves it well short of the memory's bandwidth (rows are contiguous: past a row's end is the
// next row).
constexpr int64_t kAhead = KAHEAD;
// Rows of W dequantized at a time for large M: big enough that torch's matmul runs at speed
// (128 rows took 1.6x the time of 512 here), small enough that every thread gets a panel.
constexpr int64_t kPanelRows = 512, kMinPanelRows = 64;

// Whether this build takes float16 scales (the legacy types' own, thrifty/quant/ggml.py): the
// AVX2 build widens them with F16C as it reads them; the AVX-512 build takes float32 only (the
// loader widens them for it).
#if defined(__F16C__) && !defined(__AVX512F__)
#define THRIFTY_HALF_SCALES 1
constexpr bool kHalfScales = true;
#else
constexpr bool kHalfScales = false;
#endif

struct Layout {
  Format fmt;
  int64_t N, K, G, groups, row_bytes, scale_rows;  // scale_rows: 1 (d) or 2 (d, m) per row
  bool half;  // scales stored as float16 (kHalfScales builds only)

  int64_t scale_count() const { return scale_rows * groups; }

  // Row n's float32 scales (d, then m where the format has it) in a float32 scale tensor.
  const float* d(const float* scale, int64_t n) const { return scale + n * scale_count(); }

  // Row n's scales as float32: in place, or widened from float16 into buf (scale_count()
  // floats; unused, and may be null, for float32 scales).
  const float* d(const void* scale, int64_t n, float* buf) const {
    if (!half) return d(static_cast<const float*>(scale), n);
#if defined(THRIFTY_HALF_SCALES)
    const auto* h = static_cast<const uint16_t*>(scale) + n * scale_count();
    int64_t i = 0;
    for (; i + 8 <= scale_count(); i += 8)
      _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
    for (; i < scale_count(); ++i) buf[i] = _cvtsh_ss(h[i]);
#endif
    return buf;
  }

  // Scratch for `d` where the scales are float16: `rows` rows' worth a thread (null otherwise).
  float* scale_buf(int rows = 1) const {
    if (!half) return nullptr;
    thread_local std::vector<float> buf;
    const size_t need = static_cast<size_t>(rows * scale_count());
    if (buf.size() < need) buf.resize(need);
    return buf.data();
  }
};

// fn(std::integral_constant<int, MB>{}) for the least MB of 1, 2, 4, kMaxMB that holds mb rows:
// the row kernels are unrolled over MB rows of x.
template <typename Fn>
inline void with_rows(int mb, Fn&& fn) {
  if (mb == 1) {
    fn(std::integral_constant<int, 1>{});
  } else if (mb == 2) {
    fn(std::integral_constant<int, 2>{});
  } else if (mb <= 4) {
    fn(std::integral_constant<int, 4>{});
  } else {
    fn(std::integral_constant<int, kMaxMB>{});
  }
}

// The 16-wide chunk c of group g of one row, as floats; C chunks (16 C weights) per group.
template <Format F, int C>
inline V::f16v chunk(const uint8_t* row, int64_t g, int c) {
  if constexpr (F == kQ8) {
    return V::from_i8(row + g * 16 * C + 16 * c);
  } else {
    constexpr int64_t kBytes = F == kQ4 ? 16 : 20;
    const uint8_t* p = row + g * kBytes;
    V::mask16 five = 0;
    if constexpr (F == kQ5) {
      uint32_t high;
      std::memcpy(&high, p + 16, sizeof(high));
      five = static_cast<V::mask16>(c == 0 ? high : high >> 16);
    }
    return V::from_nibbles(p, c == 1, five);
  }
}

// a[m] += d_g * (x[m] . q over group g), the group decoded once for all mb rows of x.
template <Format F, int C, int MB>
inline void group_step(const Layout& L, const uint8_t* row, const float* drow, const float* x,
                       int mb, int64_t g, V::f16v* a) {
  const V::f16v d = V::set1(drow[g]);
  constexpr int64_t kGroupBytes = F == kQ8 ? 16 * C : (F == kQ4 ? 16 : 20);
  _mm_prefetch(reinterpret_cast<const char*>(row + g * kGroupBytes + kAhead), _MM_HINT_T0);
  V::f16v f[C];
  for (int c = 0; c < C; ++c) f[c] = chunk<F, C>(row, g, c);
  for (int m = 0; m < MB; ++m) {
    if (m >= mb) break;
    const float* xg = x + m * L.K + g * 16 * C;
    V::f16v s = V::mul(V::load(xg), f[0]);
    if constexpr (C == 2) s = V::fmadd(V::load(xg + 16), f[1], s);
    a[m] = V::fmadd(s, d, a[m]);
  }
}

// acc[m] (16 lanes whose sum is dot(x[m], row)) for m < mb, over the whole row. Even and odd
// groups go to two accumulators so that consecutive FMAs do not wait on each other.
template <Format F, int C, int MB>
inline void row_dot(const Layout& L, const uint8_t* row, const float* drow, const float* x,
                    const float* xsum, int mb, V::f16v* acc) {
  V::f16v a0[MB], a1[MB];
  for (int m = 0; m < MB; ++m) a0[m] = a1[m] = V::zero();
  int64_t g = 0;
  for (; g + 1 < L.groups; g += 2) {
    group_step<F, C, MB>(L, row, drow, x, mb, g, a0);
    group_step<F, C, MB>(L, row, drow, x, mb, g + 1, a1);
  }
  if (g < L.groups) group_step<F, C, MB>(L, row, drow, x, mb, g, a0);
  for (int m = 0; m < mb; ++m) {
    V::f16v t = V::add(a0[m], a1[m]);
    if constexpr (F != kQ8) {  // + sum_g m_g * sum(x over group g)
      const float* mrow = drow + L.groups;
      const float* xs = xsum + m * L.groups;
      for (int64_t h = 0; h < L.groups; h += 16) {
        const V::mask16 k = V::first_lanes(L.groups - h);
        t = V::fmadd(V::load(mrow + h, k), V::load(xs + h, k), t);
      }
    }
    acc[m] = t;
  }
}

#if defined(__AVX512BF16__)
// Few rows of x, bf16 (the model's dtype): q4 / q5 groups go through AVX-512 BF16 dot products,
// each q turned into the bf16 number 128 + q by ORing 0x4300 into its 16-bit word (exact for
// q < 128), so sum_i x_i (d q_i + m) = d sum_i x_i (128 + q_i) + (m - 128 d) sum_i x_i. Two
// groups A, B fill one vector: 32 bytes of nibbles widen to 32 words whose low nibbles are
// A's q_0..15 then B's q_0..15 (lanes 0-7 and 8-15 of the dot products), the high nibbles
// q_16..31; x is laid out the same way once per call (`permute_x`), so about half the
// instructions per weight of the float32 path remain.
template <Format F>
inline __m512i nibble_words(const uint8_t* row, int64_t p, bool tail) {
  if constexpr (F == kQ4) {
    const uint8_t* src = row + p * 32;
    const __m256i b = tail ? _mm256_maskz_loadu_epi8(0xFFFF, src)
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    return _mm512_cvtepu8_epi16(b);
  } else {
    const uint8_t* src = row + p * 40;
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i b = tail ? _mm_setzero_si128()
                           : _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 20));
    return _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1));
  }
}

template <Format F, int MB>
inline void pair_step(const Layout& L, const uint8_t* row, const float* drow, const uint16_t* xp,
                      int64_t Kp, int mb, int64_t p, __m512* a) {
  const bool tail = 2 * p + 1 >= L.groups;
  _mm_prefetch(reinterpret_cast<const char*>(row + p * (F == kQ4 ? 32 : 40) + kAhead), _MM_HINT_T0);
  const __m512i v = nibble_words<F>(row, p, tail);
  const __m512i magic = _mm512_set1_epi16(0x4300);
  __m512i lo = _mm512_and_si512(v, _mm512_set1_epi16(0x0F));
  __m512i hi = _mm512_srli_epi16(v, 4);
  if constexpr (F == kQ5) {  // bit j of a group's uint32: bit 4 of q_j (added: the bit is clear)
    uint32_t ha, hb = 0;
    std::memcpy(&ha, row + p * 40 + 16, 4);
    if (!tail) std::memcpy(&hb, row + p * 40 + 36, 4);
    const __m512i five = _mm512_set1_epi16(0x10);
    lo = _mm512_mask_add_epi16(lo, (ha & 0xFFFFu) | (hb << 16), lo, five);
    hi = _mm512_mask_add_epi16(hi, (ha >> 16) | (hb & 0xFFFF0000u), hi, five);
  }
  lo = _mm512_or_si512(lo, magic);
  hi = _mm512_or_si512(hi, magic);
  const __m512 d = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(drow[2 * p]),
                                        _mm512_set1_ps(tail ? 0.f : drow[2 * p + 1]));
  for (int m = 0; m < MB; ++m) {
    if (m >= mb) break;
    const uint16_t* xm = xp + m * Kp + p * 64;
    __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo,
                                (__m512bh)_mm512_loadu_si512(xm));
    s = _mm512_dpbf16_ps(s, (__m512bh)hi, (__m512bh)_mm512_loadu_si512(xm + 32));
    a[m] = _mm512_fmadd_ps(s, d, a[m]);
  }
}

template <Format F, int MB>
inline void row_dot_bf16(const Layout& L, const uint8_t* row, const float* drow,
                         const uint16_t* xp, int64_t Kp, const float* xsum, int mb, __m512* acc) {
  __m512 a0[MB], a1[MB];
  for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
  const int64_t pairs = (L.groups + 1) / 2;
  int64_t p = 0;
  for (; p + 1 < pairs; p += 2) {
    pair_step<F, MB>(L, row, drow, xp, Kp, mb, p, a0);
    pair_step<F, MB>(L, row, drow, xp, Kp, mb, p + 1, a1);
  }
  if (p < pairs) pair_step<F, MB>(L, row, drow, xp, Kp, mb, p, a0);
  const __m512 c128 = _mm512_set1_ps(128.f);
  for (int m = 0; m < mb; ++m) {
    __m512 t = _mm512_add_ps(a0[m], a1[m]);
    const float* xs = xsum + m * L.groups;
    for (int64_t h = 0; h < L.groups; h += 16) {  // + sum_g (m_g - 128 d_g) sum(x over g)
      const __mmask16 k = L.groups - h >= 16 ? 0xFFFF : (1u << (L.groups - h)) - 1;
      const __m512 off = _mm512_fnmadd_ps(c128, _mm512_maskz_loadu_ps(k, drow + h),
                                          _mm512_maskz_loadu_ps(k, drow + L.groups + h));
      t = _mm512_fmadd_ps(off, _mm512_maskz_loadu_ps(k, xs + h), t);
    }
    acc[m] = t;
  }
}

#endif  // __AVX512BF16__

template <Format F, int C, typename T>
void gemv(const Layout& L, const float* x, const float* xsum, const uint8_t* w, const void* scale,
          const T* bias, T* y, int64_t M) {
  V::gemv_tiles<kMaxMB>(L.N, L.row_bytes, bias, y, M, [&](int64_t n, int64_t m0, int mb, V::f16v* out) {
    const uint8_t* row = w + n * L.row_bytes;
    const float* xm = x + m0 * L.K;
    const float* xs = xsum + m0 * L.groups;
    const float* drow = L.d(scale, n, L.scale_buf());
    with_rows(mb, [&](auto rows) {
      row_dot<F, C, decltype(rows)::value>(L, row, drow, xm, xs, mb, out);
    });
  });
}

#if defined(__AVX512BF16__)
template <Format F>
void gemv_bf16(const Layout& L, const uint16_t* xp, int64_t Kp, const float* xsum,
               const uint8_t* w, const float* scale, const at::BFloat16* bias, at::BFloat16* y,
               int64_t M) {
  V::gemv_tiles<kMaxMB>(L.N, L.row_bytes, bias, y, M, [&](int64_t n, int64_t m0, int mb, __m512* out) {
    const uint8_t* row = w + n * L.row_bytes;
    const uint16_t* xm = xp + m0 * Kp;
    const float* xs = xsum + m0 * L.groups;
    with_rows(mb, [&](auto rows) {
      row_dot_bf16<F, decltype(rows)::value>(L, row, L.d(scale, n), xm, Kp, xs, mb, out);
    });
  });
}

#endif  // __AVX512BF16__

// Rows [n0, n1) of W -> out (n1 - n0, K), rounded once from float32 to T.
template <Format F, int C, typename T>
void dequant_rows(const Layout& L, const uint8_t* w, const void* scale, int64_t n0, int64_t n1,
                  T* out) {
  float* buf = L.scale_buf();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * L.row_bytes;
    const float* drow = L.d(scale, n, buf);
    T* o = out + (n - n0) * L.K;
    for (int64_t g = 0; g < L.groups; ++g) {
      const V::f16v d = V::set1(drow[g]);
      const V::f16v m = F == kQ8 ? V::zero() : V::set1(drow[L.groups + g]);
      for (int c = 0; c < C; ++c) {  // d q is exact: fma rounds once, as d q + m does
        V::store16(o + g * 16 * C + 16 * c, V::fmadd(chunk<F, C>(row, g, c), d, m), V::kAll);
      }
    }
  }
}

template <typename T>
void dequant_any(const Layout& L, const uint8_t* w, const void* scale, int64_t n0, int64_t n1,
                 T* out) {
  switch (L.fmt) {
    case kQ4: return dequant_rows<kQ4, 2>(L, w, scale, n0, n1, out);
    case kQ5: return dequant_rows<kQ5, 2>(L, w, scale, n0, n1, out);
    case kQ8:
      return L.G == 32 ? dequant_rows<kQ8, 2>(L, w, scale, n0, n1, out)
                       : dequant_rows<kQ8, 1>(L, w, scale, n0, n1, out);
  }
}

Layout check(const torch::Tensor& weight, const torch::Tensor& scale, int64_t fmt, int64_t G) {
  TORCH_CHECK_VALUE(weight.device().is_cpu() && scale.device().is_cpu(), "ggml: CPU tensors only");
  TORCH_CHECK_VALUE(fmt == kQ4 || fmt == kQ5 || fmt == kQ8, "ggml: unknown format ", fmt);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.is_contiguous() &&
                        weight.scalar_type() == (fmt == kQ8 ? at::kChar : at::kByte),
                    "ggml: weight must be a contiguous (N, bytes) int8 (q8) or uint8 matrix");
  TORCH_CHECK_VALUE(G == 32 || (fmt == kQ8 && G == 16), "ggml: bad group size ", G);
  const int64_t scale_rows = fmt == kQ8 ? 1 : 2;
  const bool half = scale.scalar_type() == at::kHalf;
  TORCH_CHECK_VALUE((scale.scalar_type() == at::kFloat || (half && kHalfScales)) &&
                        scale.is_contiguous() && scale.dim() == 3 &&
                        scale.size(0) == weight.size(0) && scale.size(1) == scale_rows,
                    "ggml: scale must be contiguous ", kHalfScales ? "float32 or float16" : "float32",
                    " (N, ", scale_rows, ", groups)");
  Layout L{static_cast<Format>(fmt), weight.size(0), 0, G, scale.size(2), weight.size(1),
           scale_rows, half};
  L.K = L.groups * G;
  const int64_t bytes = fmt == kQ8 ? L.K : L.groups * (fmt == kQ4 ? 16 : 20);
  TORCH_CHECK_VALUE(bytes == L.row_bytes, "ggml: weight rows of ", L.row_bytes,
                    " bytes do not hold ", L.groups, " groups");
  return L;
}

// x (..., K) and the bias (N) of a weight with K columns and N rows, in either layout.
void check_x(int64_t K, int64_t N, const torch::Tensor& x,
             const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() >= 1 && x.size(-1) == K,
                    "ggml: x is ", x.sizes(), " but the weight has ", K, " columns");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                    "ggml: x must be float32 or bfloat16");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                          bias->size(0) == N && bias->is_contiguous() && bias->device().is_cpu(),
                      "ggml: bias must be a contiguous vector of out_features in x's dtype");
  }
}

// y (M, N) in x's leading shape: y itself where x is (M, K), as in a decode step.
torch::Tensor shaped(const torch::Tensor& y, const torch::Tensor& x) {
  if (x.dim() == 2) return y;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y.size(1);
  return y.view(shape);
}

template <Format F, int C, typename T>
void run_gemv(const Layout& L, const torch::Tensor& xf, const torch::Tensor& xsum,
              const torch::Tensor& weight, const torch::Tensor& scale,
              const std::optional<torch::Tensor>& bias, torch::Tensor& y) {
  gemv<F, C, T>(L, xf.data_ptr<float>(), xsum.data_ptr<float>(),
                reinterpret_cast<const uint8_t*>(weight.data_ptr()), scale.data_ptr(),
                bias ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
                reinterpret_cast<T*>(y.data_ptr()), xf.size(0));
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// x (M, K) -> float32 (M, K) and its group sums (M, groups).
template <typename T>
void prepare_float(const Layout& L, const T* x, int64_t M, float* xf, float* xsum) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < L.groups; ++g) {
      float sum = 0.f;
      for (int64_t i = 0; i < L.G; ++i) {
        const float v = to_float(x[m * L.K + g * L.G + i]);
        xf[m * L.K + g * L.G + i] = v;
        sum += v;
      }
      xsum[m * L.groups + g] = sum;
    }
  }
}

#if defined(__AVX512BF16__)
// bf16 x (M, K) -> (M, Kp) in the word order of `nibble_words` (per pair of groups A, B:
// A 0-15, B 0-15, A 16-31, B 16-31; a missing B is zeros) and its group sums.
void permute_x(const Layout& L, const uint16_t* x, int64_t M, int64_t Kp, uint16_t* xp,
               float* xsum) {
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* dst = xp + m * Kp;
    std::memset(dst, 0, Kp * sizeof(uint16_t));
    for (int64_t g = 0; g < L.groups; ++g) {
      const uint16_t* src = x + m * L.K + g * 32;
      uint16_t* pair = dst + (g / 2) * 64 + (g % 2) * 16;
      std::memcpy(pair, src, 16 * sizeof(uint16_t));
      std::memcpy(pair + 32, src + 16, 16 * sizeof(uint16_t));
      float sum = 0.f;
      for (int i = 0; i < 32; ++i) {
        uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
        float v;
        std::memcpy(&v, &bits, sizeof(v));
        sum += v;
      }
      xsum[m * L.groups + g] = sum;
    }
  }
}

#endif  // __AVX512BF16__

// AVX2 (and, for q4 at one row of bf16 x, the AVX-512 build: see ggml_gemv): integer dot
// products. Each group of 32 values of x is rounded to int16,
// x ~ dx qx with dx = max|x| / 32767 (quantize_x: a relative step of 2^-16, finer than bf16's
// 2^-9); a group of the weight (q in 0..31 for q4 / q5, -128..127 for q8) widened to 16 bits
// and qx multiply with madd (pairs summed into int32, no overflow: 4 * 128 * 32767 < 2^31), one
// float multiply-add by d dx per group: sum_i x_i (d q_i + m) ~ d dx sum_i q_i qx_i +
// m sum_i x_i, the last with x's own float sums. Fewer instructions per weight than the float
// path (1.3-1.6x the GEMV's speed here), which this CPU's decode is bound by. (llama.cpp rounds
// x to int8 instead, for byte products: that flips SmolLM2's greedy answers here.)
// Word j of each result: 0x10 where bit j (lo) or bit 16 + j (hi) of the uint32 at p is set.
inline void fifth_bits(const uint8_t* p, __m256i& lo, __m256i& hi) {
  uint32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096,
                                        8192, 16384, static_cast<int16_t>(0x8000));
  const __m256i sixteen = _mm256_set1_epi16(0x10);
  const __m256i l = _mm256_set1_epi16(static_cast<int16_t>(bits & 0xFFFF));
  const __m256i h = _mm256_set1_epi16(static_cast<int16_t>(bits >> 16));
  lo = _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(l, bit), bit), sixteen);
  hi = _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(h, bit), bit), sixteen);
}

// Group g of one row (32 weights) as 16-bit integers: lo q_0..15, hi q_16..31.
template <Format F>
inline void group_words(const uint8_t* row, int64_t g, __m256i& lo, __m256i& hi) {
  if constexpr (F == kQ8) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + g * 32));
    lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));
    hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1));
  } else {  // each byte widened once: its low nibble is q_j, its high one q_16+j
    const uint8_t* p = row + g * (F == kQ4 ? 16 : 20);
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm256_and_si256(w, _mm256_set1_epi16(0x0F));
    hi = _mm256_srli_epi16(w, 4);
    if constexpr (F == kQ5) {
      __m256i five_lo, five_hi;
      fifth_bits(p + 16, five_lo, five_hi);
      lo = _mm256_or_si256(lo, five_lo);
      hi = _mm256_or_si256(hi, five_hi);
    }
  }
}

// A group's words dotted with 32 int16 values of x: 8 int32 lanes.
inline __m256i dot_words(__m256i lo, __m256i hi, const int16_t* xq) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
  return _mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1));
}

// Scales as float32: float32 ones as they are, float16 ones (their bits) widened as read, so
// that the GEMV reads 2 bytes a scale where the file has 2 (Layout::half).
inline float scale_at(const float* s, int64_t i) { return s[i]; }
inline float scale_at(const uint16_t* s, int64_t i) { return _cvtsh_ss(s[i]); }
inline __m256 load8_scales(const float* s) { return _mm256_loadu_ps(s); }
inline __m256 load8_scales(const uint16_t* s) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
}

// fn(the scales as const float* or as const uint16_t* (float16 bits)), as the layout says: the
// kernels below are instantiated for both.
template <typename Fn>
inline void with_scales(const Layout& L, const void* scale, Fn&& fn) {
  if (L.half) {
    fn(static_cast<const uint16_t*>(scale));
  } else {
    fn(static_cast<const float*>(scale));
  }
}

// acc + sum_g m_g * xs_g over a row's groups (the offsets m against x's own group sums), 8 groups
// a step into acc; the last groups % 8 summed into `tail`.
template <typename S>
inline __m256 add_offsets(const S* m, const float* xs, int64_t groups, __m256 acc, float& tail) {
  int64_t h = 0;
  for (; h + 8 <= groups; h += 8)
    acc = _mm256_fmadd_ps(load8_scales(m + h), _mm256_loadu_ps(xs + h), acc);
  for (; h < groups; ++h) tail += scale_at(m, h) * xs[h];
  return acc;
}

#if !defined(__AVX512F__)
// As row_dot, on quantized x (xq (mb, K); dx and xsum (mb, K / 32)); the 8 lanes go in `lo`.
// G = 16 is q8 in groups of 16 (Q6_K): each group's 16 words meet 16 values of x, whose dx is
// that of the group of 32 holding them; one madd instead of the float path's widening to 32 bits.
template <Format F, int G, int MB, typename S>
inline void row_dot_i16(const Layout& L, const uint8_t* row, const S* drow,
                        const int16_t* xq, const float* dx, const float* xsum, int mb,
                        V::f16v* acc) {
  static_assert(G == 32 || F == kQ8, "groups of 16 are q8 only");
  constexpr int64_t kGroupBytes = F == kQ8 ? G : (F == kQ4 ? 16 : 20);
  const int64_t xgroups = L.K / 32;
  // Even and odd groups into two accumulators: one chain of FMAs would wait on its latency.
  __m256 a[MB], b[MB];
  for (int m = 0; m < MB; ++m) a[m] = b[m] = _mm256_setzero_ps();
  auto step = [&](int64_t g, __m256* acc) {
    _mm_prefetch(reinterpret_cast<const char*>(row + g * kGroupBytes + kAhead), _MM_HINT_T0);
    __m256i lo, hi;  // decoded once for all mb rows of x
    if constexpr (G == 16) {
      lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 16)));
    } else {
      group_words<F>(row, g, lo, hi);
    }
    for (int m = 0; m < MB; ++m) {
      if (m >= mb) break;
      const int16_t* xg = xq + m * L.K + g * G;
      const __m256i s =
          G == 16 ? _mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg)))
                  : dot_words(lo, hi, xg);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s),
                               _mm256_set1_ps(scale_at(drow, g) * dx[m * xgroups + g * G / 32]),
                               acc[m]);
    }
  };
  int64_t g = 0;
  for (; g + 1 < L.groups; g += 2) {
    step(g, a);
    step(g + 1, b);
  }
  if (g < L.groups) step(g, a);
  for (int m = 0; m < mb; ++m) {
    __m256 off = _mm256_setzero_ps();
    if constexpr (F != kQ8) {  // + sum_g m_g * sum(x over group g)
      float tail = 0.f;
      off = add_offsets(drow + L.groups, xsum + m * xgroups, L.groups, off, tail);
      off = _mm256_add_ps(off, _mm256_setr_ps(tail, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f));
    }
    acc[m] = V::f16v{_mm256_add_ps(a[m], b[m]), off};
  }
}

template <Format F, int G, typename T>
void gemv_i16(const Layout& L, const int16_t* xq, const float* dx, const float* xsum,
              const uint8_t* w, const void* scale, const T* bias, T* y, int64_t M) {
  V::gemv_tiles<kMaxMB>(L.N, L.row_bytes, bias, y, M, [&](int64_t n, int64_t m0, int mb, V::f16v* out) {
    const uint8_t* row = w + n * L.row_bytes;
    const int16_t* xm = xq + m0 * L.K;
    const float* dm = dx + m0 * (L.K / 32);
    const float* xs = xsum + m0 * (L.K / 32);
    with_scales(L, scale, [&](const auto* sc) {
      with_rows(mb, [&](auto rows) {
        row_dot_i16<F, G, decltype(rows)::value>(L, row, sc + n * L.scale_count(), xm, dm, xs,
                                                 mb, out);
      });
    });
  });
}

#endif  // !__AVX512F__

// One row of x (batch-1 decode), R output rows at a time: each group of x is loaded once for the
// R rows, whose sums go straight to y. At K = 576 the 16-row tiles of gemv_tiles (a 16-lane
// vector per row, copied into the tile and reduced by transpose-adds) cost as much again as the
// dot products (one core, weights in cache: about 54 ns a row against 30 without them).
// Prefetching R rows' streams each a fixed distance ahead made a q8 head read from memory 0.75x
// as fast as the tiles (which read one row at a time); one stream 8 KB ahead is 1.04-1.2x, where
// 2 KB, 4 KB and 16 KB were slower and no prefetch at all 0.3-0.5x (this EPYC's hardware
// prefetcher alone falls far short). Figures: two builds timed in turns in one process.
constexpr int64_t kRowsAhead = 8192;
template <Format F, int G, int R, typename S>
inline void rows_dot_i16(const Layout& L, const uint8_t* w, const S* scale, const int16_t* xq,
                         const float* dx, const float* xsum, int64_t n, float* out) {
  static_assert(G == 32 || F == kQ8, "groups of 16 are q8 only");
  constexpr int64_t kGroupBytes = F == kQ8 ? G : (F == kQ4 ? 16 : 20);
  // The R rows are adjacent in W: one stream, prefetched kRowsAhead bytes ahead of the group
  // being read, R groups' bytes an iteration.
  const uint8_t* row[R];
  const S* d[R];
  __m256 acc[R];
  for (int r = 0; r < R; ++r) {
    row[r] = w + (n + r) * L.row_bytes;
    d[r] = scale + (n + r) * L.scale_count();
    acc[r] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < L.groups; ++g) {
    const int16_t* xg = xq + g * G;
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg));
    const __m256i x1 = G == 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 16))
                               : _mm256_setzero_si256();
    const float dxg = dx[g * G / 32];
    const uint8_t* next = row[0] + kRowsAhead + g * R * kGroupBytes;
    for (int64_t j = 0; j < R * kGroupBytes; j += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(next + j), _MM_HINT_T0);
    }
    for (int r = 0; r < R; ++r) {
      __m256i s;
      if constexpr (G == 16) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + g * 16));
        s = _mm256_madd_epi16(_mm256_cvtepi8_epi16(b), x0);
      } else {
        __m256i lo, hi;
        group_words<F>(row[r], g, lo, hi);
        s = _mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1));
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(scale_at(d[r], g) * dxg),
                               acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float tail = 0.f;
    if constexpr (F != kQ8) {  // + sum_g m_g * sum(x over group g)
      acc[r] = add_offsets(d[r] + L.groups, xsum, L.groups, acc[r], tail);
    }
    out[r] = V::reduce8_add(acc[r]) + tail;
  }
}

template <Format F, int G, typename T>
void gemv1_i16(const Layout& L, const int16_t* xq, const float* dx, const float* xsum,
               const uint8_t* w, const void* scale, const T* bias, T* y) {
  constexpr int R = 4;
  const int64_t blocks = (L.N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, (16 << 10) / (R * L.row_bytes));  // ~16 KB a task
  // The scales are a second stream. Float32 ones (the K-quants': a quarter to a third of the
  // bytes) are prefetched as far ahead in rows as the weights: 1.07-1.22x on Qwen's ffn_down
  // (Q6_K, Q4_K) from memory. Float16 ones are not: no faster, or slightly slower.
  const int64_t scale_bytes = R * L.scale_count() * 4;
  const bool prefetch_scales = !L.half;
  const int64_t rows_ahead = kRowsAhead / L.row_bytes;
  with_scales(L, scale, [&](const auto* sc) {
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b * R;
        if (prefetch_scales && n + rows_ahead < L.N) {
          const auto* ahead = reinterpret_cast<const char*>(sc + (n + rows_ahead) * L.scale_count());
          for (int64_t j = 0; j < scale_bytes; j += 64) _mm_prefetch(ahead + j, _MM_HINT_T0);
        }
        const int rows = static_cast<int>(std::min<int64_t>(R, L.N - n));
        float sums[R];
        if (rows == R) {
          rows_dot_i16<F, G, R>(L, w, sc, xq, dx, xsum, n, sums);
        } else {
          for (int r = 0; r < rows; ++r) rows_dot_i16<F, G, 1>(L, w, sc, xq, dx, xsum, n + r, sums + r);
        }
        for (int r = 0; r < rows; ++r) {
          y[n + r] = static_cast<T>(bias ? sums[r] + to_float(bias[n + r]) : sums[r]);
        }
      }
    });
  });
}

// 8 values of x as float32.
inline __m256 load8(const float* p) { return V::load8(p); }
inline __m256 load8(const at::BFloat16* p) { return V::load8(reinterpret_cast<const uint16_t*>(p)); }

// x (M, K) -> int16 qx (M, K), dx (M, groups of 32) and x's float sums per group (M, groups):
// dx = max|x| / 32767, qx = x * (1 / dx) rounded half to even (0 for an all-zero group), as
// thrifty.kernels.ggml.reference_quantize_x computes them (the sums in another order). Vectorized
// and over the threads: one scalar pass on one core was about 3% of a batch-32 decode step.
template <typename T>
void quantize_x(const T* x, int64_t M, int64_t K, int16_t* xq, float* dx, float* xsum) {
  at::parallel_for(0, M * (K / 32), 256, [&](int64_t i0, int64_t i1) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256i lo = _mm256_set1_epi32(-32767), hi = _mm256_set1_epi32(32767);
    for (int64_t i = i0; i < i1; ++i) {
      const T* src = x + i * 32;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = load8(src + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
      }
      const float d = V::reduce8_max(amax) / 32767.f, id = d > 0.f ? 1.f / d : 0.f;
      const __m256 inv = _mm256_set1_ps(id);
      __m256i q[4];  // cvtps rounds half to even (the default MXCSR), as nearbyint does
      for (int j = 0; j < 4; ++j) {
        q[j] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv)), lo), hi);
      }
      // packs works per 128-bit lane: (q0 lo, q1 lo, q0 hi, q1 hi) -> put q0 before q1.
      const __m256i p0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
      const __m256i p1 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + i * 32), p0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + i * 32 + 16), p1);
      dx[i] = d;
      xsum[i] = V::reduce8_add(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    }
  });
}

#if !defined(__AVX512F__)
#include "ggml_gemm_i16.h"  // the int16 path blocked for many rows of x
#endif

// The weight's format as template arguments, for the int16 kernels.
template <Format F, int G>
struct FormatTag {
  static constexpr Format format = F;
  static constexpr int group = G;
};

// x2 (M, K) rounded to int16 (quantize_x: qx, dx, and x's float sums xsum, M x groups), then
// kernel(FormatTag, qx, dx, xsum, bias, y) for the weight's format and x's dtype: what the
// GEMV's and the int16 GEMM's int16 paths share.
template <typename Kernel>
void on_int16_x(const Layout& L, const torch::Tensor& x2, const std::optional<torch::Tensor>& bias,
                torch::Tensor& y, int64_t fmt, int64_t G, const Kernel& kernel) {
  const int64_t M = x2.size(0);
  // One scratch allocation per call (the decode step makes ~120 of these calls): dx, the sums,
  // then qx.
  torch::Tensor scratch =
      torch::empty({M * L.groups * 8 + M * L.K * 2}, x2.options().dtype(at::kByte));
  auto dp = reinterpret_cast<float*>(scratch.data_ptr());
  float* xsum = dp + M * L.groups;
  auto qp = reinterpret_cast<int16_t*>(xsum + M * L.groups);
  auto run = [&](const auto* xp, const auto* bp, auto* yp) {
    quantize_x(xp, M, L.K, qp, dp, xsum);
    if (fmt == kQ4) kernel(FormatTag<kQ4, 32>{}, qp, dp, xsum, bp, yp);
    else if (fmt == kQ5) kernel(FormatTag<kQ5, 32>{}, qp, dp, xsum, bp, yp);
    else if (G == 32) kernel(FormatTag<kQ8, 32>{}, qp, dp, xsum, bp, yp);
    else kernel(FormatTag<kQ8, 16>{}, qp, dp, xsum, bp, yp);
  };
  if (x2.scalar_type() == at::kBFloat16) {
    using B = at::BFloat16;
    run(reinterpret_cast<const B*>(x2.data_ptr()),
        bias ? reinterpret_cast<const B*>(bias->data_ptr()) : nullptr,
        reinterpret_cast<B*>(y.data_ptr()));
  } else {
    run(x2.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>());
  }
}

torch::Tensor ggml_gemv(const torch::Tensor& x, const torch::Tensor& weight,
                        const torch::Tensor& scale, const std::optional<torch::Tensor>& bias,
                        int64_t fmt, int64_t G) {
  const Layout L = check(weight, scale, fmt, G);
  check_x(L.K, L.N, x, bias);
  const torch::Tensor x2 = x.reshape({-1, L.K}).contiguous();
  const int64_t M = x2.size(0);
  torch::Tensor y = torch::empty({M, L.N}, x.options());
  if (M == 0 || L.N == 0) return shaped(y, x);
  const auto opts = x.options().dtype(at::kFloat);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  auto wp = reinterpret_cast<const uint8_t*>(weight.data_ptr());
  // Integer dot products on x rounded to int16 (quantize_x): on AVX2 every format (K in groups
  // of 32); in the AVX-512 build, q4 at one row of bf16 x (AVX2 instructions; the offsets and the
  // rounding of x as on AVX2), which on a Zen 5 ran 1.0-1.6x the speed of the BF16 dot products
  // (Q4_K 896 x 4864: 18 -> 27-29 GB/s from memory, two threads), where for q5 and q8 the
  // AVX-512 paths are as fast or faster. (Measured, not derived: the pair path has fewer
  // instructions per weight.)
#if defined(__AVX512F__)
  const bool int16_x = bf16 && fmt == kQ4 && M == 1;
#else
  const bool int16_x = G == 32 || L.K % 32 == 0;
#endif
  if (int16_x) {
    const void* sc = scale.data_ptr();
    on_int16_x(L, x2, bias, y, fmt, G,
               [&](auto f, const int16_t* qp, const float* dp, const float* sp, const auto* bp,
                   auto* yp) {
                 using Tag = decltype(f);
#if !defined(__AVX512F__)  // the AVX-512 build takes one row only
                 if (M > 1) {
                   gemv_i16<Tag::format, Tag::group>(L, qp, dp, sp, wp, sc, bp, yp, M);
                   return;
                 }
#endif
                 gemv1_i16<Tag::format, Tag::group>(L, qp, dp, sp, wp, sc, bp, yp);
               });
    return shaped(y, x);
  }
#if defined(__AVX512BF16__)
  if (bf16 && fmt != kQ8) {  // AVX-512 BF16 dot products over the nibbles (pair_step)
    torch::Tensor xsum = torch::empty({M, L.groups}, opts);
    const int64_t Kp = (L.groups + 1) / 2 * 64;
    torch::Tensor xp = torch::empty({M, Kp}, x.options());
    auto xpp = reinterpret_cast<uint16_t*>(xp.data_ptr());
    permute_x(L, reinterpret_cast<const uint16_t*>(x2.data_ptr()), M, Kp, xpp,
              xsum.data_ptr<float>());
    auto bp = bias ? reinterpret_cast<const at::BFloat16*>(bias->data_ptr()) : nullptr;
    auto yp = reinterpret_cast<at::BFloat16*>(y.data_ptr());
    if (fmt == kQ4) {
      gemv_bf16<kQ4>(L, xpp, Kp, xsum.data_ptr<float>(), wp, scale.data_ptr<float>(), bp, yp, M);
    } else {
      gemv_bf16<kQ5>(L, xpp, Kp, xsum.data_ptr<float>(), wp, scale.data_ptr<float>(), bp, yp, M);
    }
    return shaped(y, x);
  }
#endif
  torch::Tensor xsum = torch::empty({M, L.groups}, opts);
  torch::Tensor xf = torch::empty({M, L.K}, opts);
  if (bf16) {
    prepare_float(L, reinterpret_cast<const at::BFloat16*>(x2.data_ptr()), M,
                  xf.data_ptr<float>(), xsum.data_ptr<float>());
  } else {
    prepare_float(L, x2.data_ptr<float>(), M, xf.data_ptr<float>(), xsum.data_ptr<float>());
  }
  if (fmt == kQ4) {
    bf16 ? run_gemv<kQ4, 2, at::BFloat16>(L, xf, xsum, weight, scale, bias, y)
         : run_gemv<kQ4, 2, float>(L, xf, xsum, weight, scale, bias, y);
  } else if (fmt == kQ5) {
    bf16 ? run_gemv<kQ5, 2, at::BFloat16>(L, xf, xsum, weight, scale, bias, y)
         : run_gemv<kQ5, 2, float>(L, xf, xsum, weight, scale, bias, y);
  } else if (G == 32) {
    bf16 ? run_gemv<kQ8, 2, at::BFloat16>(L, xf, xsum, weight, scale, bias, y)
         : run_gemv<kQ8, 2, float>(L, xf, xsum, weight, scale, bias, y);
  } else {
    bf16 ? run_gemv<kQ8, 1, at::BFloat16>(L, xf, xsum, weight, scale, bias, y)
         : run_gemv<kQ8, 1, float>(L, xf, xsum, weight, scale, bias, y);
  }
  return shaped(y, x);
}

template <typename T>
void dequant_into(const Layout& L, const torch::Tensor& weight, const torch::Tensor& scale,
                  int64_t n0, int64_t n1, torch::Tensor& out) {
  dequant_any<T>(L, reinterpret_cast<const uint8_t*>(weight.data_ptr()), scale.data_ptr(),
                 n0, n1, reinterpret_cast<T*>(out.data_ptr()));
}

// Large M: panels of up to kPanelRows rows of W dequantized into x's dtype (panel_gemm.h).
torch::Tensor ggml_gemm(const torch::Tensor& x, const torch::Tensor& weight,
                        const torch::Tensor& scale, const std::optional<torch::Tensor>& bias,
                        int64_t fmt, int64_t G) {
  const Layout L = check(weight, scale, fmt, G);
  check_x(L.K, L.N, x, bias);
  const torch::Tensor x2 = x.reshape({-1, L.K}).contiguous();
  const int64_t M = x2.size(0);
  torch::Tensor y = torch::empty({M, L.N}, x.options());
  if (M == 0 || L.N == 0) return shaped(y, x);
  const int64_t rows = thrifty_panel::panel_rows(L.N, kMinPanelRows, kPanelRows);
  thrifty_panel::panel_gemm(x2, bias.value_or(torch::Tensor()), y, rows,
                            [&](int64_t n0, int64_t n1, torch::Tensor& w) {
                              if (x.scalar_type() == at::kFloat) {
                                dequant_into<float>(L, weight, scale, n0, n1, w);
                              } else {
                                dequant_into<at::BFloat16>(L, weight, scale, n0, n1, w);
                              }
                            });
  return shaped(y, x);
}

#if !defined(__AVX512F__)
// Many rows of x, x rounded to int16 as the GEMV rounds it: ggml_gemm_i16.h.
torch::Tensor ggml_gemm_i16(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& scale, const std::optional<torch::Tensor>& bias,
                            int64_t fmt, int64_t G) {
  const Layout L = check(weight, scale, fmt, G);
  check_x(L.K, L.N, x, bias);
  TORCH_CHECK(L.K % 32 == 0, "the int16 GEMM needs K a multiple of 32");
  const torch::Tensor x2 = x.reshape({-1, L.K}).contiguous();
  const int64_t M = x2.size(0);
  torch::Tensor y = torch::empty({M, L.N}, x.options());
  if (M == 0 || L.N == 0) return shaped(y, x);
  auto wp = reinterpret_cast<const uint8_t*>(weight.data_ptr());
  const void* sc = scale.data_ptr();
  on_int16_x(L, x2, bias, y, fmt, G,
             [&](auto f, const int16_t* qp, const float* dp, const float* sp, const auto* bp,
                 auto* yp) {
               using Tag = decltype(f);
               ggml_i16::gemm<Tag::format, Tag::group>(L, qp, dp, sp, wp, sc, bp, yp, M);
             });
  return shaped(y, x);
}
#endif

// Rows `ids` of W, dequantized into `dtype` (the token embedding of a quantized table).
torch::Tensor ggml_rows(const torch::Tensor& weight, const torch::Tensor& scale,
                        const torch::Tensor& ids, int64_t fmt, int64_t G, at::ScalarType dtype) {
  const Layout L = check(weight, scale, fmt, G);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16,
                    "ggml_rows: dtype must be float32 or bfloat16");
  const torch::Tensor flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t T = flat.size(0);
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(L.K);
  torch::Tensor out = torch::empty({T, L.K}, weight.options().dtype(dtype));
  const int64_t* idp = flat.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_INDEX(idp[t] >= 0 && idp[t] < L.N, "ggml_rows: id ", idp[t], " out of range");
  }
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      torch::Tensor row = out.narrow(0, t, 1);
      if (dtype == at::kFloat) {
        dequant_into<float>(L, weight, scale, idp[t], idp[t] + 1, row);
      } else {
        dequant_into<at::BFloat16>(L, weight, scale, idp[t], idp[t] + 1, row);
      }
    }
  });
  return out.view(shape);
}

torch::Tensor ggml_dequantize(const torch::Tensor& weight, const torch::Tensor& scale, int64_t fmt,
                              int64_t G, at::ScalarType dtype) {
  const Layout L = check(weight, scale, fmt, G);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16,
                    "ggml_dequantize: dtype must be float32 or bfloat16");
  torch::Tensor out = torch::empty({L.N, L.K}, weight.options().dtype(dtype));
  at::parallel_for(0, L.N, 64, [&](int64_t n0, int64_t n1) {
    torch::Tensor part = out.narrow(0, n0, n1 - n0);
    if (dtype == at::kFloat) {
      dequant_into<float>(L, weight, scale, n0, n1, part);
    } else {
      dequant_into<at::BFloat16>(L, weight, scale, n0, n1, part);
    }
  });
  return out;
}

// Up to this many rows of x the GEMV beats the next path (benchmarks/gguf_native.py
// --crossover): on AVX-512 (bf16 x; dequantize + oneDNN, with AMX, beyond) at 8, on most weight
// shapes of SmolLM2 and Qwen2.5-0.5B; on AVX2 (x rounded to int16) at 8, beyond which its int16
// GEMM, blocked for registers, takes over up to kI16Rows rows, and dequantize + torch's float32
// matmul (at the 2-core EPYC's FMA peak) beyond that (benchmarks/results/gguf_crossover_avx2.md).
constexpr int64_t kGemvRows = 8;
#if defined(__AVX512F__)
constexpr int64_t kI16Rows = 0;
#else
constexpr int64_t kI16Rows = 64;
#endif

#if defined(__AVX512BF16__)
// Up to this many rows of x the panel kernel; beyond, dequantized panels through torch's matmul
// (oneDNN). On the Zen 5, against dequantizing for every row count: 1.15-1.22x at 48 rows,
// 1.04-1.15x at 64; the panel kernel at 128 rows 0.82-0.87x (Qwen's and SmolLM2's q4 / q5).
constexpr int64_t kPanelGemmRows = 64;
// y = x @ W^T + b for bf16 x and a weight in panels (ggml_panels.h): (panels, groups * 256 or
// 320) bytes, scale float32 (panels, groups, 2, 16) of d and m.
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& weight,
                           const torch::Tensor& scale, const std::optional<torch::Tensor>& bias,
                           int64_t fmt) {
  namespace P = ggml_panels;
  TORCH_CHECK_VALUE(weight.device().is_cpu() && scale.device().is_cpu(), "ggml: CPU tensors only");
  const bool half = scale.scalar_type() == at::kHalf;
  TORCH_CHECK_VALUE((half || scale.scalar_type() == at::kFloat) && scale.dim() == 4 &&
                        scale.is_contiguous() && scale.size(2) == 2 && scale.size(3) == P::kRows,
                    "ggml: panel scales must be contiguous float32 or float16 (panels, groups, 2, "
                    "16)");
  const P::Panels L{fmt == kQ5P, scale.size(0), scale.size(1), scale.size(1) * 32};
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kByte && weight.dim() == 2 &&
                        weight.is_contiguous() && weight.size(0) == L.panels &&
                        weight.size(1) == L.groups * L.group_bytes(),
                    "ggml: a weight in panels must be contiguous uint8 (panels, groups * ",
                    L.group_bytes(), ")");
  const int64_t N = L.panels * P::kRows;
  check_x(L.K, N, x, bias);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kBFloat16, "ggml: a weight in panels takes bf16 x");
  const torch::Tensor x2 = x.reshape({-1, L.K}).contiguous();
  const int64_t M = x2.size(0);
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return shaped(y, x);
  torch::Tensor xsum = torch::empty({M, L.groups}, x.options().dtype(at::kFloat));
  auto xp = reinterpret_cast<const uint16_t*>(x2.data_ptr());
  auto wp = reinterpret_cast<const uint8_t*>(weight.data_ptr());
  auto bp = bias ? reinterpret_cast<const uint16_t*>(bias->data_ptr()) : nullptr;
  auto yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  auto run = [&](const auto* sp) {
    using S = std::remove_cv_t<std::remove_pointer_t<decltype(sp)>>;
    if (M > kPanelGemmRows) {  // prefill: dequantized panels through torch's matmul
      const int64_t rows = thrifty_panel::panel_rows(N, kMinPanelRows, kPanelRows);
      thrifty_panel::panel_gemm(x2, bias.value_or(torch::Tensor()), y, rows,
                                [&](int64_t n0, int64_t n1, torch::Tensor& w) {
                                  auto out = reinterpret_cast<uint16_t*>(w.data_ptr());
                                  const int64_t q0 = n0 / P::kRows, q1 = n1 / P::kRows;
                                  if (L.q5) {
                                    P::dequant<true, S>(L, wp, sp, q0, q1, out);
                                  } else {
                                    P::dequant<false, S>(L, wp, sp, q0, q1, out);
                                  }
                                });
      return;
    }
    P::group_sums(xp, M, L.K, xsum.data_ptr<float>());
    if (L.q5) {
      P::gemm<true, S>(L, wp, sp, xp, xsum.data_ptr<float>(), M, bp, yp);
    } else {
      P::gemm<false, S>(L, wp, sp, xp, xsum.data_ptr<float>(), M, bp, yp);
    }
  };
  if (half) {
    run(reinterpret_cast<const uint16_t*>(scale.data_ptr()));
  } else {
    run(scale.data_ptr<float>());
  }
  return shaped(y, x);
}
// A row-major q4 / q5 weight's bytes in panels (ggml_panels.h; the scales are the caller's).
torch::Tensor ggml_to_panels(const torch::Tensor& weight, int64_t fmt) {
  const int64_t group_bytes = fmt == kQ5 ? 20 : 16;
  TORCH_CHECK_VALUE((fmt == kQ4 || fmt == kQ5) && weight.device().is_cpu() &&
                        weight.scalar_type() == at::kByte && weight.dim() == 2 &&
                        weight.is_contiguous() && weight.size(0) % ggml_panels::kRows == 0 &&
                        weight.size(1) % group_bytes == 0,
                    "ggml: only contiguous q4 / q5 weights with rows in sixteens go in panels");
  const int64_t N = weight.size(0), groups = weight.size(1) / group_bytes;
  const ggml_panels::Panels P{fmt == kQ5, N / ggml_panels::kRows, groups, groups * 32};
  torch::Tensor out = torch::empty({P.panels, P.groups * P.group_bytes()}, weight.options());
  ggml_panels::to_panels(reinterpret_cast<const uint8_t*>(weight.data_ptr()), N, groups, P.q5,
                         reinterpret_cast<uint8_t*>(out.data_ptr()));
  return out;
}
#endif

// The path for x's row count: what a Linear calls, from Python or from the decode layer loop.
torch::Tensor ggml_linear(const torch::Tensor& x, const torch::Tensor& weight,
                          const torch::Tensor& scale, const std::optional<torch::Tensor>& bias,
                          int64_t fmt, int64_t G) {
#if defined(__AVX512BF16__)
  if (fmt == kQ4P || fmt == kQ5P) return panel_linear(x, weight, scale, bias, fmt);
#endif
  const int64_t K = x.size(-1), M = K > 0 ? x.numel() / K : 0;
  if (M <= kGemvRows) return ggml_gemv(x, weight, scale, bias, fmt, G);
#if !defined(__AVX512F__)
  if (M <= kI16Rows && K % 32 == 0) return ggml_gemm_i16(x, weight, scale, bias, fmt, G);
#endif
  return ggml_gemm(x, weight, scale, bias, fmt, G);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ggml_linear", &ggml_linear, "y = x @ W^T + b, the GEMV or a GEMM by x's row count");
  m.attr("linear_capsule") = py::capsule(
      reinterpret_cast<void*>(static_cast<thrifty_abi::LinearFn>(&ggml_linear)),
      thrifty_abi::kLinearCapsule);
  m.attr("rows_capsule") =
      py::capsule(reinterpret_cast<void*>(static_cast<thrifty_abi::RowsFn>(&ggml_rows)),
                  thrifty_abi::kRowsCapsule);
  m.attr("gemv_rows") = kGemvRows;
  m.attr("half_scales") = kHalfScales;
  m.attr("i16_rows") = kI16Rows;
#if defined(__AVX512BF16__)
  m.attr("panels") = true;  // q4 / q5 in panels of 16 rows, for bf16 x
  m.def("ggml_to_panels", &ggml_to_panels, "a q4 / q5 weight's bytes in panels of 16 rows");
#else
  m.attr("panels") = false;
#endif
  m.def("ggml_gemv", &ggml_gemv, "y = x @ W^T + b, few rows of x, W read once, quantized");
  m.def("ggml_gemm", &ggml_gemm, "y = x @ W^T + b, a dequantized panel of W at a time");
  m.def("ggml_rows", &ggml_rows, "rows ids of W, dequantized");
  m.def("ggml_dequantize", &ggml_dequantize, "W dequantized to float32 or bf16");
#if defined(__AVX512F__)
  m.attr("quantizes_x") = false;
  m.attr("quantizes_q4_one_row") = true;  // bf16 x, see ggml_gemv
#else
  m.attr("quantizes_x") = true;  // the GEMV's x is rounded to int16 per group of 32
  m.def("ggml_gemm_i16", &ggml_gemm_i16, "y = x @ W^T + b, many rows, x rounded to int16");
#endif
}
