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
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <cstdint>
#include <optional>
#include <vector>

using at::Tensor;

namespace {

constexpr int64_t MR = 8;  // activation rows per tile: each decoded weight block serves them all
constexpr int64_t NB = 8;
constexpr int64_t PREFETCH = 768;  // bytes of weights fetched ahead of the one decoded  // weight
                                   // rows per pass over a tile of activation rows

inline float f16(const uint8_t* p) { return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p)); }

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

// One block of 32 weights of one row: its unsigned values (32 bytes; the weight is
// (value - ZERO) * scale, + min for types with a free minimum), the scale of its
// first and second 16 values (the same but for Q6_K) and that minimum.
struct Block {
  __m256i q;
  float scale[2];
  float min;
};

inline void set_scale(Block* b, float s) { b->scale[0] = b->scale[1] = s; }

// Each type: BYTES per unit of BLOCK values (SUBS blocks of 32); HALVES: scales
// per block (2: one per 16 values); ZERO: the zero point of its values; MIN: a free
// minimum; decode(row, u, out) fills the SUBS blocks of unit u.
struct Q4_0 {
  static constexpr int HALVES = 1, BLOCK = 32, BYTES = 18, SUBS = 1;
  static constexpr int ZERO = 8;
  static constexpr bool MIN = false;
  static constexpr int SCALE_AT = 0, MIN_AT = -1;  // byte offsets of d and m
  static __m256i values(const uint8_t* p) { return nibbles(load128(p + 2)); }
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* p = row + u * BYTES;
    b->q = nibbles(load128(p + 2));
    set_scale(b, f16(p));
  }
};

struct Q4_1 {
  static constexpr int HALVES = 1, BLOCK = 32, BYTES = 20, SUBS = 1;
  static constexpr int ZERO = 0;
  static constexpr bool MIN = true;
  static constexpr int SCALE_AT = 0, MIN_AT = 2;  // byte offsets of d and m
  static __m256i values(const uint8_t* p) { return nibbles(load128(p + 4)); }
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* p = row + u * BYTES;
    b->q = nibbles(load128(p + 4));
    set_scale(b, f16(p));
    b->min = f16(p + 2);
  }
};

struct Q5_0 {
  static constexpr int HALVES = 1, BLOCK = 32, BYTES = 22, SUBS = 1;
  static constexpr int ZERO = 16;
  static constexpr bool MIN = false;
  static constexpr int SCALE_AT = 0, MIN_AT = -1;  // byte offsets of d and m
  static __m256i values(const uint8_t* p) {
    return _mm256_or_si256(nibbles(load128(p + 6)), fifth_bits(u32(p + 2)));
  }
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* p = row + u * BYTES;
    __m256i q = _mm256_or_si256(nibbles(load128(p + 6)), fifth_bits(u32(p + 2)));
    b->q = q;
    set_scale(b, f16(p));
  }
};

struct Q5_1 {
  static constexpr int HALVES = 1, BLOCK = 32, BYTES = 24, SUBS = 1;
  static constexpr int ZERO = 0;
  static constexpr bool MIN = true;
  static constexpr int SCALE_AT = 0, MIN_AT = 2;  // byte offsets of d and m
  static __m256i values(const uint8_t* p) {
    return _mm256_or_si256(nibbles(load128(p + 8)), fifth_bits(u32(p + 4)));
  }
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* p = row + u * BYTES;
    b->q = _mm256_or_si256(nibbles(load128(p + 8)), fifth_bits(u32(p + 4)));
    set_scale(b, f16(p));
    b->min = f16(p + 2);
  }
};

