// y = x @ (W * S)^T (+ b) for bf16 x (M, K) and an FP8 (E4M3) weight W packed in panels of 16
// rows at load (kernels/fp8.py pack), float32 block scales S (one per block_rows x 128 block).
//
// Packed layout: (N / 16, K / 4, 64) bytes. Chunk c of panel p holds columns 4c .. 4c + 3 of its
// 16 rows: byte 2w + 1 is W[16p + w / 2, 4c + w % 2] and byte 2w is W[16p + w / 2, 4c + 2 + w % 2]
// (w = 0 .. 31). Read as 32 words, the high bytes are one pair-row of bf16's packed layout
// (word 2i + e: row i, column 4c + e) and the low bytes the next (columns 4c + 2, 4c + 3).
//
// Decode, no lookups: an E4M3 byte s.eeee.mmm in the high byte of a word, shifted right by 4
// (arithmetic, so the sign fills bits 15..11) and masked with 0x87F0, is the bf16 s.0000eeee.mmm0000:
// E4M3's exponent field as bf16's, i.e. the value times 2^-120. A low byte is first moved up by a
// byte shuffle. Two shifts, one shuffle and two ANDs per 64 weights, then two vdpbf16ps against
// x's column pairs broadcast; the 16 lanes are the panel's 16 outputs, so no horizontal sums.
// The 2^-120 is paid back on x: x is multiplied by 2^a (a = 120 unless x's largest |x| would
// overflow bf16; exact, a power of two) so that products are x * w at their true size, and the
// result by 2^(120 - a). The block scale multiplies each 128-column block's partial sums.
// vdpbf16ps treats denormal inputs as zero: E4M3's subnormals (|q| <= 7 * 2^-9, bf16 denormals
// here) count as 0, an error of at most 2^-6 * scale * |x| per such weight (about 1 in 10^4 of
// a quantized weight's values); tests/test_fp8_kernels.py states the bound. NaN bytes (0x7F)
// would decode as finite: quantized weights hold none, and pack() refuses them.
//
// Few rows (decode): MR rows of x times NR panels of partial sums in registers, the panels read
// side by side with a software prefetch ahead of each stream (measured 10-15% faster from DRAM on
// a Xeon). Many rows, where AMX is there: each thread dequantizes two panels at a time into bf16
// (scale applied: q * s, exact for UE8M0 scales) in exactly the layout amx_gemm.cpp's B tiles
// read, and multiplies them on the tiles (the blocking of amx_gemm.cpp).

#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include "torch_api.h"
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kPanel = 16;                 // output rows per panel
constexpr int kBlockK = 128;               // columns per scale block
constexpr int kChunkCols = 4;              // columns per 64-byte chunk
constexpr int kChunksPerBlock = kBlockK / kChunkCols;
constexpr int kNR = 4, kMaxMR = 4;         // panels x rows of x per micro-kernel
constexpr int kPrefetch = 16;              // chunks (1 KB) ahead on each panel's stream
constexpr int64_t kGrainBytes = 32 << 10;  // below this much W per thread, stay on one thread

struct Decoder {
  const __m512i mask = _mm512_set1_epi16(static_cast<short>(0x87F0));
  __m512i up;  // byte shuffle: each word's low byte to its high byte, zero below
  Decoder() {
    alignas(64) int8_t idx[64];
    for (int j = 0; j < 64; ++j) idx[j] = j % 2 ? static_cast<int8_t>(j % 16 - 1) : -128;
    up = _mm512_load_si512(idx);
  }
  // 64 packed bytes -> two pair-rows of 32 bf16, each value q * 2^-120.
  inline void decode(__m512i in, __m512i& hi, __m512i& lo) const {
    hi = _mm512_and_si512(_mm512_srai_epi16(in, 4), mask);
    lo = _mm512_and_si512(_mm512_srai_epi16(_mm512_shuffle_epi8(in, up), 4), mask);
  }
};

inline __m512bh broadcast_pair(const uint16_t* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}

