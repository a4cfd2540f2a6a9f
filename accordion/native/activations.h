// What the matrix kernels share (qmatmul.cpp, qmatmul_amx.cpp): the vector code's
// activations quantized to int16 per block of 32 and held as two int8 digits, the
// exact u8 x s8 products and the one arithmetic its quantized output elements
// follow; the parts of a product, the loop over their groups, the tile config; and
// the float32 dot of float weights (also rows.cpp's exact logits).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "blocks.h"

namespace accordion_native {

// u8 x s8 products summed four at a time into int32 lanes, exactly
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  // widened to 16 bits no product or pair sum overflows: pairs by madd, then
  // adjacent pairs of those gathered from the two halves
  __m512i lo = _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(u)),
                                 _mm512_cvtepi8_epi16(_mm512_castsi512_si256(s)));
  __m512i hi = _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(u, 1)),
                                 _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(s, 1)));
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_permutex2var_epi32(lo, even, hi),
                                                _mm512_permutex2var_epi32(lo, odd, hi)));
#endif
}

// Activation rows quantized per block of 32 to int16 q (scale = max|x| / LEVELS):
// rounding moves a value by at most 1.5e-5 of its block's largest, finer than the
// bf16 activations other CPU paths use, where int8 (llama.cpp's choice) measurably
// moved SmolLM2's greedy tokens. Each q is held as two int8 digits, q = 256 h + l
// (l in [-128, 127]; LEVELS keeps h in [-127, 127]), so that a block's exact sum
// against unsigned 8-bit weights is 256 * sum(w h) + sum(w l): two u8 x s8
// products, which VNNI computes exactly.
constexpr int32_t LEVELS = 127 * 256 + 127;

// One block of 32 of one activation row: its digits and what the fold of its
// products needs, side by side, so that a row's blocks are one stream and one
// pointer a row serves every load
struct XBlock {
  int8_t h[32], l[32];  // q = 256 h + l
  float scale;          // max|x| / LEVELS
  float scaled_sum;     // scale * sum(q), for the minimums
  int32_t sum16[2];     // sum(q) of each 16 values
};

struct Act {
  int64_t blocks = 0;     // blocks of 32 a row
  std::vector<XBlock> x;  // [rows][blocks]

  const XBlock* row(int64_t r) const { return x.data() + r * blocks; }
  XBlock* row(int64_t r) { return x.data() + r * blocks; }
};

// rows of x into a; pad > 1 allocates a multiple of pad rows, zeros past the last
// (a tile of activation rows reads whole tiles)
inline void quantize(const float* x, int64_t rows, int64_t k, Act& a, int64_t pad = 1) {
  a.blocks = k / 32;
  a.x.assign((rows + pad - 1) / pad * pad * a.blocks, XBlock{});
  auto rows_from = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < a.blocks; ++b) {
        const float* xb = x + r * k + b * 32;
        __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        float d = amax / LEVELS, id = amax > 0.f ? LEVELS / amax : 0.f;
        __m512i q[2] = {_mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(id))),
                        _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(id)))};
        XBlock& out = a.row(r)[b];
        int32_t total = 0;
        for (int half = 0; half < 2; ++half) {
          q[half] = _mm512_max_epi32(_mm512_min_epi32(q[half], _mm512_set1_epi32(LEVELS)),
                                     _mm512_set1_epi32(-LEVELS));
          __m512i high = _mm512_srai_epi32(_mm512_add_epi32(q[half], _mm512_set1_epi32(128)), 8);
          __m512i low = _mm512_sub_epi32(q[half], _mm512_slli_epi32(high, 8));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out.h + 16 * half),
                           _mm512_cvtepi32_epi8(high));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out.l + 16 * half),
                           _mm512_cvtepi32_epi8(low));
          out.sum16[half] = _mm512_reduce_add_epi32(q[half]);
          total += out.sum16[half];
        }
        out.scale = d;
        out.scaled_sum = d * static_cast<float>(total);
      }
    }
  };
  // a decode step's few rows: a fork and join would cost more than the work
  if (rows <= 4) {
    rows_from(0, rows);
  } else {
    at::parallel_for(0, rows, 1, rows_from);
  }
}

// The arithmetic of every quantized output element, whichever code computes it:
//   acc = 0; for each block of 32 (in order), for each half h (Q6_K has two):
//     acc = fma(float(exact integer sum of (w - ZERO) * q), w_scale * x_scale, acc)
//   and for types with a minimum: acc = fma(w_min, x_scale * sum(q), acc).
// Vectors run across 16 weight rows (16 output columns), so no element's sum is
// ever split between lanes: tiles of rows and columns change nothing.

// 16 rows of 16 int32 -> 16 columns: v[i] lane j <- v[j] lane i
inline void transpose16(__m512i* v) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes: rows 4i..4i+3 hold lane group i
    t[i] = _mm512_shuffle_i32x4(v[i], v[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(v[i], v[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_i32x4(v[8 + i], v[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(v[8 + i], v[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    v[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xDD);
    v[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
    v[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xDD);
  }
}

// One quantized matrix of a product whose matrices sit side by side (Q, K and V;
// gate and up)
struct Part {
  const uint8_t* w;
  int64_t n, row_bytes, block_bytes;  // rows, bytes a row, bytes a block (the type)
  int64_t col;                        // its first output column
};

// fn(scratch, part, g) for group g (16 rows) of each part: every part's groups in one
// parallel loop, one fork and join for all, each thread with its own Scratch
template <class Scratch, class Fn>
void for_groups(const std::vector<Part>& parts, Fn fn) {
  std::vector<int64_t> first{0};  // part i owns groups [first[i], first[i + 1])
  for (const Part& p : parts) first.push_back(first.back() + (p.n + 15) / 16);
  at::parallel_for(0, first.back(), 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    size_t i = 0;
    for (int64_t g = begin; g < end; ++g) {
      while (g >= first[i + 1]) ++i;
      fn(scratch, parts[i], g - first[i]);
    }
  });
}

// An AMX tile configuration (palette 1): rows and bytes a row of each tile register
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Products on AMX-BF16 tiles (qmatmul_amx.cpp) of x float32 [m, k]: false where the
// CPU or the kernel lacks them.
bool amx_matmul(const std::vector<Part>& parts, const float* x, int64_t m, int64_t k, float* out,
                int64_t ldy);
bool amx_available();

inline __m512 load_weights(const float* w, __mmask16 m) { return _mm512_maskz_loadu_ps(m, w); }

inline __m512 load_weights(const at::Half* w, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w));
}

inline __m512 load_weights(const at::BFloat16* w, __mmask16 m) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// y[r * ldy] = the float32 dot of weight row w (float, float16 or bfloat16) with
// activation row r0 + r of x [., k], for R rows: 16 lanes of FMAs along k, then
// _mm512_reduce_add_ps's fixed tree, so each sum has one order whatever calls it
template <class W, int R>
inline void dot_float(const W* w, const float* x, int64_t r0, int64_t k, float* y, int64_t ldy) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    __mmask16 m = lanes(k - i);
    __m512 wv = load_weights(w + i, m);
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + (r0 + r) * k + i), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = _mm512_reduce_add_ps(acc[r]);
}

}  // namespace accordion_native
