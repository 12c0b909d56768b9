// One token per row of (B, V) float32 logits, in two passes over each row instead of a dozen
// full-vocabulary torch ops (temperature, top-k/top-p, softmax, noise, argmax, log-softmax).
//
// Pass 1: the row's maximum m, its first position, and Z1 = sum e^(x - m) (for logprobs) and
// ZT = sum e^((x - m) / T) (the tempered distribution). Pass 2 collects the tokens whose
// tempered probability is at least `min_prob` (or, with min-p, every token that survives it)
// into a heap and takes from it, largest first, only as many as the kept set needs.
//
// The kept set is the reference's (thrifty.engine.sampler.top_k_top_p_min_p): min-p on the
// tempered probabilities, then top-k, then the smallest prefix whose mass, in the distribution
// renormalized over what min-p and top-k left, reaches top-p. The token is drawn by inverse CDF
// with the row's uniform u: over the kept tokens in descending order (ties: lower id first),
// or, where neither top-k nor top-p truncates the row, over every token min-p keeps in id order.
// A row whose kept set reaches below the collected tokens (a nucleus in a flat tail, or top-k
// asking for more tokens) is decided again with a 64x lower bound, then over the whole row.
// Top logprobs come from one more pass (mostly a compare per 16 tokens), where asked for.
#include "torch_api.h"
#include <ATen/Parallel.h>

#if defined(__AVX2__) && defined(__FMA__)
#include "vec16.h"  // 16 float lanes: one AVX-512 register or two AVX2 ones
#define THRIFTY_SIMD 1
namespace V = thrifty_vec;
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct RowStats {
  float max;
  int64_t argmax;
  double z1;  // sum of e^(x - max)
  double zt;  // sum of e^((x - max) / t)
};

RowStats row_stats(const float* x, int64_t V, float t) {
  float m = kNegInf;
  int64_t i = 0;
#ifdef THRIFTY_SIMD
  V::f16v mv = V::set1(kNegInf);
  for (; i + 16 <= V; i += 16) mv = V::max(mv, V::load(x + i));
  m = V::reduce_max(mv);
#endif
  for (; i < V; ++i) m = std::max(m, x[i]);
  int64_t arg = 0;
  while (arg < V - 1 && x[arg] != m) ++arg;

  const float inv_t = 1.f / t;
  double z1 = 0, zt = 0;
  i = 0;
#ifdef THRIFTY_SIMD
  const V::f16v mm = V::set1(m), it = V::set1(inv_t);
  while (i + 16 <= V) {
    // float partial sums over at most 1024 tokens, then double: rounding stays near 1e-7
    V::f16v a1 = V::zero(), at = V::zero();
    const int64_t stop = std::min(V - 15, i + 1024);
    for (; i < stop; i += 16) {
      const V::f16v d = V::sub(V::load(x + i), mm);
      a1 = V::add(a1, V::exp(d));
      at = V::add(at, V::exp(V::mul(d, it)));
    }
    z1 += V::reduce_add(a1);
    zt += V::reduce_add(at);
  }
#endif
  for (; i < V; ++i) {
    z1 += std::exp(x[i] - m);
    zt += std::exp((x[i] - m) * inv_t);
  }
  return {m, arg, z1, zt};
}

// Positions of x at or above `threshold`, in id order.
void collect(const float* x, int64_t V, float threshold, std::vector<int64_t>& out) {
  int64_t i = 0;
#ifdef THRIFTY_SIMD
  const V::f16v th = V::set1(threshold);
  for (; i + 16 <= V; i += 16) {
    unsigned hit = V::ge(V::load(x + i), th);
    while (hit) {
      out.push_back(i + __builtin_ctz(hit));
      hit &= hit - 1;
    }
  }
#endif
  for (; i < V; ++i)
    if (x[i] >= threshold) out.push_back(i);
}

// Over the tokens at or above `threshold`, in id order: with target < 0, the sum of their
// tempered masses e^((x - m) / t) (the token is -1); else the first token whose cumulative mass
// exceeds target (the inverse CDF; the last such token where rounding leaves the target above
// the total).
std::pair<int64_t, double> walk(const float* x, int64_t V, float m, float t, float threshold,
                                double target) {
  const bool draw = target >= 0;
  double c = 0;
  int64_t i = 0, last = -1;
#ifdef THRIFTY_SIMD
  const V::f16v mm = V::set1(m), it = V::set1(1.f / t), th = V::set1(threshold);
  for (; i + 16 <= V; i += 16) {
    const V::f16v v = V::load(x + i);
    const V::mask16 in = V::ge(v, th);
    if (!in) continue;
    const double chunk = V::reduce_add(V::maskz(in, V::exp(V::mul(V::sub(v, mm), it))));
    if (draw && c + chunk > target) break;  // the token is in this chunk: walk it one by one
    c += chunk;
    last = i + 31 - __builtin_clz(in);
  }
#endif
  for (; i < V; ++i) {
    if (!(x[i] >= threshold)) continue;
    c += std::exp((x[i] - m) / t);
    last = i;
    if (draw && c > target) return {i, c};
  }
  return {draw ? last : -1, c};
}

