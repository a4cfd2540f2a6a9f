// A token's choice on the step's serial path, each in one call: llama.cpp's penalties
// on a copy of a sequence's logits (engine/sampler.py's apply_penalties), and a sampled
// token from its adjusted logits: temperature, top-k, top-p and min-p, then a draw
// from the sequence's own generator (sampler.choose). Their numpy and torch steps cost
// ~0.4 ms a token: topk over the whole vocabulary and a dozen small ops, run cold after
// the weights have streamed through the caches. The candidates are found in one pass
// of 16-lane comparisons against the k-th best so far; only the few that beat it touch
// a heap.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

using at::Tensor;

namespace {

using Candidate = std::pair<float, int64_t>;  // (logit, token)

// Better: a larger logit, or the same logit and a smaller token (a fixed order for ties)
inline bool better(const Candidate& a, const Candidate& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// Both ops take one sequence's logits, float32 [vocab]
void check_row(const Tensor& logits) {
  TORCH_CHECK(logits.dim() == 1 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "logits: contiguous float32 [vocab]");
}

// NaN can never be chosen; +inf becomes the largest finite value (as sampler._finite)
inline float mend(float v) { return std::isnan(v) ? -INFINITY : std::min(v, FLT_MAX); }

// The k best of x[0..n) by `better`, best first
std::vector<Candidate> best_of(const float* x, int64_t n, int64_t k) {
  std::vector<Candidate> heap;  // the k best so far, the worst of them on top
  heap.reserve(k + 1);
  auto worse = [](const Candidate& a, const Candidate& b) { return better(a, b); };
  auto offer = [&](int64_t i) {
    Candidate c{mend(x[i]), i};
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.push_back(c);
      std::push_heap(heap.begin(), heap.end(), worse);
    } else if (better(c, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), worse);
      heap.back() = c;
      std::push_heap(heap.begin(), heap.end(), worse);
    }
  };
  int64_t i = 0;
  for (; i < n && static_cast<int64_t>(heap.size()) < k; ++i) offer(i);
  // a later token with an equal logit is never better, so only a larger logit than
  // the k-th best's can enter: 16 compared at once (NaN compares false: never enters)
  for (; i + 16 <= n; i += 16) {
    __mmask16 hits =
        _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), _mm512_set1_ps(heap.front().first), _CMP_GT_OQ);
    for (; hits != 0; hits &= hits - 1) offer(i + __builtin_ctz(hits));
  }
  for (; i < n; ++i) offer(i);
  std::sort(heap.begin(), heap.end(), better);
  return heap;
}

}  // namespace

// logits float32 [vocab], already adjusted (bias, penalties); top_k <= 0 for all of
// them; inverse_temperature bounded by the caller. Returns the token, or -1 when no
// logit is finite.
int64_t sample_token(const Tensor& logits, int64_t top_k, double top_p, double min_p,
                     double inverse_temperature, std::optional<at::Generator> generator) {
  check_row(logits);
  const float* x = logits.data_ptr<float>();
  int64_t n = logits.size(0);
  int64_t k = top_k > 0 && top_k < n ? top_k : n;
  std::vector<Candidate> c = best_of(x, n, k);
  float top = c.empty() ? -INFINITY : c[0].first;
  if (top == -INFINITY) return -1;
  // shifted by the best and scaled (the best's is exactly 0, none NaN), then softmax
  const float inv = static_cast<float>(inverse_temperature);
  std::vector<float> p(c.size());
  float total = 0;
  for (size_t i = 0; i < c.size(); ++i) {
    p[i] = std::exp((c[i].first - top) * inv);
    total += p[i];
  }
  for (float& q : p) q /= total;
  // keep the smallest prefix whose mass reaches top_p (always the first), and those
  // at least min_p of the best
  float before = 0, kept = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    bool keep = (top_p >= 1.0 || before < top_p) && p[i] >= min_p * p[0];
    before += p[i];
    if (!keep) p[i] = 0;
    kept += p[i];
  }
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  double u;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    u = at::uniform_real_distribution<double>(0.0, 1.0)(gen);
  }
  double target = u * kept, sum = 0;
  size_t last = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == 0) continue;
    last = i;
    sum += p[i];
    if (sum > target) return c[i].second;
  }
  return c[last].second;  // rounding left the target at the very end
}

// llama.cpp's penalties on a copy of logits float32 [vocab], over the tokens in
// `recent` (engine/sampler.py's apply_penalties, in its very arithmetic: the repeat
// penalty and the presence term in float32, the frequency term in double)
Tensor penalize(const Tensor& logits, std::vector<int64_t> recent, double repeat_penalty,
                double presence_penalty, double frequency_penalty) {
  check_row(logits);
  int64_t n = logits.size(0);
  Tensor out = logits.clone();
  float* y = out.data_ptr<float>();
  const float rp = static_cast<float>(repeat_penalty), pp = static_cast<float>(presence_penalty);
  std::sort(recent.begin(), recent.end());
  for (size_t i = 0; i < recent.size();) {
    size_t j = i;
    while (j < recent.size() && recent[j] == recent[i]) ++j;  // recent[i] occurs j - i times
    int64_t t = recent[i];
    TORCH_CHECK(t >= 0 && t < n, "a recent token outside the vocabulary");
    float x = y[t];
    if (repeat_penalty != 1.0) x = x > 0 ? x / rp : x * rp;
    x -= pp;
    y[t] =
        static_cast<float>(static_cast<double>(x) - frequency_penalty * static_cast<double>(j - i));
    i = j;
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(accordion, m) {
  m.def(
      "penalize(Tensor logits, int[] recent, float repeat_penalty, float presence_penalty,"
      " float frequency_penalty) -> Tensor");
  m.impl("penalize", c10::DispatchKey::CompositeImplicitAutograd, &penalize);
  m.def(
      "sample_token(Tensor logits, int top_k, float top_p, float min_p, float inverse_temperature,"
      " Generator? generator) -> int");
  m.impl("sample_token", c10::DispatchKey::CompositeImplicitAutograd, &sample_token);
}