struct Q8_0 {
  static constexpr int HALVES = 1, BLOCK = 32, BYTES = 34, SUBS = 1;
  static constexpr int ZERO = 128;
  static constexpr bool MIN = false;
  static constexpr int SCALE_AT = 0, MIN_AT = -1;  // byte offsets of d and m
  static __m256i values(const uint8_t* p) {
    return _mm256_xor_si256(load256(p + 2), _mm256_set1_epi8(static_cast<char>(0x80)));
  }
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* p = row + u * BYTES;
    b->q = _mm256_xor_si256(load256(p + 2), _mm256_set1_epi8(static_cast<char>(0x80)));  // q + 128
    set_scale(b, f16(p));
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
    set_scale(&b[j], d * sc);
    b[j].min = -dmin * mn;
  }
}

// 32 bytes of qs: low nibbles are sub-block 2c, high nibbles 2c + 1
inline __m256i k_nibbles(const uint8_t* qs, int high) {
  __m256i v = load256(qs);
  if (high) v = _mm256_srli_epi16(v, 4);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

struct Q4_K {
  static constexpr int HALVES = 1, BLOCK = 256, BYTES = 144, SUBS = 8;
  static constexpr int ZERO = 0;
  static constexpr bool MIN = true;
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* sb = row + u * BYTES;
    k_scales(sb, b);
    for (int j = 0; j < 8; ++j) b[j].q = k_nibbles(sb + 16 + 32 * (j / 2), j % 2);
  }
};

struct Q5_K {
  static constexpr int HALVES = 1, BLOCK = 256, BYTES = 176, SUBS = 8;
  static constexpr int ZERO = 0;
  static constexpr bool MIN = true;
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* sb = row + u * BYTES;
    k_scales(sb, b);
    __m256i qh = load256(sb + 16);  // bit j of byte l: the fifth bit of value l of sub-block j
    for (int j = 0; j < 8; ++j) {
      __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, j), _mm256_set1_epi8(0x01));
      __m256i q =
          _mm256_or_si256(k_nibbles(sb + 48 + 32 * (j / 2), j % 2), _mm256_slli_epi16(high, 4));
      b[j].q = q;
    }
  }
};

struct Q6_K {
  static constexpr int BLOCK = 256, BYTES = 210, SUBS = 8, HALVES = 2;
  static constexpr int ZERO = 32;
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
      b[j].q = q;
      // 16 values per scale: int16 lanes 0-15 are int32 lanes 0-7
      b[j].scale[0] = d * sc[8 * n + 2 * i];
      b[j].scale[1] = d * sc[8 * n + 2 * i + 1];
    }
  }
};

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
// products, which VNNI (and AMX) compute exactly.
constexpr int32_t LEVELS = 127 * 256 + 127;

struct Act {
  int64_t blocks = 0, pairs = 0;  // blocks of 32; pairs of blocks (the last one padded)
  std::vector<int8_t> h, l;       // [rows][pairs * 64]
  std::vector<float> scale;       // [rows][pairs * 2]
  std::vector<int32_t> sum16;     // [rows][pairs * 4]: sum(q) of each 16 values
  std::vector<float> scaled_sum;  // [rows][pairs * 2]: scale * sum(q), for the minimums

  const int32_t* h_at(int64_t r, int64_t b) const {
    return reinterpret_cast<const int32_t*>(h.data() + (r * pairs * 2 + b) * 32);
  }
  const int32_t* l_at(int64_t r, int64_t b) const {
    return reinterpret_cast<const int32_t*>(l.data() + (r * pairs * 2 + b) * 32);
  }
  int64_t at(int64_t r, int64_t b) const { return r * pairs * 2 + b; }
};