// The k largest of x (ids, values), descending, ties to the lower id.
void top_k_scan(const float* x, int64_t V, int64_t k, int64_t* ids, float* vals) {
  int64_t n = 0;
  auto offer = [&](int64_t i) {
    if (n == k && x[i] <= vals[k - 1]) return;
    int64_t j = n < k ? n++ : k - 1;
    for (; j > 0 && vals[j - 1] < x[i]; --j) {
      vals[j] = vals[j - 1];
      ids[j] = ids[j - 1];
    }
    vals[j] = x[i];
    ids[j] = i;
  };
  int64_t i = 0;
  for (; i < std::min(k, V); ++i) offer(i);
#ifdef THRIFTY_SIMD
  for (; i + 16 <= V; i += 16) {  // most chunks hold nothing above the k-th largest so far
    unsigned hit = V::gt(V::load(x + i), V::set1(vals[k - 1]));
    for (; hit; hit &= hit - 1) offer(i + __builtin_ctz(hit));
  }
#endif
  for (; i < V; ++i) offer(i);
}

using Candidate = std::pair<float, int64_t>;  // (logit, id)

// Heap order: the larger logit first, the lower id on ties (as a stable descending sort).
bool after(const Candidate& a, const Candidate& b) {
  return a.first < b.first || (a.first == b.first && a.second > b.second);
}

// A row truncated by top-k or top-p, decided from the tokens of tempered probability at least q
// (and every token min-p keeps, where that is more), taken from a heap in descending order as
// far as needed; -1 where the kept set reaches below them.
int64_t sample_truncated(const float* x, int64_t V, const RowStats& s, float t, int64_t top_k,
                         float top_p, float x_min_p, double u, float q,
                         std::vector<Candidate>& heap, std::vector<int64_t>& ids,
                         std::vector<double>& masses) {
  // x >= m + t log(q ZT) <=> tempered probability >= q
  const float x_q = q > 0.f ? s.max + t * std::log(q * static_cast<float>(s.zt)) : kNegInf;
  const bool whole = x_min_p >= x_q;  // the collected tokens are all that min-p keeps
  ids.clear();
  collect(x, V, std::max(x_q, x_min_p), ids);
  heap.clear();
  for (const int64_t i : ids) heap.emplace_back(x[i], i);
  std::make_heap(heap.begin(), heap.end(), after);
  const int64_t n = static_cast<int64_t>(heap.size());
  ids.clear();  // now: the tokens in descending order, as far as taken
  masses.clear();
  auto take = [&](int64_t j) {  // make sure the j + 1 largest are taken; false past the last
    while (static_cast<int64_t>(ids.size()) <= j) {
      if (ids.size() == heap.size()) return false;
      std::pop_heap(heap.begin(), heap.end() - ids.size(), after);
      const Candidate& c = heap[heap.size() - ids.size() - 1];
      ids.push_back(c.second);
      masses.push_back(std::exp((c.first - s.max) / t));
    }
    return true;
  };

  // z: the mass top-p measures against, that of the tokens min-p and top-k leave.
  const bool complete = whole || top_k <= n;  // every one of those tokens is collected
  const int64_t in_k = std::min<int64_t>(top_k, n);
  double z = 0;
  if (complete && (top_k < V || top_p >= 1.f)) {
    take(in_k - 1);
    for (int64_t j = 0; j < in_k; ++j) z += masses[j];
  } else if (top_k >= V) {
    z = x_min_p > kNegInf ? walk(x, V, s.max, t, x_min_p, -1).second : s.zt;
  } else {
    return -1;  // top-k reaches below the collected tokens
  }
  int64_t end = in_k;  // kept: the `end` largest
  if (top_p < 1.f) {
    double before = 0;
    end = -1;
    for (int64_t j = 0;; ++j) {  // token j is kept while the mass before it is short of top-p
      if (before >= top_p * z) {
        end = j;
        break;
      }
      if (j == in_k || !take(j)) break;
      before += masses[j];
    }
    if (end < 0) {
      if (!complete) return -1;  // the nucleus reaches below the collected tokens
      end = in_k;
      take(end - 1);
    }
  }
  double total = 0;
  for (int64_t j = 0; j < end; ++j) total += masses[j];
  const double target = u * total;
  double c = 0;
  for (int64_t j = 0; j < end; ++j) {
    c += masses[j];
    if (c > target) return ids[j];
  }
  return ids[end - 1];
}