// acc[m * NR * 16 + r * 16 + i] += sum over K of x[m] * W[panel r, row i] * S, for MR rows of x
// (row stride K) and NR panels starting at w (pstride bytes apart); srow[r]: panel r's scales.
// One row of x: the two pair-rows of a chunk go to separate sums, so that four panels give eight
// independent chains of vdpbf16ps rather than four chains twice as long.
template <int MR, int NR>
inline void micro(const Decoder& dec, const uint16_t* x, int64_t K, const uint8_t* w,
                  int64_t pstride, const float* const* srow, float* acc) {
  constexpr bool kSplit = MR == 1;
  const int64_t chunks = K / kChunkCols;
  for (int64_t c0 = 0, kb = 0; c0 < chunks; c0 += kChunksPerBlock, ++kb) {
    const int64_t c1 = std::min<int64_t>(chunks, c0 + kChunksPerBlock);
    __m512 t[MR][NR], u[kSplit ? NR : 1];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) t[m][r] = _mm512_setzero_ps();
    if constexpr (kSplit)
      for (int r = 0; r < NR; ++r) u[r] = _mm512_setzero_ps();
    for (int64_t c = c0; c < c1; ++c) {
      __m512bh xh[MR], xl[MR];
      for (int m = 0; m < MR; ++m) {
        xh[m] = broadcast_pair(x + m * K + kChunkCols * c);
        xl[m] = broadcast_pair(x + m * K + kChunkCols * c + 2);
      }
      for (int r = 0; r < NR; ++r) {
        const uint8_t* p = w + r * pstride + c * 64;
        _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch * 64), _MM_HINT_T0);
        __m512i hi, lo;
        dec.decode(_mm512_loadu_si512(p), hi, lo);
        for (int m = 0; m < MR; ++m) {
          t[m][r] = _mm512_dpbf16_ps(t[m][r], xh[m], (__m512bh)hi);
          if constexpr (kSplit) {
            u[r] = _mm512_dpbf16_ps(u[r], xl[m], (__m512bh)lo);
          } else {
            t[m][r] = _mm512_dpbf16_ps(t[m][r], xl[m], (__m512bh)lo);
          }
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 s = _mm512_set1_ps(srow[r][kb]);
      for (int m = 0; m < MR; ++m) {
        const __m512 sum = kSplit ? _mm512_add_ps(t[m][r], u[r]) : t[m][r];
        float* a = acc + (m * NR + r) * kPanel;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(sum, s, _mm512_loadu_ps(a)));
      }
    }
  }
}

template <int NR>
void micro_rows(int mr, const Decoder& dec, const uint16_t* x, int64_t K, const uint8_t* w,
                int64_t pstride, const float* const* srow, float* acc) {
  switch (mr) {
    case 1: return micro<1, NR>(dec, x, K, w, pstride, srow, acc);
    case 2: return micro<2, NR>(dec, x, K, w, pstride, srow, acc);
    case 3: return micro<3, NR>(dec, x, K, w, pstride, srow, acc);
    default: return micro<4, NR>(dec, x, K, w, pstride, srow, acc);
  }
}

inline __m512 load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// y = bf16(v * post + bias), 16 outputs (round to nearest even, as a float -> bf16 cast does).
inline void store16(uint16_t* y, __m512 v, float post, const uint16_t* bias) {
  v = _mm512_mul_ps(v, _mm512_set1_ps(post));
  if (bias != nullptr) v = _mm512_add_ps(v, load_bf16(bias));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(v));
}

