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

#include <cstdint>

#include "blocks.h"

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

}  // namespace

// raw: uint8 [rows, row bytes] of a matrix of `block_bytes`-byte blocks (the type);
// ids: int64 [n]. Returns float32 [n, cols], row i the weights of row ids[i].
Tensor dequantize_rows(const Tensor& raw, const Tensor& ids, int64_t block_bytes, int64_t cols) {
  TORCH_CHECK(raw.dim() == 2 && raw.is_contiguous() && raw.scalar_type() == at::kByte,
              "raw: contiguous uint8 [rows, row bytes]");
  TORCH_CHECK(ids.dim() == 1 && ids.is_contiguous() && ids.scalar_type() == at::kLong,
              "ids: contiguous int64 [n]");
  int64_t n = ids.size(0), rows = raw.size(0), row_bytes = raw.size(1);
  Tensor out = at::empty({n, cols}, raw.options().dtype(at::kFloat));
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(id[i] >= 0 && id[i] < rows, "row id out of range");
  const uint8_t* base = raw.data_ptr<uint8_t>();
  float* y = out.data_ptr<float>();
  bool known = with_type(block_bytes, [&](auto type) {
    using T = decltype(type);
    TORCH_CHECK(cols % T::BLOCK == 0 && cols / T::BLOCK * T::BYTES == row_bytes,
                "cols do not fill the rows' blocks");
    // a decode step's one row and a few leaders stay on this thread; a prefill's many split
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        row_weights<T>(base + id[i] * row_bytes, cols / T::BLOCK, y + i * cols);
      }
    });
  });
  TORCH_CHECK(known, "no quantized type has ", block_bytes, "-byte blocks");
  return out;
}

TORCH_LIBRARY_FRAGMENT(accordion, m) {
  m.def("dequantize_rows(Tensor raw, Tensor ids, int block_bytes, int cols) -> Tensor");
  m.impl("dequantize_rows", c10::DispatchKey::CompositeImplicitAutograd, &dequantize_rows);
}
