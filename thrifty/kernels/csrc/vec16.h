// Sixteen float32 lanes on whichever vector unit the extension is compiled for: one AVX-512
// register, or two AVX2 ones (FMA needed). A kernel written once against `f16v` runs on both;
// the build picks the instruction set from the CPU's features (thrifty/kernels/build.py).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include "simd.h"  // reduce16
#endif

namespace thrifty_vec {

using mask16 = uint16_t;  // lane i is bit i
constexpr mask16 kAll = 0xFFFF;

inline mask16 first_lanes(int64_t n) { return n >= 16 ? kAll : static_cast<mask16>((1u << n) - 1); }

#if defined(__AVX2__) && defined(__FMA__)
// 8 float32 or bfloat16 values (raw 16 bits: a bfloat16 is the upper half of a float32) as 8
// float32 lanes.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// e^x as simd.h's exp512 on 8 lanes: x = n ln2 + r, e^r by its degree-6 Taylor polynomial,
// times 2^n built in the exponent bits (n >= -126 after the clamp at -87).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// The sum and the maximum of 8 float32 lanes.
inline float reduce8_add(__m256 v) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
inline float reduce8_max(__m256 v) {
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}
#endif

#if defined(__AVX512F__)

using f16v = __m512;
inline f16v zero() { return _mm512_setzero_ps(); }
inline f16v set1(float v) { return _mm512_set1_ps(v); }
inline f16v add(f16v a, f16v b) { return _mm512_add_ps(a, b); }
inline f16v mul(f16v a, f16v b) { return _mm512_mul_ps(a, b); }
inline f16v fmadd(f16v a, f16v b, f16v c) { return _mm512_fmadd_ps(a, b, c); }
inline f16v sub(f16v a, f16v b) { return _mm512_sub_ps(a, b); }
inline f16v div(f16v a, f16v b) { return _mm512_div_ps(a, b); }
inline f16v max(f16v a, f16v b) { return _mm512_max_ps(a, b); }
inline f16v exp(f16v x) { return thrifty_simd::exp512(x); }
inline mask16 ge(f16v a, f16v b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
inline mask16 gt(f16v a, f16v b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
inline f16v maskz(mask16 k, f16v v) { return _mm512_maskz_mov_ps(k, v); }
inline float reduce_add(f16v v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max(f16v v) { return _mm512_reduce_max_ps(v); }
inline f16v load(const float* p) { return _mm512_loadu_ps(p); }
inline f16v load(const float* p, mask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline void store(float* p, f16v v, mask16 k) { _mm512_mask_storeu_ps(p, k, v); }
// 16 signed bytes, 16 unsigned bytes as integers.
inline f16v from_i8(const void* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
}
// The low (high = false) or high nibbles of 16 bytes, plus 16 in the lanes of `five`.
inline f16v from_nibbles(const void* p, bool high, mask16 five) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  __m512i q = high ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, _mm512_set1_epi32(0x0F));
  q = _mm512_mask_or_epi32(q, five, q, _mm512_set1_epi32(0x10));
  return _mm512_cvtepi32_ps(q);
}

#else  // AVX2 + FMA: lanes 0-7 in lo, 8-15 in hi

struct f16v {
  __m256 lo, hi;
};
inline f16v zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline f16v set1(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline f16v add(f16v a, f16v b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline f16v mul(f16v a, f16v b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline f16v fmadd(f16v a, f16v b, f16v c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline f16v sub(f16v a, f16v b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline f16v div(f16v a, f16v b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline f16v max(f16v a, f16v b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline f16v exp(f16v x) { return {exp8(x.lo), exp8(x.hi)}; }
template <int Cmp>
inline mask16 compare(f16v a, f16v b) {
  const int lo = _mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, Cmp));
  const int hi = _mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, Cmp));
  return static_cast<mask16>(lo | hi << 8);
}
inline mask16 ge(f16v a, f16v b) { return compare<_CMP_GE_OQ>(a, b); }
inline mask16 gt(f16v a, f16v b) { return compare<_CMP_GT_OQ>(a, b); }
inline float reduce_add(f16v v) { return reduce8_add(_mm256_add_ps(v.lo, v.hi)); }
inline float reduce_max(f16v v) { return reduce8_max(_mm256_max_ps(v.lo, v.hi)); }
inline f16v load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline f16v load(const float* p, mask16 k) {
  if (k == kAll) return load(p);
  alignas(32) float t[16] = {};
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) t[i] = p[i];
  return load(t);
}
inline void store(float* p, f16v v, mask16 k) {
  if (k == kAll) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
    return;
  }
  alignas(32) float t[16];
  _mm256_store_ps(t, v.lo);
  _mm256_store_ps(t + 8, v.hi);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) p[i] = t[i];
}
inline f16v from_i8(const void* p) {
  const __m128i b = _mm_loadu_si128(static_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)))};
}
// Lane i of the result is all ones where bit i of k (of 8 bits) is set.
inline __m256i bits8(uint32_t k) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(k)), bit), bit);
}
inline f16v maskz(mask16 k, f16v v) {
  return {_mm256_and_ps(v.lo, _mm256_castsi256_ps(bits8(k & 0xFF))),
          _mm256_and_ps(v.hi, _mm256_castsi256_ps(bits8(k >> 8)))};
}
inline f16v from_nibbles(const void* p, bool high, mask16 five) {
  const __m128i b = _mm_loadu_si128(static_cast<const __m128i*>(p));
  const __m128i n = high ? _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F))
                         : _mm_and_si128(b, _mm_set1_epi8(0x0F));
  __m256i lo = _mm256_cvtepu8_epi32(n), hi = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(n, n));
  if (five != 0) {
    const __m256i sixteen = _mm256_set1_epi32(0x10);
    lo = _mm256_or_si256(lo, _mm256_and_si256(bits8(five & 0xFF), sixteen));
    hi = _mm256_or_si256(hi, _mm256_and_si256(bits8(five >> 8), sixteen));
  }
  return {_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi)};
}

#endif

// Lane i of the result is the sum of the 16 lanes of v[i].
inline f16v reduce16(const f16v* v) {
#if defined(__AVX512F__)
  return thrifty_simd::reduce16(v);
#else
  __m256 h[16];  // each v[i] folded to 8 lanes
  for (int i = 0; i < 16; ++i) h[i] = _mm256_add_ps(v[i].lo, v[i].hi);
  __m256 out[2];
  for (int half = 0; half < 2; ++half) {  // rows 8 half .. 8 half + 7
    const __m256* r = h + 8 * half;
    __m256 a[4];  // hadd: per 128-bit lane, pair sums of (r0, r1), (r2, r3), ...
    for (int i = 0; i < 4; ++i) a[i] = _mm256_hadd_ps(r[2 * i], r[2 * i + 1]);
    const __m256 b0 = _mm256_hadd_ps(a[0], a[1]), b1 = _mm256_hadd_ps(a[2], a[3]);
    // b0: lane 128-bit half 0 holds rows 0-3's low-lane sums, half 1 their high-lane sums.
    out[half] = _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20),
                              _mm256_permute2f128_ps(b0, b1, 0x31));
  }
  return {out[0], out[1]};
#endif
}

}  // namespace thrifty_vec