// x * 2^a in bf16 (exact: a power of two, kept in range), and a: 120, or less where max |x|
// would overflow. NaN or inf in x leaves a at 120 (they stay what they are).
int scale_x(const uint16_t* x, int64_t n, uint16_t* out) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load_bf16(x + i)));
  float amax = _mm512_reduce_max_ps(vmax);
  for (; i < n; ++i) {
    uint32_t bits = static_cast<uint32_t>(x[i] & 0x7FFF) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    amax = std::max(amax, f);
  }
  int e = 0;
  std::frexp(amax, &e);  // amax < 2^e
  const int a = std::isfinite(amax) && amax > 0 ? std::min(120, 127 - e) : 120;
  const __m512 f = _mm512_set1_ps(std::ldexp(1.0f, a));
  for (i = 0; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_mul_ps(load_bf16(x + i), f);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(v));
  }
  for (; i < n; ++i) {
    uint32_t bits = static_cast<uint32_t>(x[i]) << 16;
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    v = std::ldexp(v, a);
    std::memcpy(&bits, &v, sizeof(v));
    out[i] = static_cast<uint16_t>(bits >> 16);  // exact: no rounding needed
  }
  return a;
}

void gemv(const uint16_t* x, const uint8_t* w, const float* scale, int64_t block_rows,
          const uint16_t* bias, uint16_t* y, int64_t M, int64_t N, int64_t K, float post) {
  const int64_t panels = N / kPanel, pstride = kPanel * K, SK = (K + kBlockK - 1) / kBlockK;
  const int64_t groups = (panels + kNR - 1) / kNR;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / (kNR * pstride));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const Decoder dec;
    alignas(64) float acc[kMaxMR * kNR * kPanel];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t p0 = g * kNR;
      const int nr = static_cast<int>(std::min<int64_t>(kNR, panels - p0));
      const float* srow[kNR];
      for (int r = 0; r < kNR; ++r)
        srow[r] = scale + ((p0 + std::min(r, nr - 1)) * kPanel / block_rows) * SK;
      const uint8_t* wp = w + p0 * pstride;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMaxMR, M - m0));
        std::fill(acc, acc + mr * nr * kPanel, 0.0f);
        const uint16_t* xm = x + m0 * K;
        switch (nr) {
          case 1: micro_rows<1>(mr, dec, xm, K, wp, pstride, srow, acc); break;
          case 2: micro_rows<2>(mr, dec, xm, K, wp, pstride, srow, acc); break;
          case 3: micro_rows<3>(mr, dec, xm, K, wp, pstride, srow, acc); break;
          default: micro_rows<4>(mr, dec, xm, K, wp, pstride, srow, acc); break;
        }
        for (int m = 0; m < mr; ++m)
          for (int r = 0; r < nr; ++r)
            store16(y + (m0 + m) * N + (p0 + r) * kPanel, _mm512_loadu_ps(acc + (m * nr + r) * kPanel),
                    post, bias == nullptr ? nullptr : bias + (p0 + r) * kPanel);
      }
    }
  });
}

// ---- AMX: dequantize two panels to bf16, multiply on the tiles ------------------------------

constexpr int kTileK = 32;                      // bf16 columns per A tile row (64 bytes)
constexpr long kArchReqXcompPerm = 0x1023;      // arch_prctl: ask for an extended state component
constexpr long kXfeatureXtiledata = 18;         // the AMX tile data

bool amx_available() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
    return tile && bf16 && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {  // tmm0-3: C (16 x 16 fp32), tmm4-5: A (16 x 32 bf16), tmm6-7: B (16 pair-rows)
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = kPanel;
    }
  }
};

// Panel p of the packed weight -> out (Kt / 2 pair-rows of 32 bf16): W * S rounded once to bf16
// (exact for power-of-two scales); pair-rows past K are zero.
void dequant_panel(const Decoder& dec, const uint8_t* w, const float* srow, int64_t K, int64_t Kt,
                   uint16_t* out) {
  const __m512 unbias = _mm512_set1_ps(0x1p120f);
  auto store = [&](uint16_t* o, __m512i v, __m512 s) {  // 32 bf16 (q * 2^-120) -> q * s
    const __m512 lo = load_bf16(reinterpret_cast<const uint16_t*>(&v));
    const __m512 hi = load_bf16(reinterpret_cast<const uint16_t*>(&v) + 16);
    const __m512 a = _mm512_mul_ps(_mm512_mul_ps(lo, unbias), s);
    const __m512 b = _mm512_mul_ps(_mm512_mul_ps(hi, unbias), s);
    _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(b, a));
  };
  const int64_t chunks = K / kChunkCols;
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i hi, lo;
    dec.decode(_mm512_loadu_si512(w + c * 64), hi, lo);
    const __m512 s = _mm512_set1_ps(srow[c / kChunksPerBlock]);
    store(out + 2 * c * 32, hi, s);
    store(out + (2 * c + 1) * 32, lo, s);
  }
  std::fill(out + K / 2 * 32, out + Kt / 2 * 32, 0);
}

