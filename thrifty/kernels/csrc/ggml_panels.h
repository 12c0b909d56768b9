// y = x @ W^T (+ b) for bf16 x and a q4 / q5 weight laid out in panels of 16 output rows
// (thrifty/quant/ggml.py: to_panels), on AVX-512 BF16: one kernel for every row count of x.
//
// The row-major GEMV (ggml_gemv.cpp) keeps a row's weights along a vector's lanes, so each row
// of x costs a scale multiply per pair of groups and every row of W a horizontal sum; at 4-8
// rows of x it ran at a fifth of the dot-product peak. Here a vector's 16 lanes are 16 output
// rows, as in the dense packed kernel (bf16_gemv.cpp): lane 2i + e of a step holds row i's
// weight at column 2j + e, x's pair (2j, 2j + 1) is broadcast to all lanes, and one dpbf16 adds
// the step's products to 16 outputs. A panel's group of 32 columns is 16 such steps in 256 bytes:
// 4 chunks of 32 16-bit words, nibble s of a chunk c word being step 4c + s; q5 adds a 64-byte
// plane, bit L of step j's uint32 the fifth bit of lane L. Each q becomes the bf16 number 128 + q
// by ORing 0x4300 into its word (exact for q < 128), so per group
//   sum_k x_k (d q_k + m) = d sum_k x_k (128 + q_k) + (m - 128 d) sum_k x_k,
// with d and m (16 rows each per panel and group, float16 where the file's are, else float32)
// applied once a group to the group's 16 dot products, and x's group sums computed once a call.
//
// A micro-kernel keeps MR rows of x times NR panels of accumulators (and as many again for the
// group's dot products); a panel's bytes are decoded once for the MR rows. Threads split the
// panels; every block of rows of x passes over a thread's NR panels while they are in cache.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace ggml_panels {

constexpr int kRows = 16;        // output rows per panel
constexpr int kGroupQ4 = 256;    // bytes of a panel's group: the nibble words
constexpr int kPlane = 64;       // q5: the fifth-bit plane after them
constexpr int64_t kAhead = 2048;  // bytes prefetched ahead in each panel's stream

struct Panels {
  bool q5;
  int64_t panels, groups, K;
  int64_t group_bytes() const { return q5 ? kGroupQ4 + kPlane : kGroupQ4; }
};

// Step s (0-3) of a chunk's words as bf16 128 + q (q4's nibble; q5 adds its plane's bit).
template <int S, bool kQ5>
inline __m512i step_words(__m512i v, const uint8_t* plane, int j) {
  const __m512i magic = _mm512_set1_epi16(0x4300);
  __m512i w;
  if constexpr (S == 3) {
    w = _mm512_or_si512(_mm512_srli_epi16(v, 12), magic);
  } else {
    const __m512i shifted = S == 0 ? v : _mm512_srli_epi16(v, 4 * S);
    w = _mm512_ternarylogic_epi32(shifted, _mm512_set1_epi16(0x0F), magic, 0xEA);  // a & b | c
  }
  if constexpr (kQ5) {  // bit 4 of q: clear in 128 + (q & 15), so adding 16 sets it
    uint32_t bits;
    std::memcpy(&bits, plane + 4 * j, sizeof(bits));
    w = _mm512_mask_add_epi16(w, bits, w, _mm512_set1_epi16(0x10));
  }
  return w;
}

// 16 scales as float32: float32 ones as they are, float16 ones (their bits) widened.
inline __m512 load16(const float* s) { return _mm512_loadu_ps(s); }
inline __m512 load16(const uint16_t* s) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
}

// A panel's group scales (d and m of 16 rows: 64 or 128 bytes), kAhead / 2 bytes ahead.
template <typename S>
inline void prefetch_scales(const S* s) {
  const char* ahead = reinterpret_cast<const char*>(s) + kAhead / 2;
  _mm_prefetch(ahead, _MM_HINT_T0);
  if constexpr (sizeof(S) == 4) _mm_prefetch(ahead + 64, _MM_HINT_T0);
}