// Tokens of tempered probability down to min_prob are collected first; a row whose kept set
// reaches below them (a nucleus in a flat tail) is decided again with a 64x lower bound, then
// over the whole row.
int64_t sample_row(const float* x, int64_t V, const RowStats& s, float t, int64_t top_k,
                   float top_p, float min_p, double u, float min_prob,
                   std::vector<Candidate>& heap, std::vector<int64_t>& ids,
                   std::vector<double>& masses) {
  // min-p keeps e^((x - m) / t) >= min_p
  const float x_min_p = min_p > 0.f ? s.max + t * std::log(min_p) : kNegInf;
  if (top_k >= V && top_p >= 1.f) {  // at most min-p: draw in id order over what it keeps
    const double z = min_p > 0.f ? walk(x, V, s.max, t, x_min_p, -1).second : s.zt;
    return walk(x, V, s.max, t, x_min_p, u * z).first;
  }
  for (const float q : {min_prob, min_prob / 64, 0.f}) {
    const int64_t token =
        sample_truncated(x, V, s, t, top_k, top_p, x_min_p, u, q, heap, ids, masses);
    if (token >= 0) return token;
  }
  TORCH_CHECK(false, "sample_rows: no token kept (NaN logits?)");
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> sample_rows(
    torch::Tensor logits, torch::Tensor temperature, torch::Tensor top_k, torch::Tensor top_p,
    torch::Tensor min_p, torch::Tensor greedy, torch::Tensor uniform, torch::Tensor num_logprobs,
    double min_prob) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat,
              "sample_rows: logits must be (B, V) float32");
  logits = logits.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "sample_rows: empty rows");
  auto f32 = [&](torch::Tensor t) { return t.to(torch::kFloat).contiguous(); };
  auto i64 = [&](torch::Tensor t) { return t.to(torch::kLong).contiguous(); };
  temperature = f32(temperature), top_p = f32(top_p), min_p = f32(min_p);
  top_k = i64(top_k), num_logprobs = i64(num_logprobs);
  greedy = greedy.to(torch::kBool).contiguous();
  uniform = uniform.to(torch::kDouble).contiguous();
  for (const auto& t : {temperature, top_k, top_p, min_p, greedy, uniform, num_logprobs})
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "sample_rows: one parameter per row");
  const int64_t K = B ? std::max<int64_t>(num_logprobs.max().item<int64_t>(), 0) : 0;

  auto tokens = torch::empty({B}, logits.options().dtype(torch::kLong));
  auto lse = torch::empty({B}, logits.options());
  auto top_ids = torch::zeros({B, K}, logits.options().dtype(torch::kLong));
  auto top_lp = torch::full({B, K}, kNegInf, logits.options());
  const float* xp = logits.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<Candidate> heap;
    std::vector<int64_t> ids;
    std::vector<double> masses;
    for (int64_t b = begin; b < end; ++b) {
      const float* x = xp + b * V;
      const float t = temperature.data_ptr<float>()[b];
      const RowStats s = row_stats(x, V, t);
      const float log_z = s.max + static_cast<float>(std::log(s.z1));
      lse.data_ptr<float>()[b] = log_z;
      tokens.data_ptr<int64_t>()[b] =
          greedy.data_ptr<bool>()[b]
              ? s.argmax
              : sample_row(x, V, s, t, top_k.data_ptr<int64_t>()[b], top_p.data_ptr<float>()[b],
                       min_p.data_ptr<float>()[b], uniform.data_ptr<double>()[b],
                       static_cast<float>(min_prob), heap, ids, masses);
      const int64_t k = std::min<int64_t>(num_logprobs.data_ptr<int64_t>()[b], V);
      if (k <= 0) continue;
      int64_t* ids = top_ids.data_ptr<int64_t>() + b * K;
      float* vals = top_lp.data_ptr<float>() + b * K;
      top_k_scan(x, V, k, ids, vals);
      for (int64_t j = 0; j < k; ++j) vals[j] -= log_z;
    }
  });
  return {tokens, lse, top_ids, top_lp};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sample_rows", &sample_rows,
        "one token per float32 logits row: min-p, top-k, top-p, inverse CDF; lse and top logprobs");
}