// C tiles for rows [0, 16 MT) of x (row stride ldx) and panels b0, b0 + stride, into c (32 x 32
// fp32, row stride 32): as amx_gemm.cpp's tile_block.
template <int MT, int NT>
inline void tile_block(const uint16_t* x, int64_t ldx, const uint16_t* b0, int64_t stride,
                       int64_t Kt, float* c) {
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (MT > 1) _tile_zero(2);
  if constexpr (MT > 1 && NT > 1) _tile_zero(3);
  const int64_t ldx_bytes = ldx * 2;
  for (int64_t k = 0; k < Kt; k += kTileK) {
    const uint16_t* b = b0 + k * kPanel;  // pair-row k / 2
    _tile_loadd(4, x + k, ldx_bytes);
    _tile_loadd(6, b, 64);
    if constexpr (NT > 1) _tile_loadd(7, b + stride, 64);
    if constexpr (MT > 1) _tile_loadd(5, x + kPanel * ldx + k, ldx_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MT > 1 && NT > 1) _tile_dpbf16ps(3, 5, 7);
  }
  constexpr int64_t ldc = 2 * kPanel * sizeof(float);
  _tile_stored(0, c, ldc);
  if constexpr (NT > 1) _tile_stored(1, c + kPanel, ldc);
  if constexpr (MT > 1) _tile_stored(2, c + kPanel * 32, ldc);
  if constexpr (MT > 1 && NT > 1) _tile_stored(3, c + kPanel * 32 + kPanel, ldc);
}

// x (M, K) -> xp (Mp, Kt), zero-padded to whole tiles, then y as amx_gemm.cpp does it.
void amx_gemm(const torch::Tensor& x2, const uint8_t* w, const float* scale, int64_t block_rows,
              const uint16_t* bias, uint16_t* y, int64_t N, int64_t K) {
  const int64_t M = x2.size(0);
  const int64_t Mp = (M + kPanel - 1) / kPanel * kPanel, Kt = (K + kTileK - 1) / kTileK * kTileK;
  const torch::Tensor xp = torch::constant_pad_nd(x2, {0, Kt - K, 0, Mp - M});
  const auto* xptr = reinterpret_cast<const uint16_t*>(xp.data_ptr());
  const int64_t panels = N / kPanel, pstride = kPanel * K, SK = (K + kBlockK - 1) / kBlockK;
  const int64_t stride = Kt * kPanel;  // bf16 elements per dequantized panel
  at::parallel_for(0, (panels + 1) / 2, 1, [&](int64_t g0, int64_t g1) {
    const Decoder dec;
    const TileConfig config;
    _tile_loadconfig(&config);  // tile configuration is per thread
    std::vector<uint16_t> buf(2 * stride);
    alignas(64) float c[32 * 32];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t p0 = 2 * g;
      const bool two = p0 + 1 < panels;
      for (int r = 0; r < (two ? 2 : 1); ++r) {
        const float* srow = scale + ((p0 + r) * kPanel / block_rows) * SK;
        dequant_panel(dec, w + (p0 + r) * pstride, srow, K, Kt, buf.data() + r * stride);
      }
      for (int64_t m0 = 0; m0 < Mp; m0 += 2 * kPanel) {
        const bool tall = m0 + kPanel < Mp;
        const uint16_t* xm = xptr + m0 * Kt;
        if (tall && two) tile_block<2, 2>(xm, Kt, buf.data(), stride, Kt, c);
        else if (tall) tile_block<2, 1>(xm, Kt, buf.data(), stride, Kt, c);
        else if (two) tile_block<1, 2>(xm, Kt, buf.data(), stride, Kt, c);
        else tile_block<1, 1>(xm, Kt, buf.data(), stride, Kt, c);
        const int64_t rows = std::min<int64_t>(2 * kPanel, M - m0);
        for (int64_t m = 0; m < rows; ++m)
          for (int r = 0; r < (two ? 2 : 1); ++r) {
            const int64_t n0 = (p0 + r) * kPanel;
            store16(y + (m0 + m) * N + n0, _mm512_loadu_ps(c + m * 32 + r * kPanel), 1.0f,
                    bias == nullptr ? nullptr : bias + n0);
          }
      }
    }
    _tile_release();
  });
}

