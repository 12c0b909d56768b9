// Many rows of x on AVX2 (ggml_gemv.cpp's build without AVX-512): the integer dot products of
// the GEMV (x rounded to int16 per group of 32, quantize_x), blocked for registers.
//
// W goes in panels of 16 rows. A panel is decoded once into int16 and laid out by pairs of k:
// for each pair (k, k + 1) the 16 rows' two weights side by side, 32 int16 in two registers. One
// madd then multiplies 8 rows' pairs by one pair of x broadcast, and sums each row's two
// products: 8 int32 lanes, one per row of W. A micro-tile of 16 rows of W by 4 rows of x keeps 8
// such accumulators over a group's G weights (no overflow: 32 * 128 * 32767 < 2^31), then folds
// them into float sums: + d dx (q . qx), and for q4 / q5 + m sum(x over the group), exactly the
// GEMV's sum per group, so this path and the GEMV give the same numbers up to float rounding.
//
// Against the row-dot GEMV at many rows: no horizontal sums and no scalar scale per (row of W,
// row of x, group); against dequantizing to float32 for torch's sgemm: 16 multiply-adds per
// instruction instead of 8, and no float panel to write.
#pragma once

namespace ggml_i16 {

constexpr int kNR = 16;  // rows of W per panel: two registers of 8 int32 lanes
constexpr int kMR = 4;   // rows of x per micro-tile (6, with 12 accumulators, ran no faster)

// acc += madd(w, x): vpmaddwd into a scratch register, then vpaddd into acc, which is what
// AVX-VNNI's vpdpwssd does in one instruction. Written as two instructions of inline assembly
// because gcc, given the intrinsics, keeps each accumulator in two registers and copies one to
// the other on every step (8 vmovdqa among 25 instructions of the micro-tile's loop): the loop
// is bound by how many instructions the core issues, and the copies cost ~15% of it.
inline void madd_add(__m256i& acc, __m256i w, __m256i x) {
  __m256i t;
  asm("vpmaddwd %[w], %[x], %[t]\n\tvpaddd %[t], %[acc], %[acc]"
      : [acc] "+x"(acc), [t] "=&x"(t)
      : [w] "x"(w), [x] "x"(x));
}

// 8 x 8 int32 (as float lanes) transposed in registers.
inline void transpose8(__m256* r) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    s[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x31);
  }
}

// Rows n0 .. n0 + rows of W (rows <= 16; the rest zero) as the panel: int16 (K / 2, 16, 2);
// their d (and m) transposed to (groups, 16). rowbuf: 16 K int16 of scratch.
template <Format F, int G>
void decode_panel(const Layout& L, const uint8_t* w, const void* scale, int64_t n0, int rows,
                  int16_t* rowbuf, int16_t* panel, float* ds, float* ms) {
  for (int r = 0; r < kNR; ++r) {
    int16_t* dst = rowbuf + r * L.K;
    if (r >= rows) {
      std::memset(dst, 0, L.K * sizeof(int16_t));
      continue;
    }
    const uint8_t* row = w + (n0 + r) * L.row_bytes;
    if constexpr (G == 16) {  // q8 in groups of 16: the row is K int8
      for (int64_t k = 0; k < L.K; k += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(
                                reinterpret_cast<const __m128i*>(row + k))));
    } else {
      for (int64_t g = 0; g < L.groups; ++g) {
        __m256i lo, hi;
        group_words<F>(row, g, lo, hi);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * 32), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * 32 + 16), hi);
      }
    }
  }
  // rowbuf as int32 pairs (16, K / 2) -> panel (K / 2, 16), 8 x 8 at a time.
  const auto* src = reinterpret_cast<const float*>(rowbuf);
  auto* out = reinterpret_cast<float*>(panel);
  const int64_t pairs = L.K / 2;
  for (int64_t p0 = 0; p0 < pairs; p0 += 8) {
    for (int h = 0; h < 2; ++h) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (h * 8 + i) * pairs + p0);
      transpose8(r);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + (p0 + j) * kNR + h * 8, r[j]);
    }
  }
  float* buf = L.scale_buf(kNR);
  const float* d[kNR];
  for (int r = 0; r < kNR; ++r)
    d[r] = r < rows ? L.d(scale, n0 + r, buf ? buf + r * L.scale_count() : nullptr) : nullptr;
  for (int64_t g = 0; g < L.groups; ++g)
    for (int r = 0; r < kNR; ++r) {
      ds[g * kNR + r] = d[r] ? d[r][g] : 0.f;
      if (F != kQ8) ms[g * kNR + r] = d[r] ? d[r][L.groups + g] : 0.f;
    }
}

