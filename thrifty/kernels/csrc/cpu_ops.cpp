// Small CPU ops of the decode step, where torch's per-op overhead outweighs the work:
// paged decode attention, RMSNorm, rotary embedding, the KV store, SwiGLU and argmax; the
// decoder layers of a decode step looped over them in C++ (decode_layers.h); and the
// tensor-parallel ranks' shared-memory collectives (shm_sync.h).
//
// Decode attention straight over the paged KV cache: one query token per sequence, keys and
// values read in place through the block table (no gather into a padded copy).
//
// q: (B, H, D); k_cache, v_cache: (num_blocks, block_size, Hkv, D), same dtype as q (float32 or
// bfloat16); block_tables: (B, max_blocks) int64; context_lens: (B,) int64. Returns (B, H * D).
// Work is split over (sequence, kv head); the G = H / Hkv query heads that share a kv head are
// handled together so each key and value row is read once. Accumulation is in float32.
#include "torch_api.h"
#include <ATen/Parallel.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "simd.h"
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include "vec16.h"  // f16v: 16 float lanes on AVX-512 or AVX2; exp8
#endif

#include "shm_sync.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Tasks of (sequence, kv head) per thread: enough that each chunk has about 64k multiply-adds
// (a few microseconds on one core), since waking the thread pool costs about as much here
// (SmolLM2 at batch 1 and 64 tokens: 3 tasks took 7.3 us on 2 threads, 7.1 on one).
inline int64_t attention_grain(int64_t B, const int64_t* lens, int64_t G, int64_t D) {
  int64_t tokens = 0;
  for (int64_t b = 0; b < B; ++b) tokens += lens[b];
  const int64_t per_task = std::max<int64_t>(1, tokens / std::max<int64_t>(1, B) * G * D * 2);
  return std::max<int64_t>(1, ((int64_t{1} << 16) + per_task - 1) / per_task);
}