// y = x @ (W * S)^T + bias for bf16 x (..., K), W packed (N / 16, K / 4, 64), S on a grid of
// block_rows x 128 blocks (the coarsest of 128, 64, 32, 16 rows that fits its shape, as
// quant/fp8.py block_rows). From amx_min_rows rows of x (0: never) on the AMX tiles, else the
// AVX-512 BF16 GEMV.
torch::Tensor fp8_packed_linear(const torch::Tensor& x, const torch::Tensor& packed,
                                const torch::Tensor& scale,
                                const std::optional<torch::Tensor>& bias, int64_t amx_min_rows) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && packed.device().is_cpu() && scale.device().is_cpu(),
                    "fp8_packed_linear: CPU tensors only");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kBFloat16, "fp8_packed_linear: x must be bfloat16");
  TORCH_CHECK_VALUE(packed.dim() == 3 && packed.size(2) == 64 && packed.is_contiguous() &&
                        packed.element_size() == 1,
                    "fp8_packed_linear: weight must be packed as (N / 16, K / 4, 64) bytes");
  const int64_t N = packed.size(0) * kPanel, K = packed.size(1) * kChunkCols;
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "fp8_packed_linear: x is ", x.sizes(),
                    " but the packed weight has in_features ", K);
  int64_t block_rows = 128;
  while (block_rows > 16 && scale.dim() == 2 && scale.size(0) != (N + block_rows - 1) / block_rows)
    block_rows /= 2;
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                        scale.dim() == 2 && scale.size(0) == (N + block_rows - 1) / block_rows &&
                        scale.size(1) == (K + kBlockK - 1) / kBlockK,
                    "fp8_packed_linear: scale must be contiguous float32 (ceil(N / block_rows), "
                    "ceil(K / 128)), got ", scale.sizes());
  const uint16_t* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kBFloat16 && bias->dim() == 1 &&
                          bias->size(0) == N && bias->is_contiguous() && bias->device().is_cpu(),
                      "fp8_packed_linear: bias must be a contiguous bfloat16 vector of N");
    bp = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  const torch::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  torch::Tensor y = torch::empty(out_shape, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return bias.has_value() ? y.copy_(bias->expand_as(y)) : y.zero_();
  const auto* wp = reinterpret_cast<const uint8_t*>(packed.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  if (amx_min_rows > 0 && M >= amx_min_rows) {
    TORCH_CHECK(amx_available(), "fp8_packed_linear: this CPU or Linux gives no AMX tiles");
    amx_gemm(x2, wp, scale.data_ptr<float>(), block_rows, bp, yp, N, K);
    return y;
  }
  torch::Tensor xs = torch::empty_like(x2);
  auto* xsp = reinterpret_cast<uint16_t*>(xs.data_ptr());
  const int a = scale_x(reinterpret_cast<const uint16_t*>(x2.data_ptr()), M * K, xsp);
  gemv(xsp, wp, scale.data_ptr<float>(), block_rows, bp, yp, M, N, K, std::ldexp(1.0f, 120 - a));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp8_packed_linear", &fp8_packed_linear,
        "y = x @ (W * S)^T + b for an FP8 weight packed in panels of 16 rows");
  m.def("amx_available", &amx_available, "whether this CPU and Linux give this process AMX");
}
