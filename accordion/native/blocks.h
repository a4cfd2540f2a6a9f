// GGUF's quantized blocks as the matrix kernels read them (qmatmul.cpp, qmatmul_amx.cpp):
// each type decodes a block of 32 weights of one row to its unsigned values (the
// weight is (value - ZERO) * scale, plus a free minimum for Q4_1, Q5_1, Q4_K and
// Q5_K), checked against gguf's own decoders by tests/test_quant.py.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace accordion_native {

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

// The first n of 16 lanes (all of them for n >= 16): a partial group's rows or columns
inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// x[t] holds rows t, t + 4, t + 8, t + 12 in its four 128-bit lanes: per lane s, a
// 4 x 4 transpose of rows 4s..4s+3, so that out[j] lane r = 4s + i is word j of row r
[[gnu::always_inline]] inline void transpose_lanes4(const __m512i* x, __m512i* out) {
  __m512i lo01 = _mm512_unpacklo_epi32(x[0], x[1]), hi01 = _mm512_unpackhi_epi32(x[0], x[1]);
  __m512i lo23 = _mm512_unpacklo_epi32(x[2], x[3]), hi23 = _mm512_unpackhi_epi32(x[2], x[3]);
  out[0] = _mm512_unpacklo_epi64(lo01, lo23);
  out[1] = _mm512_unpackhi_epi64(lo01, lo23);
  out[2] = _mm512_unpacklo_epi64(hi01, hi23);
  out[3] = _mm512_unpackhi_epi64(hi01, hi23);
}

// 32-bit word j (0-3) of 16 rows' 16-byte pieces, out[j] lane r, from the pieces
// staged side by side in the order (row t, t + 4, t + 8, t + 12) for t = 0..3: four
// aligned loads, each row having been read in order when staged (qmatmul.cpp)
[[gnu::always_inline]] inline void transpose_staged4(const uint8_t* s, __m512i* out) {
  __m512i x[4];
  for (int t = 0; t < 4; ++t) x[t] = _mm512_load_si512(s + 64 * t);
  transpose_lanes4(x, out);
}

// where row r's piece goes among the 16 staged side by side
constexpr int staged_slot(int r) { return (r % 4) * 4 + r / 4; }

// 16 rows' 32-bit words at byte `at` of each row (row r at base + r * row_bytes);
// rows past `rows` read as zeros. All four bytes must lie in the row: its last
// block may end the file's mapping.
inline __m512i gather32(const uint8_t* base, int64_t row_bytes, int rows, int64_t at) {
  __m512i idx =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int32_t>(row_bytes)));
  return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes(rows), idx, base + at, 1);
}

inline __m512i and8(__m512i v, char mask) { return _mm512_and_si512(v, _mm512_set1_epi8(mask)); }

// The 8 quads of 16 rows' blocks of 32 nibbles (value i low in byte i, value i + 16
// high) from the transposed words of their 16 bytes
inline void nibble_quads(const __m512i* d, __m512i* v) {
  for (int j = 0; j < 4; ++j) {
    v[j] = and8(d[j], 0x0F);
    v[4 + j] = and8(_mm512_srli_epi32(d[j], 4), 0x0F);
  }
}

// Q5_0 and Q5_1: bits 4k..4k+3 of each lane's qh as 0x10 in its four bytes, the
// fifth bits of quad k
inline __m512i fifth_bits16(__m512i qh, int k) {
#ifdef __AVX512VBMI__
  // byte m of each 32-bit lane takes the 8 bits of its qword from bit 4k + m - 4 (of
  // the lane's own half), whose bit 4 is bit 4k + m
  int64_t control = 0;
  for (int b = 0; b < 8; ++b)
    control |= static_cast<int64_t>((32 * (b / 4) + 4 * k + b % 4 - 4) & 63) << (8 * b);
  return and8(_mm512_multishift_epi64_epi8(_mm512_set1_epi64(control), qh), 0x10);
#else
  // the product spreads bit i to bit 8i: its terms do not overlap
  __m512i x = _mm512_and_si512(_mm512_srli_epi32(qh, 4 * k), _mm512_set1_epi32(0xF));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x00204081));
  return _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x01010101)), 4);
#endif
}