// The portable version: one element at a time, accumulation in float32. T: q's and the
// output's dtype; KV: the caches' (float32, or bfloat16 under float32 activations too).
template <typename T, typename KV>
void attend_scalar(const T* q, const KV* k_cache, const KV* v_cache, const int64_t* tables,
            const int64_t* lens, T* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
            int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t G = H / Hkv;
  const int64_t row = Hkv * D;  // elements per cache slot
  at::parallel_for(0, B * Hkv, attention_grain(B, lens, G, D), [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, kvh = task % Hkv;
      const int64_t len = lens[b];
      const int64_t* table = tables + b * max_blocks;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[g * D + d] = to_float(q[(b * H + kvh * G + g) * D + d]) * scale;
      scores.assign(G * len, 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const KV* k = k_cache + (table[t / block_size] * block_size + t % block_size) * row + kvh * D;
        for (int64_t g = 0; g < G; ++g) {
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qf[g * D + d] * to_float(k[d]);
          scores[g * len + t] = s;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) m = std::max(m, s[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          s[t] = std::exp(s[t] - m);
          sum += s[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      for (int64_t t = 0; t < len; ++t) {
        const KV* v = v_cache + (table[t / block_size] * block_size + t % block_size) * row + kvh * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * len + t];
          float* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] += p * to_float(v[d]);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          out[(b * H + kvh * G + g) * D + d] = static_cast<T>(acc[g * D + d]);
    }
  });
}

// Storage type as the SIMD loads see it: bfloat16 is its raw 16 bits.
template <typename T> struct Raw { using type = T; };
template <> struct Raw<c10::BFloat16> { using type = uint16_t; };

// The key and value rows of a sequence's len tokens for one KV head (offset_in_row into each
// cache slot), read through its block table; `pad` more repeat the last row, so that a SIMD
// pass over a whole chunk of tokens reads valid memory.
template <typename R>
void kv_rows(const R* kc, const R* vc, const int64_t* table, int64_t len, int64_t pad,
             int64_t block_size, int64_t row, int64_t offset_in_row, std::vector<const R*>& k,
             std::vector<const R*>& v) {
  k.resize(len + pad);
  v.resize(len + pad);
  for (int64_t t = 0; t < len + pad; ++t) {
    const int64_t tt = std::min(t, len - 1);
    const int64_t at = (table[tt / block_size] * block_size + tt % block_size) * row + offset_in_row;
    k[t] = kc + at;
    v[t] = vc + at;
  }
}

#if defined(__AVX2__) && defined(__FMA__)
template <typename R>
inline void prefetch_row(const R* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * int64_t(sizeof(R)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}
#endif

// Parts of each context for one step: 1, or the thread count (at most kMaxParts) where
// (sequence, kv head) tasks are fewer than 4 a thread and do not divide evenly among the
// threads (SmolLM2 at batch 1: 3 kv heads on 2 threads, one thread doing two of them while the
// other waits), so long as the parts average 128 tokens or more. SmolLM2's shape on 2 threads,
// the builds before and after timed in turns (3 processes each, medians): 1.14-1.41x at
// 1000-2000 tokens, 0.84-1.16x at 128-512, within the noise there.
constexpr int64_t kMaxParts = 8, kMinPartTokens = 128;
inline int64_t context_parts(int64_t B, int64_t Hkv, const int64_t* lens) {
  const int64_t threads = at::get_num_threads(), tasks = B * Hkv;
  if (threads < 2 || tasks % threads == 0 || tasks >= 4 * threads) return 1;
  const int64_t parts = std::min(threads, kMaxParts);
  int64_t tokens = 0;
  for (int64_t b = 0; b < B; ++b) tokens += lens[b];
  return tokens / B >= kMinPartTokens * parts ? parts : 1;
}

// Token range [begin, end) of part p of P of a len-token context.
inline std::pair<int64_t, int64_t> part_range(int64_t len, int64_t p, int64_t P) {
  return {len * p / P, len * (p + 1) / P};
}

// out[g] (G, D) from P parts' normalized outputs res (P, G, W), W >= D floats a head, maxes and
// sums (P, G): the softmax over the whole context, each part weighted by its sum of exps
// rescaled to the overall max (parts of no tokens have sum 0).
template <typename T>
void merge_parts(const float* res, const float* max, const float* sum, int64_t P, int64_t G,
                 int64_t W, int64_t D, T* out) {
  for (int64_t g = 0; g < G; ++g) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < P; ++p)
      if (sum[p * G + g] > 0.f) m = std::max(m, max[p * G + g]);
    float w[kMaxParts], total = 0.f;
    for (int64_t p = 0; p < P; ++p) {
      w[p] = sum[p * G + g] > 0.f ? sum[p * G + g] * std::exp(max[p * G + g] - m) : 0.f;
      total += w[p];
    }
    for (int64_t d = 0; d < D; ++d) {
      float a = 0.f;
      for (int64_t p = 0; p < P; ++p) a += w[p] * res[(p * G + g) * W + d];
      out[g * D + d] = static_cast<T>(a / total);
    }
  }
}

// The task loop of the SIMD paths: tasks are (sequence, kv head, part of the context); with one
// part a task writes its heads' output, with more each part keeps its (res, max, sum) for
// merge_parts. W: a head's floats in a task's queries and output (D, or D rounded up to the
// vector width); pad: rows past a context's end that a task reads (kv_rows repeats the last).
// load_q(b, kvh, qf) writes the kv head's G scaled queries (G, W); attend(qf, k, v, len,
// scores, max, sum, res) runs one task over len tokens (attend_task, attend_task8).
template <typename T, typename R, typename LoadQ, typename Attend>
void attend_tasks(const R* kc, const R* vc, const int64_t* tables, const int64_t* lens, T* out,
                  int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t W, int64_t pad,
                  int64_t block_size, int64_t max_blocks, const LoadQ& load_q,
                  const Attend& attend) {
  const int64_t G = H / Hkv, row = Hkv * D;
  const int64_t P = context_parts(B, Hkv, lens);
  const int64_t kept = P > 1 ? B * Hkv * P : 0;  // tasks whose (res, max, sum) merge_parts reads
  std::vector<float> parts(kept * G * (W + 2));
  float* part_res = parts.data();
  float* part_max = part_res + kept * G * W;
  float* part_sum = part_max + kept * G;
  const int64_t grain = std::max<int64_t>(1, attention_grain(B, lens, G, D) * P);
  at::parallel_for(0, B * Hkv * P, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * W), res(G * W), max(G), sum(G), scores;
    std::vector<const R*> k, v;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task % P, b = task / P / Hkv, kvh = task / P % Hkv;
      const auto [first, last] = part_range(lens[b], p, P);
      // A thread's tasks are contiguous, the part fastest: one sequence's and head's rows.
      if (p == 0 || k.empty())
        kv_rows(kc, vc, tables + b * max_blocks, lens[b], pad, block_size, row, kvh * D, k, v);
      load_q(b, kvh, qf.data());
      // One part: this thread's scratch, copied out below; more: the task's slot in `parts`.
      float* r = P == 1 ? res.data() : part_res + task * G * W;
      float* m = P == 1 ? max.data() : part_max + task * G;
      float* z = P == 1 ? sum.data() : part_sum + task * G;
      const int64_t len = last - first;
      if (P > 1 && len == 0) {  // an empty part (a context shorter than P): weight 0 in merge_parts
        std::fill_n(z, G, 0.f);
        continue;
      }
      attend(qf.data(), k.data() + first, v.data() + first, len, scores, m, z, r);
      if (P == 1)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < D; ++d)
            out[(b * H + kvh * G + g) * D + d] = static_cast<T>(r[g * W + d]);
    }
  });
  if (P == 1) return;
  for (int64_t task = 0; task < B * Hkv; ++task) {
    const int64_t b = task / Hkv, kvh = task % Hkv;
    merge_parts(part_res + task * P * G * W, part_max + task * P * G, part_sum + task * P * G, P, G,
                W, D, out + (b * H + kvh * G) * D);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

// One (sequence, kv head) task over len tokens (a whole context, or one part of it), C chunks
// of 16 lanes per head (D <= 16 C; lanes past D are masked off by `tail`). k[t], v[t]: the rows
// of token t, len + 15 of them (the extra repeat the last row, or are the next part's). qf:
// (G, C, 16) scaled queries; scores: G * padded floats of scratch; out: (G, C, 16), each head's
// softmax-weighted values; max, sum: G floats, each head's largest score and its sum of
// exp(s - max), what merge_parts needs. Scores go 16 tokens per pass, 16 dot products folded by
// one transpose-add; the weighted sum of values keeps the C accumulators of one head in
// registers.
template <typename R, int C>
void attend_task(const float* qf, const R* const* k, const R* const* v, int64_t len, int64_t G,
                 int64_t D, __mmask16 tail, float* scores, float* max, float* sum, float* out) {
  using namespace thrifty_simd;
  constexpr bool kWiden = std::is_same_v<R, uint16_t>;
  const int64_t padded = (len + 15) / 16 * 16;
  const __mmask16 full = 0xFFFF;
  // The block table scatters the rows where the hardware prefetcher can't follow: fetch the
  // next 16 keys while these are scored, and values kAhead tokens ahead.
  constexpr int64_t kAhead = 8;
  // A bf16 cache's rows are widened to float32 once for all G query heads (kbuf: 16 keys, 4 KB
  // at 64 dims; vbuf: kVB values), not once per head as they are dotted: Qwen2.5's 7 heads a
  // kv head did the widening 7 times over. Each head still sums its tokens in order.
  alignas(64) float kbuf[kWiden ? 16 * C * 16 : 16];
  // Chunk c of a cache row as float32, the lanes past D zero.
  auto chunk = [&](const R* row, int c) {
    return load_f32(row + c * 16, c == C - 1 ? tail : full);
  };
  auto key = [&](int64_t t0, int j, int c) -> __m512 {
    if constexpr (kWiden) return _mm512_load_ps(kbuf + (j * C + c) * 16);
    else return chunk(k[t0 + j], c);
  };
  for (int64_t t = 0; t < std::min<int64_t>(16, len); ++t) prefetch_row(k[t], D);
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    for (int64_t t = t0 + 16; t < std::min(t0 + 32, len); ++t) prefetch_row(k[t], D);
    if constexpr (kWiden)
      for (int j = 0; j < 16; ++j)
        for (int c = 0; c < C; ++c)
          _mm512_store_ps(kbuf + (j * C + c) * 16, chunk(k[t0 + j], c));
    for (int64_t g = 0; g < G; ++g) {
      __m512 dots[16];
      for (int j = 0; j < 16; ++j) dots[j] = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) {
        const __m512 qv = _mm512_loadu_ps(qf + (g * C + c) * 16);
        for (int j = 0; j < 16; ++j) dots[j] = _mm512_fmadd_ps(qv, key(t0, j, c), dots[j]);
      }
      _mm512_storeu_ps(scores + g * padded + t0, reduce16(dots));
    }
  }
  for (int64_t t = 0; t < std::min(kAhead, len); ++t) prefetch_row(v[t], D);
  const __mmask16 last = static_cast<__mmask16>((1u << (len - (padded - 16))) - 1);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * padded;  // softmax over the len scores of head g
    __m512 mv = neg_inf;
    for (int64_t t0 = 0; t0 < padded; t0 += 16)
      mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(neg_inf, t0 + 16 < padded ? full : last, s + t0));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 sv = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < padded; t0 += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t0), mx));
      const __m512 em = _mm512_maskz_mov_ps(t0 + 16 < padded ? full : last, e);
      _mm512_storeu_ps(s + t0, em);
      sv = _mm512_add_ps(sv, em);
    }
    max[g] = _mm512_cvtss_f32(mx);
    sum[g] = _mm512_reduce_add_ps(sv);
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + (g * C + c) * 16, _mm512_setzero_ps());
  }
  // out[g] += sum_t p[g][t] v[t]: a bf16 cache's values widened kVB tokens at a time into vbuf,
  // every head summing from there (its C accumulators loaded from out and stored back once a
  // pass); a float32 cache read in place, each head in one pass.
  constexpr int64_t kVB = 32;
  alignas(64) float vbuf[kWiden ? kVB * C * 16 : 16];
  const int64_t step = kWiden ? kVB : len;
  for (int64_t t0 = 0; t0 < len; t0 += step) {
    const int64_t n = std::min(step, len - t0);
    if constexpr (kWiden) {
      for (int64_t j = 0; j < n; ++j) {
        if (t0 + j + kAhead < len) prefetch_row(v[t0 + j + kAhead], D);
        for (int c = 0; c < C; ++c)
          _mm512_store_ps(vbuf + (j * C + c) * 16, chunk(v[t0 + j], c));
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const float* s = scores + g * padded + t0;
      __m512 acc[C];
      for (int c = 0; c < C; ++c) acc[c] = _mm512_loadu_ps(out + (g * C + c) * 16);
      for (int64_t j = 0; j < n; ++j) {
        const __m512 pt = _mm512_set1_ps(s[j]);
        if constexpr (kWiden) {
          for (int c = 0; c < C; ++c)
            acc[c] = _mm512_fmadd_ps(pt, _mm512_load_ps(vbuf + (j * C + c) * 16), acc[c]);
        } else {
          if (g == 0 && t0 + j + kAhead < len) prefetch_row(v[t0 + j + kAhead], D);
          for (int c = 0; c < C; ++c)
            acc[c] = _mm512_fmadd_ps(pt, chunk(v[t0 + j], c), acc[c]);
        }
      }
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + (g * C + c) * 16, acc[c]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(1.f / sum[g]);
    for (int c = 0; c < C; ++c) {
      float* o = out + (g * C + c) * 16;
      _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), inv));
    }
  }
}

