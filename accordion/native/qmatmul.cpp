// y = x @ W.T straight from a GGUF file's blocks: the one weight path of every
// step, prefill or decode, so a token's numbers never depend on its batch.
//
// Quantized weights meet activations quantized per block of 32 to int16 (one
// float scale per block): a block's products are summed exactly in int32 lanes
// (VNNI's vpdpwssd, or madd + add, which give the same integers), then scaled
// and accumulated in float32. Each output element goes through the same
// instructions in the same order whatever the number of rows, the tile it falls
// in or the thread that runs it: rows are tiled only so that one decoded weight
// block serves several. F32, F16 and BF16 weights take float32 activations
// through FMAs in the same way.
//
// Weights are decoded to signed int16 values (the zero point subtracted: q - 8
// for Q4_0, q - 32 for Q6_K, ...); types with a free minimum (Q4_1, Q5_1, Q4_K,
// Q5_K) add min * scale_x * sum(x) per block in float.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

using at::Tensor;

namespace {

constexpr int64_t MR = 8;  // activation rows per tile: each decoded weight block serves them all
constexpr int64_t NB = 8;  // weight rows per pass over a tile of activation rows

inline float f16(const uint8_t* p) { return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p)); }

// int16 x int16 products summed two at a time into int32 lanes, exactly
inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

inline __m512i widen(__m256i bytes) { return _mm512_cvtepu8_epi16(bytes); }

inline __m256i load256(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

inline __m128i load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// 16 packed bytes -> 32 values: low nibbles are values 0-15, high nibbles 16-31
inline __m256i nibbles(__m128i qs) {
  __m256i v = _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

// the fifth bits: bit i of qh sets 0x10 in byte i
inline __m256i fifth_bits(uint32_t qh) { return _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(0x10)); }

inline uint32_t u32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// One block of 32 weights: signed values (32 int16), the scale of each lane's
// values and, for types with a free minimum, that minimum in lane 0 (only lane 0:
// it multiplies the block's activation sum once).
struct Block {
  __m512i q;
  __m512 scale, min;
};

inline __m512 lane0(float v) { return _mm512_maskz_mov_ps(1, _mm512_set1_ps(v)); }

// Each type: BYTES per unit of BLOCK values (SUBS blocks of 32); MIN: a free
// minimum; decode(row, u, out) fills the SUBS blocks of unit u.
struct Q4_0 {
  static constexpr int BLOCK = 32, BYTES = 18, SUBS = 1;
  static constexpr bool MIN = false;
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* p = row + u * BYTES;
    b->q = _mm512_sub_epi16(widen(nibbles(load128(p + 2))), _mm512_set1_epi16(8));
    b->scale = _mm512_set1_ps(f16(p));
  }
};

struct Q4_1 {
  static constexpr int BLOCK = 32, BYTES = 20, SUBS = 1;
  static constexpr bool MIN = true;
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* p = row + u * BYTES;
    b->q = widen(nibbles(load128(p + 4)));
    b->scale = _mm512_set1_ps(f16(p));
    b->min = lane0(f16(p + 2));
  }
};

struct Q5_0 {
  static constexpr int BLOCK = 32, BYTES = 22, SUBS = 1;
  static constexpr bool MIN = false;
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* p = row + u * BYTES;
    __m256i q = _mm256_or_si256(nibbles(load128(p + 6)), fifth_bits(u32(p + 2)));
    b->q = _mm512_sub_epi16(widen(q), _mm512_set1_epi16(16));
    b->scale = _mm512_set1_ps(f16(p));
  }
};

struct Q5_1 {
  static constexpr int BLOCK = 32, BYTES = 24, SUBS = 1;
  static constexpr bool MIN = true;
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* p = row + u * BYTES;
    b->q = widen(_mm256_or_si256(nibbles(load128(p + 8)), fifth_bits(u32(p + 4))));
    b->scale = _mm512_set1_ps(f16(p));
    b->min = lane0(f16(p + 2));
  }
};

struct Q8_0 {
  static constexpr int BLOCK = 32, BYTES = 34, SUBS = 1;
  static constexpr bool MIN = false;
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* p = row + u * BYTES;
    b->q = _mm512_cvtepi8_epi16(load256(p + 2));
    b->scale = _mm512_set1_ps(f16(p));
  }
};

