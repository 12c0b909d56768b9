// Small CPU ops of the decode step, where torch's per-op overhead outweighs the work:
// paged decode attention and RMSNorm.
//
// Decode attention straight over the paged KV cache: one query token per sequence, keys and
// values read in place through the block table (no gather into a padded copy).
//
// q: (B, H, D); k_cache, v_cache: (num_blocks, block_size, Hkv, D), same dtype as q (float32 or
// bfloat16); block_tables: (B, max_blocks) int64; context_lens: (B,) int64. Returns (B, H * D).
// Work is split over (sequence, kv head); the G = H / Hkv query heads that share a kv head are
// handled together so each key and value row is read once. Accumulation is in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
void attend(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
            const int64_t* lens, T* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
            int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t G = H / Hkv;
  const int64_t row = Hkv * D;  // elements per cache slot
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
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
        const T* k = k_cache + (table[t / block_size] * block_size + t % block_size) * row + kvh * D;
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
        const T* v = v_cache + (table[t / block_size] * block_size + t % block_size) * row + kvh * D;
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

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be (B, H, D), caches 4-d");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
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
  if (q.scalar_type() == torch::kBFloat16) {
    attend<c10::BFloat16>(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                          v_cache.data_ptr<c10::BFloat16>(), block_tables.data_ptr<int64_t>(),
                          context_lens.data_ptr<int64_t>(), out.data_ptr<c10::BFloat16>(), B, H,
                          Hkv, D, block_size, max_blocks, static_cast<float>(scale));
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat, "only float32 and bfloat16 are supported");
    attend<float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                  block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                  out.data_ptr<float>(), B, H, Hkv, D, block_size, max_blocks,
                  static_cast<float>(scale));
  }
  return out;
}

template <typename T>
void rms_rows(const T* x, const T* w, T* out, int64_t N, int64_t D, float eps) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* xr = x + n * D;
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        const float v = to_float(xr[d]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      // As the reference models: normalise in float32, round to the activation dtype, then
      // scale by the weight.
      for (int64_t d = 0; d < D; ++d)
        out[n * D + d] = static_cast<T>(to_float(static_cast<T>(to_float(xr[d]) * inv)) * to_float(w[d]));
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must share a dtype");
  x = x.contiguous();
  const int64_t D = x.size(-1), N = x.numel() / D;
  TORCH_CHECK(weight.numel() == D && weight.is_contiguous(), "weight must be a (D,) vector");
  auto out = torch::empty_like(x);
  if (x.scalar_type() == torch::kBFloat16) {
    rms_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(),
                            out.data_ptr<c10::BFloat16>(), N, D, static_cast<float>(eps));
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat, "only float32 and bfloat16 are supported");
    rms_rows<float>(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), N, D,
                    static_cast<float>(eps));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "attention of one query per sequence over the paged KV cache");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim, float32 inside");
}