template <typename T, typename KV, int C>
void attend_simd(const T* q, const KV* k_cache, const KV* v_cache, const int64_t* tables,
                 const int64_t* lens, T* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                 int64_t block_size, int64_t max_blocks, float scale) {
  using R = typename Raw<KV>::type;
  const int64_t G = H / Hkv;
  const __mmask16 tail = static_cast<__mmask16>((1u << (D - (C - 1) * 16)) - 1);
  const auto* qr = reinterpret_cast<const typename Raw<T>::type*>(q);
  auto load_q = [&](int64_t b, int64_t kvh, float* qf) {
    for (int64_t g = 0; g < G; ++g)
      for (int c = 0; c < C; ++c) {
        const auto* qg = qr + (b * H + kvh * G + g) * D + c * 16;
        const __m512 x = thrifty_simd::load_f32(qg, c == C - 1 ? tail : __mmask16(0xFFFF));
        _mm512_storeu_ps(qf + (g * C + c) * 16, _mm512_mul_ps(x, _mm512_set1_ps(scale)));
      }
  };
  auto attend = [&](const float* qf, const R* const* k, const R* const* v, int64_t len,
                    std::vector<float>& scores, float* m, float* z, float* r) {
    scores.resize(G * ((len + 15) / 16 * 16));
    attend_task<R, C>(qf, k, v, len, G, D, tail, scores.data(), m, z, r);
  };
  attend_tasks(reinterpret_cast<const R*>(k_cache), reinterpret_cast<const R*>(v_cache), tables,
               lens, out, B, H, Hkv, D, C * 16, 15, block_size, max_blocks, load_q, attend);
}