// Q4_K and Q5_K: the 6-bit scale and minimum of sub-block j of a super-block
inline void scale_min_k4(const uint8_t* s, int j, float& sc, float& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

inline void k_scales(const uint8_t* sb, Block* b) {
  float d = f16(sb), dmin = f16(sb + 2);
  for (int j = 0; j < 8; ++j) {
    float sc, mn;
    scale_min_k4(sb + 4, j, sc, mn);
    b[j].scale = _mm512_set1_ps(d * sc);
    b[j].min = lane0(-dmin * mn);
  }
}

// 32 bytes of qs: low nibbles are sub-block 2c, high nibbles 2c + 1
inline __m256i k_nibbles(const uint8_t* qs, int high) {
  __m256i v = load256(qs);
  if (high) v = _mm256_srli_epi16(v, 4);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

struct Q4_K {
  static constexpr int BLOCK = 256, BYTES = 144, SUBS = 8;
  static constexpr bool MIN = true;
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* sb = row + u * BYTES;
    k_scales(sb, b);
    for (int j = 0; j < 8; ++j) b[j].q = widen(k_nibbles(sb + 16 + 32 * (j / 2), j % 2));
  }
};

struct Q5_K {
  static constexpr int BLOCK = 256, BYTES = 176, SUBS = 8;
  static constexpr bool MIN = true;
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* sb = row + u * BYTES;
    k_scales(sb, b);
    __m256i qh = load256(sb + 16);  // bit j of byte l: the fifth bit of value l of sub-block j
    for (int j = 0; j < 8; ++j) {
      __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, j), _mm256_set1_epi8(0x01));
      __m256i q =
          _mm256_or_si256(k_nibbles(sb + 48 + 32 * (j / 2), j % 2), _mm256_slli_epi16(high, 4));
      b[j].q = widen(q);
    }
  }
};

struct Q6_K {
  static constexpr int BLOCK = 256, BYTES = 210, SUBS = 8;
  static constexpr bool MIN = false;
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* sb = row + u * BYTES;
    const int8_t* sc = reinterpret_cast<const int8_t*>(sb + 192);
    float d = f16(sb + 208);
    // half n (values 128n..): sub-block 4n + i takes ql[64n + 32 (i % 2)..] (low
    // nibbles for i < 2, high for i >= 2) and bits 2i, 2i + 1 of qh[32n..]
    for (int j = 0; j < 8; ++j) {
      int n = j / 4, i = j % 4;
      __m256i low = k_nibbles(sb + 64 * n + 32 * (i % 2), i / 2);
      __m256i qh = load256(sb + 128 + 32 * n);
      __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * i), _mm256_set1_epi8(0x03));
      __m256i q = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
      b[j].q = _mm512_sub_epi16(widen(q), _mm512_set1_epi16(32));
      // 16 values per scale: int16 lanes 0-15 are int32 lanes 0-7
      float s0 = d * sc[8 * n + 2 * i], s1 = d * sc[8 * n + 2 * i + 1];
      b[j].scale =
          _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(s0)), _mm256_set1_ps(s1), 1);
    }
  }
};

// Activation rows quantized per block of 32 to int16 (scale = max|x| / 32767):
// rounding moves a value by at most 1.5e-5 of its block's largest, finer than the
// bf16 activations other CPU paths use, where int8 (llama.cpp's choice) measurably
// moved SmolLM2's greedy tokens.
struct Act {
  int64_t blocks = 0;
  std::vector<int16_t> q;         // [rows][blocks * 32]
  std::vector<float> scale;       // [rows][blocks]
  std::vector<float> scaled_sum;  // [rows][blocks]: scale * sum(q), for the minimums

  const int16_t* q_at(int64_t r, int64_t b) const { return q.data() + (r * blocks + b) * 32; }
};

void quantize(const float* x, int64_t rows, int64_t k, Act& a) {
  a.blocks = k / 32;
  a.q.resize(rows * k);
  a.scale.resize(rows * a.blocks);
  a.scaled_sum.resize(rows * a.blocks);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < a.blocks; ++b) {
        const float* xb = x + r * k + b * 32;
        __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        float d = amax / 32767.f, id = amax > 0.f ? 32767.f / amax : 0.f;
        __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(id)));
        __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(id)));
        int16_t* dst = a.q.data() + r * k + b * 32;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtsepi32_epi16(qlo));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), _mm512_cvtsepi32_epi16(qhi));
        int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
        a.scale[r * a.blocks + b] = d;
        a.scaled_sum[r * a.blocks + b] = d * static_cast<float>(sum);
      }
    }
  });
}