void quantize(const float* x, int64_t rows, int64_t k, Act& a) {
  a.blocks = k / 32;
  a.pairs = (a.blocks + 1) / 2;
  int64_t padded = a.pairs * 2;
  a.h.assign(rows * padded * 32, 0);
  a.l.assign(rows * padded * 32, 0);
  a.scale.assign(rows * padded, 0.f);
  a.sum16.assign(rows * padded * 2, 0);
  a.scaled_sum.assign(rows * padded, 0.f);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < a.blocks; ++b) {
        const float* xb = x + r * k + b * 32;
        __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        float d = amax / LEVELS, id = amax > 0.f ? LEVELS / amax : 0.f;
        __m512i q[2] = {_mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(id))),
                        _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(id)))};
        int64_t i = a.at(r, b);
        int32_t total = 0;
        for (int half = 0; half < 2; ++half) {
          q[half] = _mm512_max_epi32(_mm512_min_epi32(q[half], _mm512_set1_epi32(LEVELS)),
                                     _mm512_set1_epi32(-LEVELS));
          __m512i high = _mm512_srai_epi32(_mm512_add_epi32(q[half], _mm512_set1_epi32(128)), 8);
          __m512i low = _mm512_sub_epi32(q[half], _mm512_slli_epi32(high, 8));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(a.h.data() + i * 32 + 16 * half),
                           _mm512_cvtepi32_epi8(high));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(a.l.data() + i * 32 + 16 * half),
                           _mm512_cvtepi32_epi8(low));
          a.sum16[2 * i + half] = _mm512_reduce_add_epi32(q[half]);
          total += a.sum16[2 * i + half];
        }
        a.scale[i] = d;
        a.scaled_sum[i] = d * static_cast<float>(total);
      }
    }
  });
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

// 16 weight rows decoded, a pair of blocks at a time: 16 vectors of the rows'
// value quads (quad j of every row in vector j: 0-7 the first block, 8-15 the
// second), the rows' scales (per block, per half) and minimums (per block).
struct Panel {
  std::vector<__m512i> q;     // [pairs][16]
  std::vector<__m512> scale;  // [pairs * 2][2]
  std::vector<__m512> min;    // [pairs * 2]

  void resize(int64_t pairs) {
    q.resize(pairs * 16);
    scale.resize(pairs * 4);
    min.resize(pairs * 2);
  }
};

// Decodes unit u (T::SUBS blocks) of `rows` (<= 16) weight rows into the panel,
// at block b0 (even); a last odd block is paired with zeros.
// 16 rows' fp16 at byte `at` of each row (row r at base + r * row_bytes) as floats
inline __m512 gather_f16(const uint8_t* base, int64_t row_bytes, int rows, int64_t at) {
  __m512i idx =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int32_t>(row_bytes)));
  __mmask16 m = rows >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << rows) - 1);
  __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, base + at, 1);
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
}

