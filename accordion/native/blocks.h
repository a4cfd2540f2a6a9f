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

}  // namespace accordion_native