// Rows r0..r0+R of y (stride ldy) at one column: weight row `w` against R activation rows.
template <class T, int R>
void dot_quantized(const uint8_t* w, const Act& a, int64_t r0, float* y, int64_t ldy) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  Block blk[T::SUBS];
  for (int64_t u = 0; u < a.blocks / T::SUBS; ++u) {
    T::decode(w, u, blk);
    for (int j = 0; j < T::SUBS; ++j) {
      int64_t b = u * T::SUBS + j;
      for (int r = 0; r < R; ++r) {
        const int64_t i = (r0 + r) * a.blocks + b;
        __m512i x = _mm512_loadu_si512(a.q_at(r0 + r, b));
        __m512i s = dpwssd(_mm512_setzero_si512(), blk[j].q, x);
        __m512 scale = _mm512_mul_ps(blk[j].scale, _mm512_set1_ps(a.scale[i]));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
        if constexpr (T::MIN) {
          acc[r] = _mm512_fmadd_ps(blk[j].min, _mm512_set1_ps(a.scaled_sum[i]), acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = _mm512_reduce_add_ps(acc[r]);
}

inline __m512 load_weights(const float* w, __mmask16 m) { return _mm512_maskz_loadu_ps(m, w); }

inline __m512 load_weights(const at::Half* w, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w));
}

inline __m512 load_weights(const at::BFloat16* w, __mmask16 m) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <class W, int R>
void dot_float(const W* w, const float* x, int64_t r0, int64_t k, float* y, int64_t ldy) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    __mmask16 m = k - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - i)) - 1);
    __m512 wv = load_weights(w + i, m);
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + (r0 + r) * k + i), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = _mm512_reduce_add_ps(acc[r]);
}

// Every (activation row, weight row) of one matrix: weight rows split over the
// threads, activation rows in tiles of MR; out[:, col:col + n].
template <class Fn>
void for_tiles(int64_t m, int64_t n, Fn fn) {
  at::parallel_for(0, n, NB, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += NB) {
      for (int64_t r0 = 0; r0 < m; r0 += MR) {
        for (int64_t j = n0; j < std::min(end, n0 + NB); ++j) fn(r0, std::min(MR, m - r0), j);
      }
    }
  });
}

template <class T>
void run_quantized(const Tensor& w, const Act& a, int64_t m, float* out, int64_t ldy) {
  const uint8_t* base = w.data_ptr<uint8_t>();
  int64_t row_bytes = w.size(1) * w.size(2);
  for_tiles(m, w.size(0), [&](int64_t r0, int64_t rows, int64_t j) {
    const uint8_t* row = base + j * row_bytes;
    float* y = out + r0 * ldy + j;
    switch (rows) {
      case 8:
        return dot_quantized<T, 8>(row, a, r0, y, ldy);
      case 7:
        return dot_quantized<T, 7>(row, a, r0, y, ldy);
      case 6:
        return dot_quantized<T, 6>(row, a, r0, y, ldy);
      case 5:
        return dot_quantized<T, 5>(row, a, r0, y, ldy);
      case 4:
        return dot_quantized<T, 4>(row, a, r0, y, ldy);
      case 3:
        return dot_quantized<T, 3>(row, a, r0, y, ldy);
      case 2:
        return dot_quantized<T, 2>(row, a, r0, y, ldy);
      default:
        return dot_quantized<T, 1>(row, a, r0, y, ldy);
    }
  });
}

template <class W>
void run_float(const Tensor& w, const float* x, int64_t m, int64_t k, float* out, int64_t ldy) {
  const W* base = w.data_ptr<W>();
  for_tiles(m, w.size(0), [&](int64_t r0, int64_t rows, int64_t j) {
    const W* row = base + j * k;
    float* y = out + r0 * ldy + j;
    switch (rows) {
      case 8:
        return dot_float<W, 8>(row, x, r0, k, y, ldy);
      case 7:
        return dot_float<W, 7>(row, x, r0, k, y, ldy);
      case 6:
        return dot_float<W, 6>(row, x, r0, k, y, ldy);
      case 5:
        return dot_float<W, 5>(row, x, r0, k, y, ldy);
      case 4:
        return dot_float<W, 4>(row, x, r0, k, y, ldy);
      case 3:
        return dot_float<W, 3>(row, x, r0, k, y, ldy);
      case 2:
        return dot_float<W, 2>(row, x, r0, k, y, ldy);
      default:
        return dot_float<W, 1>(row, x, r0, k, y, ldy);
    }
  });
}