#elif defined(__AVX2__) && defined(__FMA__)

// The same attention on AVX2 (CPUs without AVX-512): 8 lanes per chunk, C chunks per head
// (D = 8 C exactly), scores 8 tokens per pass folded by one transpose-add, the same exp.

using thrifty_vec::load8;

// Lane i: the sum of the 8 lanes of v[i].
inline __m256 reduce8(const __m256* v) {
  const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// 8 rows of C chunks of 8 values each as float32 into buf (8, C, 8): a bf16 cache's rows are
// widened once here, not once per query head of the group as the dot products read them.
template <int C>
inline void widen_rows(const uint16_t* const* rows, float* buf) {
  for (int j = 0; j < 8; ++j)
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(buf + (j * C + c) * 8, load8(rows[j] + c * 8));
}

// One (sequence, kv head) task over len tokens (a whole context, or one part of it); k[t], v[t]:
// the rows of token t, len + 7 of them (the extra repeat the last row, or are the next part's);
// qf: (G, C, 8) scaled queries; scores: G * padded floats; out: (G, C, 8), each head's softmax-
// weighted values; max, sum: G floats, each head's largest score and its sum of exp(s - max),
// what merge_parts needs. Keys and values go 8 tokens at a time for all G query heads of the kv
// head, so each row is read (and, from a bf16 cache, widened) once; each head still sums its
// tokens in order.
template <typename R, int C>
void attend_task8(const float* qf, const R* const* k, const R* const* v, int64_t len, int64_t G,
                  float* scores, float* max, float* sum, float* out) {
  constexpr bool kWiden = std::is_same_v<R, uint16_t>;
  const int64_t padded = (len + 7) / 8 * 8;
  // As the AVX-512 task: the block table scatters the rows where the hardware prefetcher
  // can't follow, so the next 8 keys are fetched while these are scored, values kAhead ahead.
  constexpr int64_t kAhead = 8;
  const int64_t D = 8 * C;
  alignas(32) float buf[8 * C * 8];
  // Row j of the current 8 tokens, chunk c: from buf where widened, else the cache itself.
  auto row = [&](const R* const* rows, int j, int c) -> __m256 {
    if constexpr (kWiden) return _mm256_load_ps(buf + (j * C + c) * 8);
    else return _mm256_loadu_ps(rows[j] + c * 8);
  };
  for (int64_t t = 0; t < std::min<int64_t>(8, len); ++t) prefetch_row(k[t], D);
  for (int64_t t0 = 0; t0 < len; t0 += 8) {
    for (int64_t t = t0 + 8; t < std::min(t0 + 16, len); ++t) prefetch_row(k[t], D);
    if constexpr (kWiden) widen_rows<C>(k + t0, buf);
    for (int64_t g = 0; g < G; ++g) {
      __m256 dots[8];
      for (int j = 0; j < 8; ++j) dots[j] = _mm256_setzero_ps();
      for (int c = 0; c < C; ++c) {
        const __m256 qv = _mm256_loadu_ps(qf + (g * C + c) * 8);
        for (int j = 0; j < 8; ++j) dots[j] = _mm256_fmadd_ps(qv, row(k + t0, j, c), dots[j]);
      }
      _mm256_storeu_ps(scores + g * padded + t0, reduce8(dots));
    }
  }
  alignas(32) float lanes[8];
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * padded;  // softmax over the len scores of head g (pads: -inf)
    for (int64_t t = len; t < padded; ++t) s[t] = -std::numeric_limits<float>::infinity();
    __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t0 = 0; t0 < padded; t0 += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + t0));
    _mm256_store_ps(lanes, mv);
    const float m = *std::max_element(lanes, lanes + 8);
    __m256 sv = _mm256_setzero_ps();
    for (int64_t t0 = 0; t0 < padded; t0 += 8) {  // exp of a pad (-inf - m) is clamped: zero it
      __m256 e = thrifty_vec::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t0), _mm256_set1_ps(m)));
      _mm256_storeu_ps(s + t0, e);
      if (t0 + 8 > len) {
        for (int64_t t = len; t < t0 + 8; ++t) s[t] = 0.f;
        e = _mm256_loadu_ps(s + t0);
      }
      sv = _mm256_add_ps(sv, e);
    }
    _mm256_store_ps(lanes, sv);
    max[g] = m;
    sum[g] = 0.f;
    for (float x : lanes) sum[g] += x;
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + (g * C + c) * 8, _mm256_setzero_ps());
  }
  // out[g] += sum_t p[g][t] v[t]: a bf16 cache's values are widened 32 tokens at a time into
  // vbuf (8 KB for 64 dims) and every head sums from there, its C accumulators loaded from out
  // and stored back once a pass; a float32 cache is read in place, each head in one pass.
  constexpr int64_t kVB = 32;
  alignas(32) float vbuf[kWiden ? kVB * C * 8 : 8];
  const int64_t step = kWiden ? kVB : len;
  for (int64_t t = 0; t < std::min(kAhead, len); ++t) prefetch_row(v[t], D);
  for (int64_t t0 = 0; t0 < len; t0 += step) {
    const int64_t n = std::min(step, len - t0);
    if constexpr (kWiden) {
      for (int64_t j = 0; j < n; j += 8) {
        for (int64_t t = t0 + j + 8; t < std::min(t0 + j + 16, len); ++t) prefetch_row(v[t], D);
        widen_rows<C>(v + t0 + j, vbuf + j * C * 8);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const float* s = scores + g * padded + t0;
      __m256 acc[C];
      for (int c = 0; c < C; ++c) acc[c] = _mm256_loadu_ps(out + (g * C + c) * 8);
      for (int64_t j = 0; j < n; ++j) {
        const __m256 pt = _mm256_broadcast_ss(s + j);
        if constexpr (kWiden) {
          for (int c = 0; c < C; ++c)
            acc[c] = _mm256_fmadd_ps(pt, _mm256_load_ps(vbuf + (j * C + c) * 8), acc[c]);
        } else {
          if (g == 0 && t0 + j + kAhead < len) prefetch_row(v[t0 + j + kAhead], D);
          for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(pt, load8(v[t0 + j] + c * 8), acc[c]);
        }
      }
      for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + (g * C + c) * 8, acc[c]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c)
      _mm256_storeu_ps(out + (g * C + c) * 8, _mm256_mul_ps(_mm256_loadu_ps(out + (g * C + c) * 8),
                                                            _mm256_set1_ps(1.f / sum[g])));
}

template <typename T, typename KV, int C>
void attend_simd8(const T* q, const KV* k_cache, const KV* v_cache, const int64_t* tables,
                  const int64_t* lens, T* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                  int64_t block_size, int64_t max_blocks, float scale) {
  using R = typename Raw<KV>::type;
  const int64_t G = H / Hkv;
  auto load_q = [&](int64_t b, int64_t kvh, float* qf) {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d)
        qf[g * D + d] = to_float(q[(b * H + kvh * G + g) * D + d]) * scale;
  };
  auto attend = [&](const float* qf, const R* const* k, const R* const* v, int64_t len,
                    std::vector<float>& scores, float* m, float* z, float* r) {
    scores.resize(G * ((len + 7) / 8 * 8));
    attend_task8<R, C>(qf, k, v, len, G, scores.data(), m, z, r);
  };
  attend_tasks(reinterpret_cast<const R*>(k_cache), reinterpret_cast<const R*>(v_cache), tables,
               lens, out, B, H, Hkv, D, D, 7, block_size, max_blocks, load_q, attend);
}

