// Paged decode attention: one query token per sequence reads its keys and values
// straight from the block-paged cache, run by run, with nothing gathered and one
// call per layer for the whole batch. Written with GCC's vector extensions (16
// floats, an AVX-512 register where there is one) so the arithmetic is vector
// code whatever the auto-vectorizer decides. Needs head_dim a multiple of 16;
// models/attention.py checks that and otherwise gathers and calls
// scaled_dot_product_attention, the reference the tests compare against.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using at::Tensor;

namespace {

typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));
constexpr int W = 16;

inline f16v load(const float* p) {
  f16v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f16v load(const c10::BFloat16* p) {  // bf16 is the top half of a float32
  h16v h;
  std::memcpy(&h, p, sizeof h);
  i16v wide = __builtin_convertvector(h, i16v) << 16;
  return reinterpret_cast<f16v&>(wide);
}

inline float sum(f16v v) {  // a tree of shuffles: four dependent adds, not fifteen
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// exp(x) for x <= 0, 16 at a time: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by
// its degree-6 Taylor polynomial (relative error ~1e-7), 2^n built in the
// exponent bits; n is rounded by adding and removing 1.5 * 2^23.
inline f16v exp_nonpositive(f16v x) {
  const f16v zero = {}, lo = zero - 87.0f, magic = zero + 12582912.0f;
  x = x < lo ? lo : x;
  f16v n = (x * 1.44269504f + magic) - magic;
  f16v r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  f16v p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 +
                                                                      r * (1.f / 720))))));
  i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  return p * reinterpret_cast<f16v&>(bits);
}

// The `group` query heads q [group, d] that share one kv head, over the rows
// spans[0:n_spans] of that head's K and V ([slots, d], rows contiguous).
constexpr int64_t MAX_GROUP = 16, MAX_CHUNKS = 16;  // head_dim up to 256

template <typename T>
void attend_group(const T* q, const T* k, const T* v, int64_t d, const int64_t* spans,
                  int64_t n_spans, int64_t group, float scale, T* out,
                  std::vector<float>& scores) {
  int64_t chunks = d / W, n_keys = 0;
  for (int64_t i = 0; i < n_spans; ++i) n_keys += spans[2 * i + 1] - spans[2 * i];
  int64_t stride = (n_keys + W - 1) / W * W;  // each head's scores padded to whole vectors
  scores.assign(group * stride, -INFINITY);
  // locals, not heap: the compiler then knows they alias nothing and keeps them close
  f16v qv[MAX_GROUP * MAX_CHUNKS];   // [group, chunks] scaled queries
  f16v acc[MAX_GROUP * MAX_CHUNKS];  // [group, chunks] weighted sums of V
  f16v row[MAX_CHUNKS];              // one key or value row
  for (int64_t j = 0; j < group; ++j) {
    for (int64_t c = 0; c < chunks; ++c) qv[j * chunks + c] = load(q + j * d + c * W) * scale;
  }
  int64_t l = 0;
  for (int64_t i = 0; i < n_spans; ++i) {
    for (int64_t s = spans[2 * i]; s < spans[2 * i + 1]; ++s, ++l) {
      for (int64_t c = 0; c < chunks; ++c) row[c] = load(k + s * d + c * W);
      for (int64_t j = 0; j < group; ++j) {
        f16v dot = qv[j * chunks] * row[0];
        for (int64_t c = 1; c < chunks; ++c) dot += qv[j * chunks + c] * row[c];
        scores[j * stride + l] = sum(dot);
      }
    }
  }
  std::vector<float> total(group);
  for (int64_t j = 0; j < group; ++j) {  // softmax numerators, padding gives exp(-87) ~ 0
    float* sj = scores.data() + j * stride;
    float top = *std::max_element(sj, sj + n_keys);
    f16v run = {};
    for (int64_t m = 0; m < stride; m += W) {
      f16v e = exp_nonpositive(load(sj + m) - top);
      if (m + W > n_keys) {
        for (int64_t z = n_keys - m; z < W; ++z) e[z] = 0.f;
      }
      std::memcpy(sj + m, &e, sizeof e);
      run += e;
    }
    total[j] = sum(run);
    for (int64_t c = 0; c < chunks; ++c) acc[j * chunks + c] = f16v{};
  }
  l = 0;
  for (int64_t i = 0; i < n_spans; ++i) {
    for (int64_t s = spans[2 * i]; s < spans[2 * i + 1]; ++s, ++l) {
      for (int64_t c = 0; c < chunks; ++c) row[c] = load(v + s * d + c * W);
      for (int64_t j = 0; j < group; ++j) {
        float p = scores[j * stride + l];
        for (int64_t c = 0; c < chunks; ++c) acc[j * chunks + c] += p * row[c];
      }
    }
  }
  for (int64_t j = 0; j < group; ++j) {
    float inv = 1.f / total[j];
    for (int64_t c = 0; c < chunks; ++c) {
      f16v o = acc[j * chunks + c] * inv;
      for (int e = 0; e < W; ++e) out[j * d + c * W + e] = static_cast<T>(o[e]);
    }
  }
}

}  // namespace