// acc (MR, 16) = rows m0 .. m0 + MR of x times the panel's 16 rows of W.
template <Format F, int G, int MR>
inline void micro_tile(const Layout& L, const int16_t* panel, const float* ds, const float* ms,
                       const int16_t* xq, const float* dx, const float* xsum, int64_t m0,
                       float* acc) {
  const int64_t xgroups = L.K / 32;
  // The float sums live in acc (L1), touched once a group: the registers are the int32 sums'.
  for (int i = 0; i < MR * kNR; ++i) acc[i] = 0.f;
  for (int64_t g = 0; g < L.groups; ++g) {
    __m256i s[MR][2];
    for (int m = 0; m < MR; ++m) s[m][0] = s[m][1] = _mm256_setzero_si256();
    const int16_t* pg = panel + g * G * kNR;
    for (int p = 0; p < G / 2; ++p) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + p * 32));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + p * 32 + 16));
      for (int m = 0; m < MR; ++m) {
        int32_t pair;
        std::memcpy(&pair, xq + (m0 + m) * L.K + g * G + 2 * p, sizeof(pair));
        const __m256i xb = _mm256_set1_epi32(pair);
        madd_add(s[m][0], w0, xb);
        madd_add(s[m][1], w1, xb);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_loadu_ps(ds + g * kNR + 8 * h);
      for (int m = 0; m < MR; ++m) {
        const int64_t xg = (m0 + m) * xgroups + g * G / 32;
        float* f = acc + m * kNR + 8 * h;
        __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[m][h]),
                                   _mm256_mul_ps(d, _mm256_set1_ps(dx[xg])), _mm256_load_ps(f));
        if constexpr (F != kQ8)
          v = _mm256_fmadd_ps(_mm256_loadu_ps(ms + g * kNR + 8 * h), _mm256_set1_ps(xsum[xg]), v);
        _mm256_store_ps(f, v);
      }
    }
  }
}

// y (M, N) = x @ W^T (+ bias) from quantized x (xq, dx, xsum as quantize_x makes them).
template <Format F, int G, typename T>
void gemm(const Layout& L, const int16_t* xq, const float* dx, const float* xsum,
          const uint8_t* w, const void* scale, const T* bias, T* y, int64_t M) {
  const int64_t panels = (L.N + kNR - 1) / kNR;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> rowbuf(kNR * L.K), panel(kNR * L.K);
    std::vector<float> ds(L.groups * kNR), ms(F == kQ8 ? 0 : L.groups * kNR);
    alignas(32) float acc[kMR * kNR];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kNR;
      const int rows = static_cast<int>(std::min<int64_t>(kNR, L.N - n0));
      decode_panel<F, G>(L, w, scale, n0, rows, rowbuf.data(), panel.data(), ds.data(),
                         ms.data());
      auto emit = [&](int64_t m0, int mr) {
        for (int m = 0; m < mr; ++m)
          for (int r = 0; r < rows; ++r) {
            const float b = bias ? static_cast<float>(bias[n0 + r]) : 0.f;
            y[(m0 + m) * L.N + n0 + r] = static_cast<T>(acc[m * kNR + r] + b);
          }
      };
      auto tile = [&](int64_t m0, auto mr) {
        micro_tile<F, G, decltype(mr)::value>(L, panel.data(), ds.data(), ms.data(), xq, dx,
                                              xsum, m0, acc);
        emit(m0, decltype(mr)::value);
      };
      int64_t m0 = 0;
      for (; m0 + kMR <= M; m0 += kMR) tile(m0, std::integral_constant<int, kMR>{});
      switch (M - m0) {  // the last rows in one tile of their own size
        case 3: tile(m0, std::integral_constant<int, 3>{}); break;
        case 2: tile(m0, std::integral_constant<int, 2>{}); break;
        case 1: tile(m0, std::integral_constant<int, 1>{}); break;
        default: break;
      }
    }
  });
}

}  // namespace ggml_i16