template <class T>
inline void decode_unit(const uint8_t* base, int64_t row_bytes, int rows, int64_t u, int64_t blocks,
                        Panel& p, int64_t b0) {
  if constexpr (T::SUBS == 1) {  // blocks u and u + 1, scales gathered across the rows
    bool second = u + 1 < blocks;
    __m512i* v = p.q.data() + (b0 / 2) * 16;
    for (int r = 0; r < 16; ++r) {
      if (r >= rows) {  // past the matrix's last row: zeros, whose outputs are not stored
        v[r] = _mm512_setzero_si512();
        continue;
      }
      const uint8_t* w = base + r * row_bytes + u * T::BYTES;
      // the file's pages are 4 KiB, where the hardware prefetcher stops: fetch
      // ahead by hand
      _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH), _MM_HINT_T0);
      __m256i hi = second ? T::values(w + T::BYTES) : _mm256_setzero_si256();
      v[r] = _mm512_inserti64x4(_mm512_castsi256_si512(T::values(w)), hi, 1);
    }
    transpose16(v);
    for (int i = 0; i < 2; ++i) {
      __m512 scale = _mm512_setzero_ps(), min = _mm512_setzero_ps();
      if (u + i < blocks) {
        scale = gather_f16(base, row_bytes, rows, (u + i) * T::BYTES + T::SCALE_AT);
        if constexpr (T::MIN) {
          min = gather_f16(base, row_bytes, rows, (u + i) * T::BYTES + T::MIN_AT);
        }
      }
      int64_t b = b0 + i;  // where in the panel
      p.scale[2 * b] = p.scale[2 * b + 1] = scale;
      p.min[b] = min;
    }
    return;
  }
  constexpr int S = T::SUBS < 2 ? 2 : T::SUBS;  // a pair of blocks at least
  Block blk[16][S];
  alignas(64) float sc0[S][16], sc1[S][16], mn[S][16];
  int n = static_cast<int>(std::min<int64_t>(S, blocks - u * T::SUBS));  // blocks here
  for (int r = 0; r < 16; ++r) {
    for (int j = 0; j < S; ++j) blk[r][j] = Block{_mm256_setzero_si256(), {0.f, 0.f}, 0.f};
    if (r < rows) {
      const uint8_t* w = base + r * row_bytes;
      // the file's pages are 4 KiB, where the hardware prefetcher stops: fetch
      // ahead by hand
      _mm_prefetch(reinterpret_cast<const char*>(w + u * T::BYTES + PREFETCH), _MM_HINT_T0);
      for (int j = 0; j < n; j += T::SUBS) T::decode(w, u + j / T::SUBS, blk[r] + j);
    }  // past the matrix's last row: zeros, whose outputs are not stored
    for (int j = 0; j < S; ++j) {
      sc0[j][r] = blk[r][j].scale[0];
      sc1[j][r] = blk[r][j].scale[1];
      mn[j][r] = T::MIN ? blk[r][j].min : 0.f;
    }
  }
  for (int j = 0; j < S; j += 2) {
    int64_t pair = (b0 + j) / 2;
    __m512i* v = p.q.data() + pair * 16;
    for (int r = 0; r < 16; ++r) {
      v[r] = _mm512_inserti64x4(_mm512_castsi256_si512(blk[r][j].q), blk[r][j + 1].q, 1);
    }
    transpose16(v);
    for (int i = 0; i < 2; ++i) {
      int64_t b = b0 + j + i;
      p.scale[2 * b] = _mm512_load_ps(sc0[j + i]);
      p.scale[2 * b + 1] = _mm512_load_ps(sc1[j + i]);
      p.min[b] = _mm512_load_ps(mn[j + i]);
    }
  }
}

// Block pb of the panel against block b of activation rows r0..r0+R, into acc.
template <class T, int R>
inline void accumulate(const Panel& p, int64_t pb, const Act& a, int64_t r0, int64_t b,
                       __m512* acc) {
  const __m512i* w = p.q.data() + (pb / 2) * 16 + (pb % 2) * 8;
  for (int half = 0; half < T::HALVES; ++half) {
    constexpr int QUADS = 8 / T::HALVES;
    __m512i high[R], low[R];
    for (int r = 0; r < R; ++r) high[r] = low[r] = _mm512_setzero_si512();
    for (int k = half * QUADS; k < (half + 1) * QUADS; ++k) {
      for (int r = 0; r < R; ++r) {
        high[r] = dpbusd(high[r], w[k], _mm512_set1_epi32(a.h_at(r0 + r, b)[k]));
        low[r] = dpbusd(low[r], w[k], _mm512_set1_epi32(a.l_at(r0 + r, b)[k]));
      }
    }
    __m512 ws = p.scale[2 * pb + (T::HALVES == 2 ? half : 0)];
    for (int r = 0; r < R; ++r) {
      int64_t i = a.at(r0 + r, b);
      int32_t xs = T::HALVES == 2 ? a.sum16[2 * i + half] : a.sum16[2 * i] + a.sum16[2 * i + 1];
      __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(high[r], 8), low[r]);
      sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(T::ZERO * xs));
      __m512 scale = _mm512_mul_ps(ws, _mm512_set1_ps(a.scale[i]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r]);
    }
  }
  if constexpr (T::MIN) {
    for (int r = 0; r < R; ++r) {
      __m512 xs = _mm512_set1_ps(a.scaled_sum[a.at(r0 + r, b)]);
      acc[r] = _mm512_fmadd_ps(p.min[pb], xs, acc[r]);
    }
  }
}