// A quantized part is uint8 [rows, blocks, block bytes]; the block size names the type.
int64_t block_values(int64_t bytes) {
  switch (bytes) {
    case Q4_0::BYTES:
    case Q4_1::BYTES:
    case Q5_0::BYTES:
    case Q5_1::BYTES:
    case Q8_0::BYTES:
      return 32;
    case Q4_K::BYTES:
    case Q5_K::BYTES:
    case Q6_K::BYTES:
      return 256;
    default:
      TORCH_CHECK(false, "no quantized type has ", bytes, "-byte blocks");
  }
}

}  // namespace

// x float32 [M, K]; w: matrices whose outputs are concatenated, each either float
// ([N, K] float32, float16 or bfloat16) or quantized (uint8 [N, K / block, bytes]);
// bias float32 [sum N] or None. Returns float32 [M, sum N].
Tensor qmatmul(const Tensor& x, at::TensorList w, const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "x: contiguous float32 [M, K]");
  int64_t m = x.size(0), k = x.size(1), total = 0;
  bool any_quantized = false;
  for (const Tensor& part : w) {
    TORCH_CHECK(part.is_contiguous(), "weights must be contiguous");
    if (part.scalar_type() == at::kByte) {
      TORCH_CHECK(part.dim() == 3 && part.size(1) * block_values(part.size(2)) == k,
                  "quantized weights: [N, K / block, block bytes]");
      any_quantized = true;
    } else {
      TORCH_CHECK(part.dim() == 2 && part.size(1) == k, "float weights: [N, K]");
    }
    total += part.size(0);
  }
  Tensor out = at::empty({m, total}, x.options());
  if (m == 0 || total == 0) return out;
  Act act;
  if (any_quantized) {
    TORCH_CHECK(k % 32 == 0, "quantized weights need K a multiple of 32");
    quantize(x.data_ptr<float>(), m, k, act);
  }
  float* y = out.data_ptr<float>();
  int64_t col = 0;
  for (const Tensor& part : w) {
    switch (part.scalar_type()) {
      case at::kFloat:
        run_float<float>(part, x.data_ptr<float>(), m, k, y + col, total);
        break;
      case at::kHalf:
        run_float<at::Half>(part, x.data_ptr<float>(), m, k, y + col, total);
        break;
      case at::kBFloat16:
        run_float<at::BFloat16>(part, x.data_ptr<float>(), m, k, y + col, total);
        break;
      case at::kByte:
        switch (part.size(2)) {
          case Q4_0::BYTES:
            run_quantized<Q4_0>(part, act, m, y + col, total);
            break;
          case Q4_1::BYTES:
            run_quantized<Q4_1>(part, act, m, y + col, total);
            break;
          case Q5_0::BYTES:
            run_quantized<Q5_0>(part, act, m, y + col, total);
            break;
          case Q5_1::BYTES:
            run_quantized<Q5_1>(part, act, m, y + col, total);
            break;
          case Q8_0::BYTES:
            run_quantized<Q8_0>(part, act, m, y + col, total);
            break;
          case Q4_K::BYTES:
            run_quantized<Q4_K>(part, act, m, y + col, total);
            break;
          case Q5_K::BYTES:
            run_quantized<Q5_K>(part, act, m, y + col, total);
            break;
          default:
            run_quantized<Q6_K>(part, act, m, y + col, total);
        }
        break;
      default:
        TORCH_CHECK(false, "weights: float32, float16, bfloat16 or GGUF blocks (uint8)");
    }
    col += part.size(0);
  }
  if (bias.has_value()) out.add_(*bias);
  return out;
}

TORCH_LIBRARY_FRAGMENT(accordion, m) {
  m.def("qmatmul(Tensor x, Tensor[] w, Tensor? bias) -> Tensor");
  m.impl("qmatmul", c10::DispatchKey::CompositeImplicitAutograd, &qmatmul);
}