// y rows m0 .. m0 + MR - 1, columns of panels p0 .. p0 + NR - 1. Each output is summed in the
// same order whatever MR and NR are, so a row of x gets the same y alone or in a batch.
template <int MR, int NR, bool kQ5, typename S>
inline void micro(const Panels& P, const uint8_t* w, const S* scale, const uint16_t* x,
                  const float* xsum, int64_t p0, int64_t m0, const uint16_t* bias, uint16_t* y,
                  int64_t N) {
  const int64_t G = P.groups, K = P.K, gb = P.group_bytes();
  const uint8_t* q[NR];
  const S* sc[NR];
  __m512 acc[MR][NR];
  for (int r = 0; r < NR; ++r) {
    q[r] = w + (p0 + r) * G * gb;
    sc[r] = scale + (p0 + r) * G * 2 * kRows;
    for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_setzero_ps();
  }
  const __m512 c128 = _mm512_set1_ps(128.f);
  for (int64_t g = 0; g < G; ++g) {
    __m512 t[MR][NR];  // the group's dot products
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) t[m][r] = _mm512_setzero_ps();
    const uint16_t* xg = x + m0 * K + g * 32;
    for (int r = 0; r < NR; ++r) {  // the streams' lines a group's chunks do not prefetch
      const char* qa = reinterpret_cast<const char*>(q[r] + g * gb + kAhead);
      if constexpr (kQ5) _mm_prefetch(qa + kGroupQ4, _MM_HINT_T0);
      prefetch_scales(sc[r] + g * 2 * kRows);
    }
    for (int c = 0; c < 4; ++c) {
      __m512i v[NR];
      for (int r = 0; r < NR; ++r) {
        const uint8_t* src = q[r] + g * gb + c * 64;
        _mm_prefetch(reinterpret_cast<const char*>(src + kAhead), _MM_HINT_T0);
        v[r] = _mm512_loadu_si512(src);
      }
      auto step = [&](auto s_const) {
        constexpr int kStep = decltype(s_const)::value;
        const int j = 4 * c + kStep;
        __m512i wv[NR];
        for (int r = 0; r < NR; ++r)
          wv[r] = step_words<kStep, kQ5>(v[r], q[r] + g * gb + kGroupQ4, j);
        for (int m = 0; m < MR; ++m) {
          int32_t pair;
          std::memcpy(&pair, xg + m * K + 2 * j, sizeof(pair));
          const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
          for (int r = 0; r < NR; ++r)
            t[m][r] = _mm512_dpbf16_ps(t[m][r], (__m512bh)wv[r], xb);
        }
      };
      step(std::integral_constant<int, 0>{});
      step(std::integral_constant<int, 1>{});
      step(std::integral_constant<int, 2>{});
      step(std::integral_constant<int, 3>{});
    }
    for (int r = 0; r < NR; ++r) {
      const S* s = sc[r] + g * 2 * kRows;
      const __m512 d = load16(s);
      const __m512 off = _mm512_fnmadd_ps(c128, d, load16(s + kRows));  // m - 128 d
      for (int m = 0; m < MR; ++m) {
        acc[m][r] = _mm512_fmadd_ps(t[m][r], d, acc[m][r]);
        acc[m][r] = _mm512_fmadd_ps(off, _mm512_set1_ps(xsum[(m0 + m) * G + g]), acc[m][r]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    const int64_t n = (p0 + r) * kRows;
    const __m512 b =
        bias == nullptr ? _mm512_setzero_ps() : thrifty_simd::load_f32(bias + n, 0xFFFF);
    for (int m = 0; m < MR; ++m) {  // round to nearest even, as a float -> bf16 cast does
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (m0 + m) * N + n),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][r], b)));
    }
  }
}

// Rows m0 .. m0 + mr - 1 (mr <= 4) of x against panels p0 .. p0 + NR - 1.
template <int NR, bool kQ5, typename S>
inline void rows_block(const Panels& P, const uint8_t* w, const S* scale, const uint16_t* x,
                       const float* xsum, int64_t p0, int64_t m0, int mr, const uint16_t* bias,
                       uint16_t* y, int64_t N) {
  switch (mr) {
    case 1: return micro<1, NR, kQ5, S>(P, w, scale, x, xsum, p0, m0, bias, y, N);
    case 2: return micro<2, NR, kQ5, S>(P, w, scale, x, xsum, p0, m0, bias, y, N);
    case 3: return micro<3, NR, kQ5, S>(P, w, scale, x, xsum, p0, m0, bias, y, N);
    default: return micro<4, NR, kQ5, S>(P, w, scale, x, xsum, p0, m0, bias, y, N);
  }
}

