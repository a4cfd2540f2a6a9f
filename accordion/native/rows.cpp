// Whole rows of a quantized matrix as float32: the embedding lookup of every step and
// the output head's leading rows (models/head.py ExactRows). gguf's numpy decoders
// are the reference and took ~100 us a call, whatever the row count, on a decode
// step's serial path; here each row is blocks.h's decode of its blocks, then each
// weight by the reference's own float32 operations in its order:
// (value - ZERO) * scale, plus the minimum for the types that have one (d * q + m for
// Q4_1 and Q5_1; (d * sc) * q - dmin * m for Q4_K and Q5_K, the minimum held negated,
// and x - y is x + -y exactly). No FMA contracts them (-ffp-contract=off): the bits
// are gguf's (tests/test_quant.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "activations.h"

using at::Tensor;
using namespace accordion_native;

namespace {

// The 32 weights of one decoded block of 32
template <class T>
inline void weights_of(const Block& b, float* out) {
  for (int half = 0; half < 2; ++half) {
    __m128i bytes = half == 0 ? _mm256_castsi256_si128(b.q) : _mm256_extracti128_si256(b.q, 1);
    __m512i q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(T::ZERO));
    __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(b.scale[half]));
    // no minimum: nothing added, so that a -0.0 stays the reference's -0.0
    if constexpr (T::MIN) w = _mm512_add_ps(w, _mm512_set1_ps(b.min));
    _mm512_storeu_ps(out + 16 * half, w);
  }
}

template <class T>
void row_weights(const uint8_t* row, int64_t units, float* out) {
  Block blocks[T::SUBS];
  for (int64_t u = 0; u < units; ++u) {
    T::decode(row, u, blocks);
    for (int j = 0; j < T::SUBS; ++j) weights_of<T>(blocks[j], out + (u * T::SUBS + j) * 32);
  }
}

// fn(T{}) for the type of raw's blocks, after checking raw and cols against it
template <class Fn>
void with_rows_type(const Tensor& raw, int64_t block_bytes, int64_t cols, Fn fn) {
  TORCH_CHECK(raw.dim() == 2 && raw.is_contiguous() && raw.scalar_type() == at::kByte,
              "raw: contiguous uint8 [rows, row bytes]");
  bool known = with_type(block_bytes, [&](auto type) {
    using T = decltype(type);
    TORCH_CHECK(cols % T::BLOCK == 0 && cols / T::BLOCK * T::BYTES == raw.size(1),
                "cols do not fill the rows' blocks");
    fn(type);
  });
  TORCH_CHECK(known, "no quantized type has ", block_bytes, "-byte blocks");
}

}  // namespace

// raw: uint8 [rows, row bytes] of a matrix of `block_bytes`-byte blocks (the type);
// ids: int64 [n]. Returns float32 [n, cols], row i the weights of row ids[i].
Tensor dequantize_rows(const Tensor& raw, const Tensor& ids, int64_t block_bytes, int64_t cols) {
  TORCH_CHECK(ids.dim() == 1 && ids.is_contiguous() && ids.scalar_type() == at::kLong,
              "ids: contiguous int64 [n]");
  int64_t n = ids.size(0);
  Tensor out = at::empty({n, cols}, raw.options().dtype(at::kFloat));
  with_rows_type(raw, block_bytes, cols, [&](auto type) {
    using T = decltype(type);
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(id[i] >= 0 && id[i] < raw.size(0), "row id out of range");
    }
    const uint8_t* base = raw.data_ptr<uint8_t>();
    int64_t row_bytes = raw.size(1);
    float* y = out.data_ptr<float>();
    // a decode step's one row stays on this thread; a prefill's many split
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        row_weights<T>(base + id[i] * row_bytes, cols / T::BLOCK, y + i * cols);
      }
    });
  });
  return out;
}

// models/head.py rescore: in each row of logits [n, vocab], every logit within
// `margin` of the row's largest becomes the float32 dot (dot_float: one fixed order)
// of the row's hidden state (hidden [n, cols]) with that token's weights as gguf
// decodes them (raw as in dequantize_rows). A row with a NaN is left as it is, as
// numpy's max leaves it (NaN, which no logit is within). Each row alone, on this
// thread: a decode step's work, which numpy did in ~0.3 ms, its machinery cold after
// the head's pass.
void rescore_rows(Tensor logits, const Tensor& hidden, const Tensor& raw, int64_t block_bytes,
                  double margin) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "logits: contiguous float32 [n, vocab]");
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() && hidden.scalar_type() == at::kFloat &&
                  hidden.size(0) == logits.size(0),
              "hidden: contiguous float32 [n, cols], a row per row of logits");
  int64_t n = logits.size(0), vocab = logits.size(1), cols = hidden.size(1);
  std::vector<float> weights(cols);
  std::vector<int64_t> picks;
  const __m512 none = _mm512_set1_ps(-INFINITY);  // what a partial load's lanes past the row hold
  with_rows_type(raw, block_bytes, cols, [&](auto type) {
    using T = decltype(type);
    TORCH_CHECK(raw.size(0) == vocab, "raw: one row per logit");
    const uint8_t* base = raw.data_ptr<uint8_t>();
    int64_t row_bytes = raw.size(1);
    for (int64_t r = 0; r < n; ++r) {
      float* row = logits.data_ptr<float>() + r * vocab;
      __m512 best = none;
      __mmask16 nan = 0;
      for (int64_t i = 0; i < vocab; i += 16) {
        __m512 v = _mm512_mask_loadu_ps(none, lanes(vocab - i), row + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        best = _mm512_max_ps(best, v);
      }
      if (nan != 0) continue;
      // in float32, as numpy computes max - MARGIN on a float32 row
      __m512 floor = _mm512_set1_ps(_mm512_reduce_max_ps(best) - static_cast<float>(margin));
      picks.clear();
      for (int64_t i = 0; i < vocab; i += 16) {
        __mmask16 in = lanes(vocab - i);  // a floor of -inf must not pick the lanes past the row
        __m512 v = _mm512_maskz_loadu_ps(in, row + i);
        for (uint32_t m = _mm512_mask_cmp_ps_mask(in, v, floor, _CMP_GE_OQ); m != 0; m &= m - 1) {
          picks.push_back(i + __builtin_ctz(m));
        }
      }
      for (int64_t id : picks) {  // the row's old logits decide the picks, not rescored ones
        row_weights<T>(base + id * row_bytes, cols / T::BLOCK, weights.data());
        dot_float<float, 1>(weights.data(), hidden.data_ptr<float>(), r, cols, row + id, 1);
      }
    }
  });
}

TORCH_LIBRARY_FRAGMENT(accordion, m) {
  m.def("dequantize_rows(Tensor raw, Tensor ids, int block_bytes, int cols) -> Tensor");
  m.def(
      "rescore_rows(Tensor(a!) logits, Tensor hidden, Tensor raw, int block_bytes, float margin)"
      " -> ()");
  m.impl("dequantize_rows", c10::DispatchKey::CompositeImplicitAutograd, &dequantize_rows);
  m.impl("rescore_rows", c10::DispatchKey::CompositeImplicitAutograd, &rescore_rows);
}