#endif

// Heads of up to 128 dims take the AVX-512 path where the compiler targets it; on AVX2, heads of
// 32, 64, 80, 96 or 128 dims the AVX2 one.
template <typename T, typename KV>
void attend(const T* q, const KV* k_cache, const KV* v_cache, const int64_t* tables,
            const int64_t* lens, T* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
            int64_t block_size, int64_t max_blocks, float scale) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  switch ((D + 15) / 16) {
#define THRIFTY_ATTEND_CASE(C)                                                                \
  case C:                                                                                     \
    return attend_simd<T, KV, C>(q, k_cache, v_cache, tables, lens, out, B, H, Hkv, D, block_size, \
                             max_blocks, scale);
    THRIFTY_ATTEND_CASE(1) THRIFTY_ATTEND_CASE(2) THRIFTY_ATTEND_CASE(3) THRIFTY_ATTEND_CASE(4)
    THRIFTY_ATTEND_CASE(5) THRIFTY_ATTEND_CASE(6) THRIFTY_ATTEND_CASE(7) THRIFTY_ATTEND_CASE(8)
#undef THRIFTY_ATTEND_CASE
    default:
      break;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0) {
    switch (D / 8) {
#define THRIFTY_ATTEND_CASE(C)                                                                 \
  case C:                                                                                      \
    return attend_simd8<T, KV, C>(q, k_cache, v_cache, tables, lens, out, B, H, Hkv, D, block_size, \
                              max_blocks, scale);
      THRIFTY_ATTEND_CASE(4) THRIFTY_ATTEND_CASE(8) THRIFTY_ATTEND_CASE(10)
      THRIFTY_ATTEND_CASE(12) THRIFTY_ATTEND_CASE(16)
#undef THRIFTY_ATTEND_CASE
      default:
        break;
    }
  }
#endif
  attend_scalar(q, k_cache, v_cache, tables, lens, out, B, H, Hkv, D, block_size, max_blocks, scale);
}