template <int kNR, bool kQ5, typename S>
void gemm_nr(const Panels& P, const uint8_t* w, const S* scale, const uint16_t* x,
             const float* xsum, int64_t M, const uint16_t* bias, uint16_t* y) {
  const int64_t N = P.panels * kRows, blocks = (P.panels + kNR - 1) / kNR;
  // ~32 KB of weight a task: the two threads of a decode step split even small matrices.
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / (kNR * P.groups * P.group_bytes()));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p0 = b * kNR;
      const bool whole = p0 + kNR <= P.panels;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mr = static_cast<int>(std::min<int64_t>(4, M - m0));
        if (whole) {
          rows_block<kNR, kQ5, S>(P, w, scale, x, xsum, p0, m0, mr, bias, y, N);
        } else {
          for (int64_t p = p0; p < P.panels; ++p)
            rows_block<1, kQ5, S>(P, w, scale, x, xsum, p, m0, mr, bias, y, N);
        }
      }
    }
  });
}

// One row of x (batch-1 decode) takes 4 panels at a time, more streams in flight; more rows, 2
// (the accumulators of 4 rows of x for each fill the registers).
template <bool kQ5, typename S>
void gemm(const Panels& P, const uint8_t* w, const S* scale, const uint16_t* x,
          const float* xsum, int64_t M, const uint16_t* bias, uint16_t* y) {
  if (M == 1) return gemm_nr<4, kQ5, S>(P, w, scale, x, xsum, M, bias, y);
  gemm_nr<2, kQ5, S>(P, w, scale, x, xsum, M, bias, y);
}

// r[i] lane k <- r[k] lane i (16 x 16 32-bit): at stage s (8, 4, 2, 1) the blocks off the
// diagonal swap, (i, k) with (i ^ s, k ^ s) where bit s of i and of k differ.
struct TransposeIndex {
  int32_t lo[4][16], hi[4][16];  // permutex2var indices of rows i and i + s, per stage
};
constexpr TransposeIndex transpose_index() {
  TransposeIndex t{};
  for (int stage = 0; stage < 4; ++stage) {
    const int s = 8 >> stage;
    for (int k = 0; k < 16; ++k) {
      t.lo[stage][k] = (k & s) ? 16 + k - s : k;
      t.hi[stage][k] = (k & s) ? 16 + k : k + s;
    }
  }
  return t;
}
alignas(64) inline constexpr TransposeIndex kTranspose = transpose_index();

inline void transpose16(__m512i* r) {
#pragma GCC unroll 4
  for (int stage = 0; stage < 4; ++stage) {
    const int s = 8 >> stage;
    const __m512i a = _mm512_load_si512(kTranspose.lo[stage]);
    const __m512i b = _mm512_load_si512(kTranspose.hi[stage]);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i & s) continue;
      const __m512i lo = _mm512_permutex2var_epi32(r[i], a, r[i + s]);
      const __m512i hi = _mm512_permutex2var_epi32(r[i], b, r[i + s]);
      r[i] = lo;
      r[i + s] = hi;
    }
  }
}

