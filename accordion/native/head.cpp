// The output head's approximate int8 copy (models/linear.py approximate_rows) as
// one matmul for up to a few dozen rows: the weights are read once, however many
// rows there are. torch's int8 kernel re-reads them per row block and falls
// behind the bf16 GEMM past 4 rows; at 8 decode rows this reads 28 MB where bf16
// reads 56. The layout is column blocks of 64 outputs, [N / 64, K, 64]: a block
// streams from memory in order and its 64 outputs fill four 16-float registers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

using at::Tensor;

namespace {

typedef float f16v __attribute__((vector_size(64)));

constexpr int64_t BLOCK = 64, W = 16, C = BLOCK / W;

// 16 int8 as floats. GCC 12 turns __builtin_convertvector from int8 into scalar
// code, so the two AVX-512 instructions are named outright. Without AVX-512 the
// 16 accumulators spill and models/linear.py uses torch's int8 kernel instead;
// the loop below only keeps this file compiling there.
inline f16v widen(const int8_t* p) {
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  f16v v;
  for (int i = 0; i < W; ++i) v[i] = p[i];
  return v;
#endif
}

// R rows of x [., K] times one column block w [K, 64]: acc[r][c] in registers
template <int R>
void block_rows(const float* x, int64_t k_len, const int8_t* w, const float* scale, float* y,
                int64_t n) {
  f16v acc[R][C] = {};
  for (int64_t k = 0; k < k_len; ++k) {
    __builtin_prefetch(w + (k + 16) * BLOCK);  // 1 KB ahead: the block streams from memory
    f16v col[C];
    for (int c = 0; c < C; ++c) col[c] = widen(w + k * BLOCK + c * W);
    for (int r = 0; r < R; ++r) {
      float xs = x[r * k_len + k];
      for (int c = 0; c < C; ++c) acc[r][c] += xs * col[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      f16v s;
      std::memcpy(&s, scale + c * W, sizeof s);
      f16v out = acc[r][c] * s;
      std::memcpy(y + r * n + c * W, &out, sizeof out);
    }
  }
}

using BlockFn = void (*)(const float*, int64_t, const int8_t*, const float*, float*, int64_t);
constexpr BlockFn BY_ROWS[] = {block_rows<1>, block_rows<2>, block_rows<3>, block_rows<4>};

}  // namespace

// x [M, K] (bfloat16 or float32), blocks [N / 64, K, 64] int8, scale [N] float32
// -> [M, N] float32: x @ (int8 weights * per-output scale)^T.
Tensor int8_head(const Tensor& x, const Tensor& blocks, const Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && blocks.dim() == 3 && blocks.size(2) == BLOCK, "shapes");
  TORCH_CHECK(blocks.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat, "dtypes");
  TORCH_CHECK(blocks.is_contiguous() && scale.is_contiguous(), "contiguous weights");
  int64_t m = x.size(0), k = x.size(1), nb = blocks.size(0), n = nb * BLOCK;
  TORCH_CHECK(blocks.size(1) == k && scale.numel() == n, "x, blocks and scale disagree");
  Tensor xf = x.to(at::kFloat).contiguous();
  Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const float *xp = xf.data_ptr<float>(), *sp = scale.data_ptr<float>();
  const int8_t* wp = blocks.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, nb, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t r = 0; r < m; r += 4) {  // the block stays in cache between passes
        int64_t rows = std::min<int64_t>(4, m - r);
        BY_ROWS[rows - 1](xp + r * k, k, wp + b * k * BLOCK, sp + b * BLOCK, yp + r * n + b * BLOCK,
                          n);
      }
    }
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(accordion, m) {
  m.def("int8_head(Tensor x, Tensor blocks, Tensor scale) -> Tensor");
  m.impl("int8_head", c10::DispatchKey::CompositeImplicitAutograd, &int8_head);
}