// fn(T{}, KV{}) for the (activation, cache) dtypes the kernels take: both float32, both
// bfloat16, or float32 activations over a bfloat16 cache (half the cache's bytes).
template <typename Fn>
void with_kv_types(at::ScalarType x, at::ScalarType cache, Fn&& fn) {
  using B = c10::BFloat16;
  if (x == torch::kFloat && cache == torch::kFloat) return fn(float{}, float{});
  if (x == torch::kBFloat16 && cache == torch::kBFloat16) return fn(B{}, B{});
  if (x == torch::kFloat && cache == torch::kBFloat16) return fn(float{}, B{});
  TORCH_CHECK(false, "a ", cache, " cache under ", x, " activations: the kernels take float32 "
              "or bfloat16 for both, or a bfloat16 cache under float32");
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be (B, H, D), caches 4-d");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "the caches must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong,
              "block tables and lengths must be int64");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % Hkv == 0, "head shapes do not match");
  auto out = torch::empty({B, H * D}, q.options());
  const auto max_blocks = block_tables.size(1);
  with_kv_types(q.scalar_type(), k_cache.scalar_type(), [&](auto t, auto kv) {
    using T = decltype(t);
    using KV = decltype(kv);
    attend<T, KV>(q.data_ptr<T>(), k_cache.data_ptr<KV>(), v_cache.data_ptr<KV>(),
                  block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                  out.data_ptr<T>(), B, H, Hkv, D, block_size, max_blocks,
                  static_cast<float>(scale));
  });
  return out;
}

// One row: normalise in float32, round to the activation dtype, then scale by the weight, as
// the reference models do.
template <typename T>
inline void rms_row(const T* xr, const T* w, T* out, int64_t D, float eps) {
  float ss = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float v = to_float(xr[d]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t d = 0; d < D; ++d)
    out[d] = static_cast<T>(to_float(static_cast<T>(to_float(xr[d]) * inv)) * to_float(w[d]));
}

// residual (N, D) += x, rounded to the dtype as `residual + x` is (when `x` is given), then
// out = RMSNorm(residual).
template <typename T>
void rms_rows(const T* x, T* residual, const T* w, T* out, int64_t N, int64_t D, float eps) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* r = residual + n * D;
      if (x != nullptr)
        for (int64_t d = 0; d < D; ++d) r[d] = static_cast<T>(to_float(r[d]) + to_float(x[n * D + d]));
      rms_row(r, w, out + n * D, D, eps);
    }
  });
}

// RMSNorm(residual + x) with residual updated in place (x undefined: RMSNorm(residual)).
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight,
                           double eps) {
  TORCH_CHECK(residual.scalar_type() == weight.scalar_type(), "x and weight must share a dtype");
  const bool add = x.defined();
  if (add) {
    TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.sizes() == residual.sizes(),
                "x and the residual must match");
    TORCH_CHECK(residual.is_contiguous(), "the residual must be contiguous");
    x = x.contiguous();
  } else {
    residual = residual.contiguous();
  }
  const int64_t D = residual.size(-1), N = residual.numel() / D;
  TORCH_CHECK(weight.numel() == D && weight.is_contiguous(), "weight must be a (D,) vector");
  auto out = torch::empty_like(residual);
  if (residual.scalar_type() == torch::kBFloat16) {
    using T = c10::BFloat16;
    rms_rows<T>(add ? x.data_ptr<T>() : nullptr, residual.data_ptr<T>(), weight.data_ptr<T>(),
                out.data_ptr<T>(), N, D, static_cast<float>(eps));
  } else {
    TORCH_CHECK(residual.scalar_type() == torch::kFloat, "only float32 and bfloat16 are supported");
    rms_rows<float>(add ? x.data_ptr<float>() : nullptr, residual.data_ptr<float>(),
                    weight.data_ptr<float>(), out.data_ptr<float>(), N, D, static_cast<float>(eps));
  }
  return out;
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  return add_rms_norm(torch::Tensor(), x, weight, eps);
}

// Write the new tokens' keys and values into their cache slots: k, v (N, Hkv, D) into the
// caches viewed as (slots, Hkv, D), row n to slot slot_mapping[n].
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping) {
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "keys and values must share a dtype, as must the caches");
  if (k.scalar_type() != k_cache.scalar_type()) {  // rounded to the cache's dtype (bfloat16)
    k = k.to(k_cache.scalar_type());
    v = v.to(v_cache.scalar_type());
  }
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong, "slot mapping must be int64");
  k = k.contiguous();
  v = v.contiguous();
  slot_mapping = slot_mapping.contiguous();
  const int64_t n = slot_mapping.numel(), row = k.numel() / std::max<int64_t>(n, 1);
  const int64_t slots = k_cache.numel() / std::max<int64_t>(row, 1);
  TORCH_CHECK(k.numel() == n * row && v.numel() == n * row && v_cache.numel() == k_cache.numel(),
              "keys, values and slots do not match");
  const int64_t bytes = row * k.element_size();
  const auto* slot = slot_mapping.data_ptr<int64_t>();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(0 <= slot[i] && slot[i] < slots, "cache slot out of range");
    std::memcpy(kc + slot[i] * bytes, kp + i * bytes, bytes);
    std::memcpy(vc + slot[i] * bytes, vp + i * bytes, bytes);
  }
}