// Q5_0 and Q5_1: the nibbles' quads with each value's fifth bit from qh
inline void fifth_quads(const __m512i* words, __m512i qh, __m512i* v) {
  nibble_quads(words, v);
  for (int k = 0; k < 8; ++k) v[k] = _mm512_or_si512(v[k], fifth_bits16(qh, k));
}

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
// minimum; decode(row, u, out) fills the SUBS blocks of unit u (for AMX's row-major
// tiles). The vector code reads 16 rows quad-major: v[j] lane r holds values
// 4j..4j+3 of row r (8 vectors per block, sub-blocks in order), the packed bytes
// transposed before they are widened. Blocks of 32 give PIECES 16-byte pieces from
// VALUES_AT (and Q5's high bits from QH_AT), which qmatmul.cpp stages and transposes
// and widen(words, qh, v) turns into values; super-blocks are staged whole, PIECES
// 16-byte pieces from byte 0 (a StagedUnit), and give them through quads(unit, v),
// their scales through scales(unit, sc, mn).
struct Q4_0 {
  static constexpr int HALVES = 1, BLOCK = 32, BYTES = 18, SUBS = 1;
  static constexpr int ZERO = 8;
  static constexpr bool MIN = false;
  static constexpr int SCALE_AT = 0, MIN_AT = -1;  // byte offsets of d and m
  static constexpr int VALUES_AT = 2, PIECES = 1, QH_AT = -1;
  static void widen(const __m512i* words, __m512i, __m512i* v) { nibble_quads(words, v); }
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
  static constexpr int VALUES_AT = 4, PIECES = 1, QH_AT = -1;
  static void widen(const __m512i* words, __m512i, __m512i* v) { nibble_quads(words, v); }
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
  static constexpr int VALUES_AT = 6, PIECES = 1, QH_AT = 2;
  static void widen(const __m512i* words, __m512i qh, __m512i* v) { fifth_quads(words, qh, v); }
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
  static constexpr int VALUES_AT = 8, PIECES = 1, QH_AT = 4;
  static void widen(const __m512i* words, __m512i qh, __m512i* v) { fifth_quads(words, qh, v); }
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
  static constexpr int VALUES_AT = 2, PIECES = 2, QH_AT = -1;
  static void widen(const __m512i* words, __m512i, __m512i* v) {
    for (int k = 0; k < 8; ++k)
      v[k] = _mm512_xor_si512(words[k], _mm512_set1_epi8(-128));  // q + 128
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

// k_scales across 16 rows from their words 0-3 (d and dmin, then the 12 scale
// bytes): sc[j] = d * scale_j, mn[j] = -dmin * min_j, as the scalar code computes
// them (the same products, so the same bits)
inline void k_scales_of(const __m512i* words, __m512* sc, __m512* mn) {
  __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words[0]));
  __m512 dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(words[0], 16)));
  dmin = _mm512_sub_ps(_mm512_setzero_ps(), dmin);
  __m512i a = words[1], b = words[2], c = words[3];  // scale bytes 0-3, 4-7, 8-11
  auto field = [](__m512i v, int shift, int mask) {
    return _mm512_and_si512(_mm512_srli_epi32(v, shift), _mm512_set1_epi32(mask));
  };
  for (int j = 0; j < 4; ++j) {
    __m512i s_lo = field(a, 8 * j, 63), m_lo = field(b, 8 * j, 63);
    __m512i s_hi =
        _mm512_or_si512(field(c, 8 * j, 0xF), _mm512_slli_epi32(field(a, 8 * j + 6, 3), 4));
    __m512i m_hi =
        _mm512_or_si512(field(c, 8 * j + 4, 0xF), _mm512_slli_epi32(field(b, 8 * j + 6, 3), 4));
    sc[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(s_lo));
    mn[j] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m_lo));
    sc[4 + j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(s_hi));
    mn[4 + j] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m_hi));
  }
}

// ... gathered from the super-blocks at sb of 16 rows
inline void k_scales16(const uint8_t* sb, int64_t row_bytes, int rows, __m512* sc, __m512* mn) {
  __m512i words[4];
  for (int w = 0; w < 4; ++w) words[w] = gather32(sb, row_bytes, rows, 4 * w);
  k_scales_of(words, sc, mn);
}