template <int R>
inline void store_rows(const __m512* acc, float* y, int64_t ldy, int cols) {
  __mmask16 m = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy, m, acc[r]);
}

constexpr int64_t unit_blocks(int subs) { return subs < 2 ? 2 : subs; }

// Few activation rows (decode): each unit decoded and used at once, `p` holds one.
template <class T, int R>
void stream_rows(const uint8_t* base, int64_t row_bytes, int cols, const Act& a, Panel& p, float* y,
                 int64_t ldy) {
  constexpr int64_t U = unit_blocks(T::SUBS);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < a.blocks; b0 += U) {
    decode_unit<T>(base, row_bytes, cols, b0 / T::SUBS, a.blocks, p, 0);
    for (int64_t j = 0; j < std::min(U, a.blocks - b0); ++j) {
      accumulate<T, R>(p, j, a, 0, b0 + j, acc);
    }
  }
  store_rows<R>(acc, y, ldy, cols);
}

// Many activation rows (prefill): the panel decoded once for the whole K, then
// rows r0..r0+R at a time.
template <class T, int R>
void panel_rows(const Panel& p, const Act& a, int64_t r0, float* y, int64_t ldy, int cols) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.blocks; ++b) accumulate<T, R>(p, b, a, r0, b, acc);
  store_rows<R>(acc, y, ldy, cols);
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
  int64_t n = w.size(0), row_bytes = w.size(1) * w.size(2);
  at::parallel_for(0, (n + 15) / 16, 1, [&](int64_t begin, int64_t end) {
    Panel panel;
    panel.resize(m <= MR ? unit_blocks(T::SUBS) / 2 : a.pairs);
    for (int64_t g = begin; g < end; ++g) {
      int64_t n0 = 16 * g;
      const uint8_t* rows = base + n0 * row_bytes;
      int cols = static_cast<int>(std::min<int64_t>(16, n - n0));
      if (m <= MR) {
        switch (m) {
          case 8:
            stream_rows<T, 8>(rows, row_bytes, cols, a, panel, out + n0, ldy);
            break;
          case 7:
            stream_rows<T, 7>(rows, row_bytes, cols, a, panel, out + n0, ldy);
            break;
          case 6:
            stream_rows<T, 6>(rows, row_bytes, cols, a, panel, out + n0, ldy);
            break;
          case 5:
            stream_rows<T, 5>(rows, row_bytes, cols, a, panel, out + n0, ldy);
            break;
          case 4:
            stream_rows<T, 4>(rows, row_bytes, cols, a, panel, out + n0, ldy);
            break;
          case 3:
            stream_rows<T, 3>(rows, row_bytes, cols, a, panel, out + n0, ldy);
            break;
          case 2:
            stream_rows<T, 2>(rows, row_bytes, cols, a, panel, out + n0, ldy);
            break;
          default:
            stream_rows<T, 1>(rows, row_bytes, cols, a, panel, out + n0, ldy);
        }
        continue;
      }
      for (int64_t b0 = 0; b0 < a.blocks; b0 += unit_blocks(T::SUBS)) {
        decode_unit<T>(rows, row_bytes, cols, b0 / T::SUBS, a.blocks, panel, b0);
      }
      for (int64_t r0 = 0; r0 < m; r0 += MR) {
        float* y = out + r0 * ldy + n0;
        switch (std::min(MR, m - r0)) {
          case 8:
            panel_rows<T, 8>(panel, a, r0, y, ldy, cols);
            break;
          case 7:
            panel_rows<T, 7>(panel, a, r0, y, ldy, cols);
            break;
          case 6:
            panel_rows<T, 6>(panel, a, r0, y, ldy, cols);
            break;
          case 5:
            panel_rows<T, 5>(panel, a, r0, y, ldy, cols);
            break;
          case 4:
            panel_rows<T, 4>(panel, a, r0, y, ldy, cols);
            break;
          case 3:
            panel_rows<T, 3>(panel, a, r0, y, ldy, cols);
            break;
          case 2:
            panel_rows<T, 2>(panel, a, r0, y, ldy, cols);
            break;
          default:
            panel_rows<T, 1>(panel, a, r0, y, ldy, cols);
        }
      }
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

// -- AMX: many activation rows at once, the same integers and the same float steps --
//
// On CPUs with AMX-INT8 a tile product computes the 16 x 16 exact block sums of 16
// weight rows (the u8 tile) against 16 activation rows (the s8 tile, h or l
// digits); the float steps that follow are the canonical ones above, lanes running
// across activation rows instead of weight rows (w_scale * x_scale is the same
// product either way). Results are bit for bit those of the vector code.
#ifdef __AMX_INT8__
constexpr int64_t AMX_MIN_ROWS = 32;  // below this the tiles' fixed costs do not pay

bool amx_permitted() {  // Linux lends the tile state to a process that asks
  static const bool ok =
      syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Activations for the tiles: per tile of 16 rows and block, the h and l digits as
// quads [8][16 rows][4], and the per-row scale, sums and scaled sums as vectors.
struct TileAct {
  int64_t tiles = 0, blocks = 0;
  std::vector<int32_t> h, l;              // [tiles][blocks][8][16]
  std::vector<__m512> scale, scaled_sum;  // [tiles][blocks]
  std::vector<__m512i> sum16;             // [tiles][blocks][2]
};

void tile_activations(const Act& a, int64_t m, TileAct& t) {
  t.tiles = (m + 15) / 16;
  t.blocks = a.blocks;
  t.h.assign(t.tiles * t.blocks * 128, 0);
  t.l.assign(t.tiles * t.blocks * 128, 0);
  t.scale.resize(t.tiles * t.blocks);
  t.scaled_sum.resize(t.tiles * t.blocks);
  t.sum16.resize(t.tiles * t.blocks * 2);
  for (int64_t tile = 0; tile < t.tiles; ++tile) {
    for (int64_t b = 0; b < t.blocks; ++b) {
      alignas(64) float sc[16] = {}, ss[16] = {};
      alignas(64) int32_t s0[16] = {}, s1[16] = {};
      int64_t o = (tile * t.blocks + b) * 128;
      for (int r = 0; r < 16 && tile * 16 + r < m; ++r) {
        int64_t row = tile * 16 + r, i = a.at(row, b);
        for (int k = 0; k < 8; ++k) {
          t.h[o + k * 16 + r] = a.h_at(row, b)[k];
          t.l[o + k * 16 + r] = a.l_at(row, b)[k];
        }
        sc[r] = a.scale[i];
        ss[r] = a.scaled_sum[i];
        s0[r] = a.sum16[2 * i];
        s1[r] = a.sum16[2 * i + 1];
      }
      int64_t j = tile * t.blocks + b;
      t.scale[j] = _mm512_load_ps(sc);
      t.scaled_sum[j] = _mm512_load_ps(ss);
      t.sum16[2 * j] = _mm512_load_si512(s0);
      t.sum16[2 * j + 1] = _mm512_load_si512(s1);
    }
  }
}

// 16 weight rows decoded row-major for the tiles: values [blocks][16][32] and, per
// block, each row's scales (two halves) and minimum.
template <class T>
void decode_rows(const uint8_t* base, int64_t row_bytes, int rows, int64_t blocks,
                 std::vector<uint8_t>& q, std::vector<float>& scale, std::vector<float>& min) {
  q.assign(blocks * 512, 0);
  scale.assign(blocks * 32, 0.f);
  min.assign(blocks * 16, 0.f);
  Block blk[T::SUBS];
  for (int r = 0; r < rows; ++r) {
    const uint8_t* w = base + r * row_bytes;
    for (int64_t u = 0; u < blocks / T::SUBS; ++u) {
      T::decode(w, u, blk);
      for (int j = 0; j < T::SUBS; ++j) {
        int64_t b = u * T::SUBS + j;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.data() + (b * 16 + r) * 32), blk[j].q);
        scale[b * 32 + r] = blk[j].scale[0];
        scale[b * 32 + 16 + r] = blk[j].scale[1];
        min[b * 16 + r] = T::MIN ? blk[j].min : 0.f;
      }
    }
  }
}

template <class T>
void run_amx(const Tensor& w, const Act& a, int64_t m, float* out, int64_t ldy) {
  TileAct t;
  tile_activations(a, m, t);
  const uint8_t* base = w.data_ptr<uint8_t>();
  int64_t n = w.size(0), row_bytes = w.size(1) * w.size(2), blocks = a.blocks;
  constexpr int BYTES = 32 / T::HALVES, QUADS = 8 / T::HALVES;  // per tile product
  at::parallel_for(0, (n + 15) / 16, 1, [&](int64_t begin, int64_t end) {
    TileConfig cfg;
    for (int i = 0; i < 4; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;  // two pairs of sums
    cfg.rows[4] = 16, cfg.colsb[4] = BYTES;  // weights: 16 rows of one (half) block
    for (int i = 5; i < 7; ++i) cfg.rows[i] = QUADS, cfg.colsb[i] = 64;  // digits h, l
    _tile_loadconfig(&cfg);
    std::vector<uint8_t> q;
    std::vector<float> wscale, wmin;
    alignas(64) int32_t high[2][16][16], low[2][16][16];  // step s in buffer s % 2
    for (int64_t g = begin; g < end; ++g) {
      int64_t n0 = 16 * g;
      int cols = static_cast<int>(std::min<int64_t>(16, n - n0));
      decode_rows<T>(base + n0 * row_bytes, row_bytes, cols, blocks, q, wscale, wmin);
      for (int64_t tile = 0; tile < t.tiles; ++tile) {
        __m512 acc[16];  // acc[weight row] across the tile's activation rows
        for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
        // the tile intrinsics take their tile numbers as literals: one copy per pair
#define ACCORDION_PRODUCT(H, L, step)                               \
  do {                                                              \
    int64_t b_ = (step) / T::HALVES, half_ = (step) % T::HALVES;    \
    int64_t j_ = tile * blocks + b_;                                \
    _tile_zero(H);                                                  \
    _tile_zero(L);                                                  \
    _tile_loadd(4, q.data() + b_ * 512 + half_ * BYTES, 32);        \
    _tile_loadd(5, t.h.data() + j_ * 128 + half_ * QUADS * 16, 64); \
    _tile_loadd(6, t.l.data() + j_ * 128 + half_ * QUADS * 16, 64); \
    _tile_dpbusd(H, 4, 5);                                          \
    _tile_dpbusd(L, 4, 6);                                          \
  } while (0)
#define ACCORDION_STORE(H, L, buf)  \
  do {                              \
    _tile_stored(H, high[buf], 64); \
    _tile_stored(L, low[buf], 64);  \
  } while (0)
        auto fold = [&](int64_t step) {
          const int buf = step % 2;
          int64_t b = step / T::HALVES, half = step % T::HALVES, j = tile * blocks + b;
          __m512i xs = T::HALVES == 2 ? t.sum16[2 * j + half]
                                      : _mm512_add_epi32(t.sum16[2 * j], t.sum16[2 * j + 1]);
          __m512i zero = _mm512_mullo_epi32(xs, _mm512_set1_epi32(T::ZERO));
          const float* ws = wscale.data() + b * 32 + (T::HALVES == 2 ? half * 16 : 0);
#pragma GCC unroll 16
          for (int r = 0; r < 16; ++r) {
            __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(high[buf][r]), 8),
                                           _mm512_load_si512(low[buf][r]));
            sum = _mm512_sub_epi32(sum, zero);
            __m512 scale = _mm512_mul_ps(_mm512_set1_ps(ws[r]), t.scale[j]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r]);
          }
          if (T::MIN && half == T::HALVES - 1) {
#pragma GCC unroll 16
            for (int r = 0; r < 16; ++r) {
              acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(wmin[b * 16 + r]), t.scaled_sum[j], acc[r]);
            }
          }
        };
        // steps (block, half) in order; the tile products of step s + 1 run while
        // the vector code folds step s in, each into its own pair of sum tiles
        int64_t steps = blocks * T::HALVES;
        // three stages: products of step s + 1 in flight, step s stored, step s - 1
        // (stored an iteration ago) folded
        ACCORDION_PRODUCT(0, 1, 0);
        for (int64_t step = 0; step < steps; step += 2) {
          if (step + 1 < steps) ACCORDION_PRODUCT(2, 3, step + 1);
          ACCORDION_STORE(0, 1, 0);
          if (step > 0) fold(step - 1);
          if (step + 1 < steps) {
            if (step + 2 < steps) ACCORDION_PRODUCT(0, 1, step + 2);
            ACCORDION_STORE(2, 3, 1);
          }
          fold(step);
        }
        if (steps % 2 == 0) fold(steps - 1);
#undef ACCORDION_PRODUCT
#undef ACCORDION_STORE
        // acc[weight row][activation row] -> out[activation row][weight row]
        __m512i* v = reinterpret_cast<__m512i*>(acc);
        transpose16(v);
        __mmask16 mask = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
        for (int r = 0; r < 16 && tile * 16 + r < m; ++r) {
          _mm512_mask_storeu_ps(out + (tile * 16 + r) * ldy + n0, mask, _mm512_castsi512_ps(v[r]));
        }
      }
    }
    _tile_release();
  });
}
#endif