// Rotary embedding in the rotate-half (GPT-NeoX) layout, one head: the first R dims become
// (x1 c - x2 s, x2 c + x1 s), the rest are copied; in float32, rounded once.
// O: the output's dtype (a bfloat16 cache's under float32 x: rounded from the float32 result,
// as x rotated in its own dtype and then converted would be).
template <typename T, typename O = T>
inline void rope_head(const T* xr, const T* c, const T* s, O* o, int64_t D, int64_t R) {
  const int64_t half = R / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = to_float(xr[j]), x2 = to_float(xr[j + half]);
    const float cj = to_float(c[j]), sj = to_float(s[j]);
    o[j] = static_cast<O>(static_cast<T>(x1 * cj - x2 * sj));
    o[j + half] = static_cast<O>(static_cast<T>(x2 * cj + x1 * sj));
  }
  for (int64_t j = R; j < D; ++j) o[j] = static_cast<O>(xr[j]);
}

// x (N, H, D), any strides with a unit last one (a view of the fused qkv output); cos, sin
// (N, R / 2) contiguous in x's dtype, R the rotary dims; into a new contiguous (N, H, D).
template <typename T>
void rope_rows(const T* x, const T* cos, const T* sin, T* out, int64_t N, int64_t H, int64_t D,
               int64_t R, int64_t sn, int64_t sh) {
  const int64_t half = R / 2;
  at::parallel_for(0, N * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / H, h = i % H;
      rope_head(x + n * sn + h * sh, cos + n * half, sin + n * half, out + i * D, D, R);
    }
  });
}

torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be (N, H, D) with a unit last stride");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "cos and sin must be in x's dtype");
  cos = cos.contiguous();
  sin = sin.contiguous();
  const int64_t N = x.size(0), H = x.size(1), D = x.size(2), R = 2 * (cos.numel() / std::max<int64_t>(N, 1));
  TORCH_CHECK(cos.numel() == sin.numel() && cos.numel() == N * (R / 2) && R <= D,
              "cos and sin must hold (N, rotary_dim / 2) angles");
  auto out = torch::empty({N, H, D}, x.options());
  if (x.scalar_type() == torch::kBFloat16) {
    rope_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), cos.data_ptr<c10::BFloat16>(),
                             sin.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), N, H,
                             D, R, x.stride(0), x.stride(1));
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat, "only float32 and bfloat16 are supported");
    rope_rows<float>(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                     out.data_ptr<float>(), N, H, D, R, x.stride(0), x.stride(1));
  }
  return out;
}

// The attention's q/k/v step in one pass over the fused projection qkv (N, (H + 2 Hkv) D), rows
// with a unit last stride: q and k rotated (rope_head), k and v written into their cache slots
// (caches (slots, Hkv, D) contiguous, row n to slot_mapping[n]); returns the rotated q (N, H, D).
template <typename T, typename KV>
void rope_store_rows(const T* qkv, const T* cos, const T* sin, T* q, KV* k_cache, KV* v_cache,
                     const int64_t* slot, int64_t N, int64_t H, int64_t Hkv, int64_t D, int64_t R,
                     int64_t sn) {
  const int64_t half = R / 2, heads = H + Hkv;
  at::parallel_for(0, N * heads, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / heads, h = i % heads;
      const T* row = qkv + n * sn;
      const T* c = cos + n * half;
      const T* s = sin + n * half;
      if (h < H) {
        rope_head(row + h * D, c, s, q + (n * H + h) * D, D, R);
      } else {
        const int64_t kvh = h - H, at = (slot[n] * Hkv + kvh) * D;
        rope_head(row + h * D, c, s, k_cache + at, D, R);
        const T* vr = row + (heads + kvh) * D;
        if constexpr (std::is_same_v<T, KV>) {
          std::memcpy(v_cache + at, vr, D * sizeof(T));
        } else {
          for (int64_t d = 0; d < D; ++d) v_cache[at + d] = static_cast<KV>(vr[d]);
        }
      }
    }
  });
}

torch::Tensor rope_store_kv(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor slot_mapping, int64_t H, int64_t Hkv) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be (N, (H + 2 Hkv) D) with unit last stride");
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(cos.scalar_type() == dtype && sin.scalar_type() == dtype,
              "cos and sin must be in qkv's dtype");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "the caches must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong, "slot mapping must be int64");
  cos = cos.contiguous();
  sin = sin.contiguous();
  slot_mapping = slot_mapping.contiguous();
  const int64_t N = qkv.size(0), D = qkv.size(1) / (H + 2 * Hkv);
  const int64_t R = 2 * (cos.numel() / std::max<int64_t>(N, 1));
  TORCH_CHECK(D * (H + 2 * Hkv) == qkv.size(1) && slot_mapping.numel() == N,
              "qkv does not hold H + 2 Hkv heads for each slot");
  TORCH_CHECK(cos.numel() == sin.numel() && cos.numel() == N * (R / 2) && R <= D,
              "cos and sin must hold (N, rotary_dim / 2) angles");
  const int64_t slots = k_cache.numel() / std::max<int64_t>(Hkv * D, 1);
  TORCH_CHECK(k_cache.size(-1) == D && k_cache.size(-2) == Hkv && v_cache.sizes() == k_cache.sizes(),
              "caches must be (..., Hkv, D)");
  const auto* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(0 <= slot[n] && slot[n] < slots, "cache slot out of range");
  auto q = torch::empty({N, H, D}, qkv.options());
  with_kv_types(dtype, k_cache.scalar_type(), [&](auto t, auto kv) {
    using T = decltype(t);
    using KV = decltype(kv);
    rope_store_rows<T, KV>(qkv.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(),
                           q.data_ptr<T>(), k_cache.data_ptr<KV>(), v_cache.data_ptr<KV>(), slot,
                           N, H, Hkv, D, R, qkv.stride(0));
  });
  return q;
}