// One super-block of 16 rows as qmatmul.cpp's stage_unit copies it, each row read
// in order: its 16-byte pieces side by side in staged_slot order, so that a piece's
// words across the rows are one transpose_staged4 of aligned loads, and the bytes
// past its last whole piece (Q6_K's d) at each row's index
struct StagedUnit {
  static constexpr int MOST = 13;            // pieces of the largest, Q6_K's first 208 bytes
  alignas(64) uint8_t pieces[MOST][16][16];  // [piece][slot][byte]
  alignas(64) uint16_t tail[16];             // [row]
  // words 0-3 of piece i (bytes 16i..16i+15) of the 16 rows, word j in out[j] lane r
  [[gnu::always_inline]] void words(int i, __m512i* out) const {
    transpose_staged4(pieces[i][0], out);
  }
};

// 32 bytes of qs: low nibbles are sub-block 2c, high nibbles 2c + 1
inline __m256i k_nibbles(const uint8_t* qs, int high) {
  __m256i v = load256(qs);
  if (high) v = _mm256_srli_epi16(v, 4);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

// Q4_K and Q5_K: 6-bit scales and minimums per sub-block; T gives BYTES and values()
template <class T>
struct KWithMin {
  static constexpr int HALVES = 1, BLOCK = 256, SUBS = 8;
  static constexpr int ZERO = 0;
  static constexpr bool MIN = true;
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* sb = row + u * T::BYTES;
    k_scales(sb, b);
    __m256i q[8];
    T::values(sb, q);
    for (int j = 0; j < 8; ++j) b[j].q = q[j];
  }
  // their scales and minimums across the 16 rows: d, dmin and scale bytes are piece 0
  static void scales(const StagedUnit& s, __m512* sc, __m512* mn) {
    __m512i words[4];
    s.words(0, words);
    k_scales_of(words, sc, mn);
  }
};

struct Q4_K : KWithMin<Q4_K> {
  static constexpr int BYTES = 144;
  static void values(const uint8_t* sb, __m256i* q) {
    for (int j = 0; j < 8; ++j) q[j] = k_nibbles(sb + 16 + 32 * (j / 2), j % 2);
  }
  static constexpr int PIECES = BYTES / 16;  // whole 16-byte pieces, staged
  // sub-blocks 2c and 2c + 1: the low and high nibbles of the 32 bytes at 16 + 32c
  static void quads(const StagedUnit& s, __m512i* v) {
    for (int c = 0; c < 4; ++c) {
      __m512i d[8];
      s.words(1 + 2 * c, d);
      s.words(2 + 2 * c, d + 4);
      for (int k = 0; k < 8; ++k) {
        v[16 * c + k] = and8(d[k], 0x0F);
        v[16 * c + 8 + k] = and8(_mm512_srli_epi32(d[k], 4), 0x0F);
      }
    }
  }
};

struct Q5_K : KWithMin<Q5_K> {
  static constexpr int BYTES = 176;
  static void values(const uint8_t* sb, __m256i* q) {
    __m256i qh = load256(sb + 16);  // bit j of byte l: the fifth bit of value l of sub-block j
    for (int j = 0; j < 8; ++j) {
      __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, j), _mm256_set1_epi8(0x01));
      q[j] = _mm256_or_si256(k_nibbles(sb + 48 + 32 * (j / 2), j % 2), _mm256_slli_epi16(high, 4));
    }
  }
  static constexpr int PIECES = BYTES / 16;  // whole 16-byte pieces, staged
  static void quads(const StagedUnit& s, __m512i* v) {
    __m512i qh[8];  // bytes 16-47
    s.words(1, qh);
    s.words(2, qh + 4);
    for (int c = 0; c < 4; ++c) {
      __m512i d[8];  // bytes 48 + 32c ..
      s.words(3 + 2 * c, d);
      s.words(4 + 2 * c, d + 4);
      for (int k = 0; k < 8; ++k) {
        for (int s = 0; s < 2; ++s) {  // sub-block 2c + s: bit 2c + s of qh
          __m512i low = and8(_mm512_srli_epi32(d[k], 4 * s), 0x0F);
          __m512i high = and8(_mm512_srli_epi32(qh[k], 2 * c + s), 0x01);
          v[16 * c + 8 * s + k] = _mm512_or_si512(low, _mm512_slli_epi32(high, 4));
        }
      }
    }
  }
};