// q [B, heads, d]: one decode query per sequence. Sequence b reads the cache slots
// spans[offsets[b]:offsets[b + 1]] (rows [a, b) of [kv_heads, slots, d]), in order.
// Returns [B, heads, d] in the cache's dtype.
Tensor decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& spans, const Tensor& offsets, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(k_cache.stride(2) == 1 && k_cache.stride(1) == k_cache.size(2) &&
                  v_cache.strides() == k_cache.strides(),
              "cache planes must be [kv_heads, slots, d] with rows contiguous");
  TORCH_CHECK(spans.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong,
              "spans and offsets are int64");
  Tensor qc = q.contiguous(), sp = spans.contiguous(), off = offsets.contiguous();
  int64_t b = qc.size(0), heads = qc.size(1), d = qc.size(2), kv_heads = k_cache.size(0);
  int64_t group = heads / kv_heads, slots = k_cache.size(1);
  TORCH_CHECK(d % W == 0 && d / W <= MAX_CHUNKS, "head_dim: a multiple of 16, at most 256");
  TORCH_CHECK(group <= MAX_GROUP, "at most 16 query heads per kv head");
  TORCH_CHECK(group * kv_heads == heads && off.numel() == b + 1, "heads or offsets");
  const int64_t* span = sp.data_ptr<int64_t>();
  const int64_t* first = off.data_ptr<int64_t>();
  TORCH_CHECK(first[0] == 0 && first[b] == sp.size(0), "offsets must cover the spans");
  for (int64_t i = 0; i < sp.size(0); ++i) {
    TORCH_CHECK(0 <= span[2 * i] && span[2 * i] < span[2 * i + 1] && span[2 * i + 1] <= slots,
                "span out of range");
  }
  for (int64_t i = 0; i < b; ++i) TORCH_CHECK(first[i] < first[i + 1], "a query without keys");
  Tensor out = at::empty_like(qc);
  int64_t hs = k_cache.stride(0);
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* op) {
    at::parallel_for(0, b * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t task = begin; task < end; ++task) {
        int64_t i = task / kv_heads, g = task % kv_heads;
        int64_t row = (i * heads + g * group) * d;
        attend_group(qp + row, kp + g * hs, vp + g * hs, d, span + 2 * first[i],
                     first[i + 1] - first[i], group, static_cast<float>(scale), op + row,
                     scores);
      }
    });
  };
  if (q.scalar_type() == at::kBFloat16) {
    run(qc.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
        v_cache.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "bfloat16 or float32 only");
    run(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
        out.data_ptr<float>());
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(accordion, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor spans,"
      " Tensor offsets, float scale) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CompositeImplicitAutograd, &decode_attention);
}