// silu(gate) * up for x = [gate | up] along the last dim, in float32, rounded once.
template <typename T>
void silu_mul_rows(const T* x, T* out, int64_t N, int64_t F) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* g = x + n * 2 * F;
      const T* u = g + F;
      T* o = out + n * F;
      int64_t f = 0;
#if defined(__AVX2__) && defined(__FMA__)
      if constexpr (std::is_same_v<T, float>) {  // 16 lanes: one zmm or two ymm (vec16.h)
        namespace V = thrifty_vec;
        const V::f16v one = V::set1(1.f);
        for (; f + 16 <= F; f += 16) {
          const V::f16v gv = V::load(g + f), uv = V::load(u + f);
          const V::f16v y = V::div(V::mul(gv, uv), V::add(one, V::exp(V::sub(V::zero(), gv))));
          V::store(o + f, y, V::kAll);
        }
      }
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
      if constexpr (!std::is_same_v<T, float>) {  // bf16 rows, widened to float32
        const auto* gr = reinterpret_cast<const uint16_t*>(g);
        const auto* ur = reinterpret_cast<const uint16_t*>(u);
        alignas(64) float tmp[16];
        for (; f + 16 <= F; f += 16) {
          const __m512 gv = thrifty_simd::load_f32(gr + f, 0xFFFF);
          const __m512 uv = thrifty_simd::load_f32(ur + f, 0xFFFF);
          const __m512 e = thrifty_simd::exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
          _mm512_store_ps(tmp, _mm512_div_ps(_mm512_mul_ps(gv, uv),
                                             _mm512_add_ps(_mm512_set1_ps(1.f), e)));
          for (int i = 0; i < 16; ++i) o[f + i] = static_cast<T>(tmp[i]);
        }
      }
#endif
      for (; f < F; ++f) {
        const float gv = to_float(g[f]);
        o[f] = static_cast<T>(gv / (1.f + std::exp(-gv)) * to_float(u[f]));
      }
    }
  });
}

torch::Tensor silu_and_mul(torch::Tensor x) {
  x = x.contiguous();
  const int64_t F = x.size(-1) / 2, N = x.numel() / std::max<int64_t>(2 * F, 1);
  TORCH_CHECK(x.size(-1) % 2 == 0, "the last dim must hold gate and up halves");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = F;
  auto out = torch::empty(shape, x.options());
  if (x.scalar_type() == torch::kBFloat16) {
    silu_mul_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), N, F);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat, "only float32 and bfloat16 are supported");
    silu_mul_rows<float>(x.data_ptr<float>(), out.data_ptr<float>(), N, F);
  }
  return out;
}

// Index of the largest value of each row of a float32 (B, V) matrix; the first one on ties,
// as torch.argmax. NaN is not expected (logits).
// The first position of a row's maximum: the maximum 16 lanes at a time, then the first block
// of 16 holding it (gcc left the plain loops scalar: 31 us for a 49k row, 1 ms a batch-32 step).
int64_t argmax_row(const float* r, int64_t V) {
  float m = r[0];
  int64_t i = 0, j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  namespace V16 = thrifty_vec;
  if (V >= 16) {
    V16::f16v mv = V16::load(r);
    for (i = 16; i + 16 <= V; i += 16) mv = V16::max(mv, V16::load(r + i));
    m = V16::reduce_max(mv);
  }
#endif
  for (; i < V; ++i) m = std::max(m, r[i]);
#if defined(__AVX2__) && defined(__FMA__)
  for (const V16::f16v mm = V16::set1(m); j + 16 <= V; j += 16) {
    const V16::mask16 hit = V16::ge(V16::load(r + j), mm);
    if (hit != 0) return j + __builtin_ctz(hit);
  }
#endif
  while (j < V - 1 && r[j] != m) ++j;
  return j;
}

torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "argmax_rows: (B, V) float32");
  x = x.contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  TORCH_CHECK(V > 0, "argmax_rows: empty rows");
  auto out = torch::empty({B}, x.options().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) op[b] = argmax_row(xp + b * V, V);
  });
  return out;
}

}  // namespace

#include "decode_layers.h"  // the layer loop of a decode step over the ops above

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "attention of one query per sequence over the paged KV cache");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim, float32 inside");
  m.def("add_rms_norm", &add_rms_norm,
        "residual += x in place, then RMSNorm(residual) over the last dim, float32 inside");
  m.def("store_kv", &store_kv, "write new keys and values into their paged cache slots");
  m.def("rope", &rope, "rotate-half rotary embedding of (N, H, D), float32 inside");
  m.def("rope_store_kv", &rope_store_kv,
        "rotate q and k of the fused qkv, store k and v in their cache slots, return q");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up over [gate | up], float32 inside");
  m.def("argmax_rows", &argmax_rows, "first index of each float32 row's maximum");
  thrifty_shm::bind(m);
  thrifty_decode::bind(m);
}