struct Q6_K {
  static constexpr int BLOCK = 256, BYTES = 210, SUBS = 8, HALVES = 2;
  static constexpr int ZERO = 32;
  static constexpr bool MIN = false;
  // half n (values 128n..): sub-block 4n + i takes ql[64n + 32 (i % 2)..] (low
  // nibbles for i < 2, high for i >= 2) and bits 2i, 2i + 1 of qh[32n..]
  static void values(const uint8_t* sb, __m256i* q) {
    for (int j = 0; j < 8; ++j) {
      int n = j / 4, i = j % 4;
      __m256i low = k_nibbles(sb + 64 * n + 32 * (i % 2), i / 2);
      __m256i qh = load256(sb + 128 + 32 * n);
      __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * i), _mm256_set1_epi8(0x03));
      q[j] = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
    }
  }
  static constexpr int PIECES = BYTES / 16;  // whole 16-byte pieces, staged; d past them
  static void quads(const StagedUnit& s, __m512i* v) {
    for (int n = 0; n < 2; ++n) {
      __m512i low[2][8], qh[8];  // ql at 64n and 64n + 32, qh at 128 + 32n
      for (int h = 0; h < 2; ++h) {
        s.words(4 * n + 2 * h, low[h]);
        s.words(4 * n + 2 * h + 1, low[h] + 4);
      }
      s.words(8 + 2 * n, qh);
      s.words(9 + 2 * n, qh + 4);
      for (int i = 0; i < 4; ++i) {  // sub-block j = 4n + i, as values() reads it
        int j = 4 * n + i;
        for (int k = 0; k < 8; ++k) {
          __m512i lo = and8(_mm512_srli_epi32(low[i % 2][k], 4 * (i / 2)), 0x0F);
          __m512i hi = and8(_mm512_srli_epi32(qh[k], 2 * i), 0x03);
          v[16 * (j / 2) + 8 * (j % 2) + k] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 4));
        }
      }
    }
  }
  static void decode(const uint8_t* row, int64_t u, Block* b) {
    const uint8_t* sb = row + u * BYTES;
    const int8_t* sc = reinterpret_cast<const int8_t*>(sb + 192);
    float d = f16(sb + 208);
    __m256i q[8];
    values(sb, q);
    for (int j = 0; j < 8; ++j) {  // a scale per 16 values
      b[j].q = q[j];
      b[j].scale[0] = d * sc[2 * j];
      b[j].scale[1] = d * sc[2 * j + 1];
    }
  }
  // sc[2j], sc[2j + 1]: sub-block j's two scales across 16 rows (mn unused); the
  // scale bytes are piece 12 (bytes 192-207), d the tail
  static void scales(const StagedUnit& s, __m512* sc, __m512*) {
    __m512 d = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(s.tail)));
    __m512i words[4];
    s.words(12, words);
    for (int w = 0; w < 4; ++w) {
      for (int i = 0; i < 4; ++i) {  // byte i, sign-extended
        __m512i v = _mm512_srai_epi32(_mm512_slli_epi32(words[w], 24 - 8 * i), 24);
        sc[4 * w + i] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(v));
      }
    }
  }
};

// fn(T{}) for the type whose blocks are `bytes` long (a quantized matrix is held as
// uint8 [rows, blocks, block bytes], the block size naming its type); false if none
template <class Fn>
inline bool with_type(int64_t bytes, Fn fn) {
  switch (bytes) {
    case Q4_0::BYTES:
      return fn(Q4_0{}), true;
    case Q4_1::BYTES:
      return fn(Q4_1{}), true;
    case Q5_0::BYTES:
      return fn(Q5_0{}), true;
    case Q5_1::BYTES:
      return fn(Q5_1{}), true;
    case Q8_0::BYTES:
      return fn(Q8_0{}), true;
    case Q4_K::BYTES:
      return fn(Q4_K{}), true;
    case Q5_K::BYTES:
      return fn(Q5_K{}), true;
    case Q6_K::BYTES:
      return fn(Q6_K{}), true;
    default:
      return false;
  }
}

}  // namespace accordion_native