bool use_amx = true;  // tests switch it off to hold AMX to the vector code

template <class T>
void run_matrix(const Tensor& w, const Act& a, int64_t m, float* out, int64_t ldy) {
#ifdef __AMX_INT8__
  if (use_amx && m >= AMX_MIN_ROWS && amx_permitted()) return run_amx<T>(w, a, m, out, ldy);
#endif
  run_quantized<T>(w, a, m, out, ldy);
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
            run_matrix<Q4_0>(part, act, m, y + col, total);
            break;
          case Q4_1::BYTES:
            run_matrix<Q4_1>(part, act, m, y + col, total);
            break;
          case Q5_0::BYTES:
            run_matrix<Q5_0>(part, act, m, y + col, total);
            break;
          case Q5_1::BYTES:
            run_matrix<Q5_1>(part, act, m, y + col, total);
            break;
          case Q8_0::BYTES:
            run_matrix<Q8_0>(part, act, m, y + col, total);
            break;
          case Q4_K::BYTES:
            run_matrix<Q4_K>(part, act, m, y + col, total);
            break;
          case Q5_K::BYTES:
            run_matrix<Q5_K>(part, act, m, y + col, total);
            break;
          default:
            run_matrix<Q6_K>(part, act, m, y + col, total);
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

// Whether products of many rows may use AMX (where the CPU has it); returns
// whether they will. The tests hold the two paths to the same bits.
bool qmatmul_amx(bool on) {
  use_amx = on;
#ifdef __AMX_INT8__
  return on && amx_permitted();
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(accordion, m) {
  m.def("qmatmul(Tensor x, Tensor[] w, Tensor? bias) -> Tensor");
  m.def("qmatmul_amx(bool on) -> bool");
  m.impl("qmatmul_amx", c10::DispatchKey::CatchAll, &qmatmul_amx);
  m.impl("qmatmul", c10::DispatchKey::CompositeImplicitAutograd, &qmatmul);
}