// Panels p0 .. p1 - 1 of W as bf16 rows (16 (p1 - p0), K), each d q + m rounded once: what a
// large row count of x multiplies with torch's matmul (prefill), a few panels at a time.
template <bool kQ5, typename S>
void dequant(const Panels& P, const uint8_t* w, const S* scale, int64_t p0, int64_t p1,
             uint16_t* out) {
  const int64_t G = P.groups, gb = P.group_bytes();
  const __m512i rows_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i rows_hi = _mm512_add_epi32(rows_lo, _mm512_set1_epi32(8));
  for (int64_t p = p0; p < p1; ++p) {
    uint16_t* o = out + (p - p0) * kRows * P.K;
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* q = w + (p * G + g) * gb;
      const S* s = scale + (p * G + g) * 2 * kRows;
      for (int64_t j = 0; j < gb; j += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(q + kAhead + j), _MM_HINT_T0);
      }
      prefetch_scales(s);
      const __m512 d = load16(s), m = load16(s + kRows);
      // lanes 2i + e of a step are row i's: its d and m twice
      const __m512 d_lo = _mm512_permutexvar_ps(rows_lo, d);
      const __m512 d_hi = _mm512_permutexvar_ps(rows_hi, d);
      const __m512 m_lo = _mm512_permutexvar_ps(rows_lo, m);
      const __m512 m_hi = _mm512_permutexvar_ps(rows_hi, m);
      __m512i steps[16];
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(q + c * 64);
        for (int t = 0; t < 4; ++t) {
          const int j = 4 * c + t;
          __m512i words = _mm512_and_si512(_mm512_srlv_epi16(v, _mm512_set1_epi16(4 * t)),
                                           _mm512_set1_epi16(0x0F));
          if constexpr (kQ5) {
            uint32_t bits;
            std::memcpy(&bits, q + kGroupQ4 + 4 * j, sizeof(bits));
            words = _mm512_mask_add_epi16(words, bits, words, _mm512_set1_epi16(0x10));
          }
          const __m512 lo = _mm512_fmadd_ps(
              _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(words))), d_lo, m_lo);
          const __m512 hi = _mm512_fmadd_ps(
              _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words, 1))), d_hi,
              m_hi);
          steps[j] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // dword i: row i's pair
        }
      }
      transpose16(steps);  // steps[i]: row i's 16 pairs, the group's 32 columns
      for (int i = 0; i < kRows; ++i) _mm512_storeu_si512(o + i * P.K + g * 32, steps[i]);
    }
  }
}

// A row-major q4 / q5 weight (ggml_gemv.cpp's layout: per group 16 bytes of nibbles, q5 then a
// uint32 of fifth bits) in panels, as thrifty/quant/ggml.py's to_panels lays them out.
inline void to_panels(const uint8_t* w, int64_t N, int64_t groups, bool q5, uint8_t* out) {
  const int64_t group_row_bytes = q5 ? 20 : 16, row_bytes = groups * group_row_bytes;
  const Panels P{q5, N / kRows, groups, groups * 32};
  at::parallel_for(0, P.panels, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t g = 0; g < groups; ++g) {
        uint16_t words[4][32];
        uint32_t plane[16] = {};
        for (int i = 0; i < kRows; ++i) {
          const uint8_t* src = w + (p * kRows + i) * row_bytes + g * group_row_bytes;
          // q_k is byte k's low nibble (k < 16) or byte k - 16's high one; chunk c's word for
          // lane 2i + e holds q_{8c + 2s + e} in nibble s: bytes 8 (c % 2) + 2s + e.
          for (int c = 0; c < 4; ++c) {
            const int shift = c < 2 ? 0 : 4, base = 8 * (c % 2);
            for (int e = 0; e < 2; ++e) {
              uint16_t word = 0;
              for (int s4 = 0; s4 < 4; ++s4) {
                const int q = (src[base + 2 * s4 + e] >> shift) & 0x0F;
                word |= static_cast<uint16_t>(q << (4 * s4));
              }
              words[c][2 * i + e] = word;
            }
          }
          if (q5) {  // bit k of the row's uint32 is q_k's fifth: step j's lanes 2i, 2i + 1
            uint32_t high;
            std::memcpy(&high, src + 16, sizeof(high));
            for (int j = 0; j < 16; ++j) plane[j] |= ((high >> (2 * j)) & 3u) << (2 * i);
          }
        }
        uint8_t* dst = out + (p * groups + g) * P.group_bytes();
        std::memcpy(dst, words, sizeof(words));
        if (q5) std::memcpy(dst + kGroupQ4, plane, sizeof(plane));
      }
    }
  });
}

// x's sums per group of 32 (M, K / 32), in float32.
inline void group_sums(const uint16_t* x, int64_t M, int64_t K, float* xsum) {
  for (int64_t i = 0; i < M * (K / 32); ++i) {
    xsum[i] = _mm512_reduce_add_ps(_mm512_add_ps(thrifty_simd::load_f32(x + i * 32, 0xFFFF),
                                                 thrifty_simd::load_f32(x + i * 32 + 16, 0xFFFF)));
  }
}

}  // namespace ggml_panels
