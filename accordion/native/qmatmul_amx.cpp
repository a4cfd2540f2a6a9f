// Products of every activation row count on AMX-BF16 tiles.
//
// On CPUs with AMX-BF16 each group of 16 weight rows is decoded once into bf16
// tiles (16 rows x 32 values, the weight (value - ZERO) * scale + min rounded to
// bf16) and the activation rows, rounded to bf16, are laid out once per product as
// tiles of 16 rows x 16 value pairs. A tile product then sums a block of 32 values
// for 16 x 16 outputs into float32 tiles that stay in the tile registers across the
// whole row: no store per block, so the matrix unit streams. Every output element
// is the same sequence of tile products whatever the number of rows, one row or a
// prefill of thousands, so a token's numbers never depend on its batch; the CPU
// uses this path for every product (qmatmul.cpp's vectors serve the others).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "activations.h"

namespace accordion_native {

#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
namespace {

bool amx_permitted() {  // Linux lends the tile state to a process that asks
  static const bool ok =
      syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

// The activations as tiles: per tile of 16 rows and block of 32 values, 16 vectors
// (value pairs) whose lane r holds row r's pair in bf16 (zeros past the last row)
struct TileX {
  int64_t tiles = 0, blocks = 0;
  std::unique_ptr<__m512i[]> v;  // [tiles][blocks][16]

  const __m512i* at(int64_t tile, int64_t b) const { return v.get() + (tile * blocks + b) * 16; }
};

// 32 floats -> 32 bf16 (round to nearest even), pairs as 32-bit words in order
inline __m512i bf16_row(const float* p) {
  return reinterpret_cast<__m512i>(
      _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p)));
}

void tile_x(const float* x, int64_t m, int64_t k, TileX& t) {
  t.tiles = (m + 15) / 16;
  t.blocks = k / 32;
  t.v.reset(new __m512i[t.tiles * t.blocks * 16]);
  auto fill = [&](int64_t tile) {
    int rows = static_cast<int>(std::min<int64_t>(16, m - tile * 16));
    for (int64_t b = 0; b < t.blocks; ++b) {
      __m512i* v = t.v.get() + (tile * t.blocks + b) * 16;
      if (rows == 1) {  // a decode row: its pairs into lane 0, no transpose of zeros
        __m512i row = bf16_row(x + tile * 16 * k + b * 32);
        for (int p = 0; p < 16; ++p) {
          v[p] = _mm512_maskz_permutexvar_epi32(1, _mm512_set1_epi32(p), row);
        }
        continue;
      }
      for (int r = 0; r < 16; ++r) {
        v[r] = r < rows ? bf16_row(x + (tile * 16 + r) * k + b * 32) : _mm512_setzero_si512();
      }
      transpose16(v);  // v[pair] lane r <- row r's pair
    }
  };
  if (t.tiles == 1) {
    fill(0);  // a decode step's rows: a fork and join would cost more than the work
  } else {
    at::parallel_for(0, t.tiles, 1, [&](int64_t first, int64_t last) {
      for (int64_t tile = first; tile < last; ++tile) fill(tile);
    });
  }
}

// 32 unsigned values -> their weights (value - ZERO) * scale + min, rounded to bf16
template <class T>
inline __m512i bf16_weights(const Block& b) {
  __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(b.q)));
  __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(b.q, 1)));
  if constexpr (T::ZERO != 0) {  // exact: small integers
    lo = _mm512_sub_ps(lo, _mm512_set1_ps(T::ZERO));
    hi = _mm512_sub_ps(hi, _mm512_set1_ps(T::ZERO));
  }
  __m512 min = _mm512_set1_ps(T::MIN ? b.min : 0.f);
  lo = _mm512_fmadd_ps(lo, _mm512_set1_ps(b.scale[0]), min);
  hi = _mm512_fmadd_ps(hi, _mm512_set1_ps(b.scale[1]), min);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// The same unit of the next 16 rows, fetched while these are decoded, a unit at a
// time: a burst of their whole rows at the group's start stalls its loads (a prefetch
// never faults)
inline void prefetch_unit(const uint8_t* unit, int64_t row_bytes) {
  for (int r = 0; r < 16; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(unit + (16 + r) * row_bytes), _MM_HINT_T0);
  }
}

// Types of 4-bit values: each row's block of 32 weights is looked up in a table of
// its 16 possible weights, computed as the other types compute each weight
template <class T>
constexpr bool NIBBLES =
    std::is_same_v<T, Q4_0> || std::is_same_v<T, Q4_1> || std::is_same_v<T, Q4_K>;

// The scales and minimums of a unit's sub-blocks for 16 rows, sc[j][r] and mn[j][r]
template <class T>
void unit_scales(const uint8_t* unit, int64_t row_bytes, int rows, float (*sc)[16],
                 float (*mn)[16]) {
  if constexpr (T::SUBS == 1) {
    __m512i dm = gather32(unit, row_bytes, rows, T::SCALE_AT);  // Q4_1's m follows its d
    _mm512_store_ps(sc[0], _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm)));
    __m512 m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)));
    _mm512_store_ps(mn[0], T::MIN ? m : _mm512_setzero_ps());
  } else {
    __m512 s[8], m[8];
    k_scales16(unit, row_bytes, rows, s, m);
    for (int j = 0; j < 8; ++j) _mm512_store_ps(sc[j], s[j]), _mm512_store_ps(mn[j], m[j]);
  }
}

// Sub-block j of a row's unit as 32 word indices 0-15, 16 added for odd rows
template <class T>
inline __m512i nibble_indices(const uint8_t* unit, int j, int odd) {
  __m512i q;
  if constexpr (T::SUBS == 1) {  // 16 bytes: values 0-15 low nibbles, 16-31 high
    const __m512i shifts = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004,
                                            0x0004000400040004, 0x0004000400040004, 0, 0, 0, 0);
    q = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(load128(unit + T::VALUES_AT)));
    q = _mm512_srlv_epi16(q, shifts);
  } else {  // Q4_K: 32 bytes per pair of sub-blocks, the odd one in the high nibbles
    q = _mm512_cvtepu8_epi16(load256(unit + 16 + 32 * (j / 2)));
    if (j % 2) q = _mm512_srli_epi16(q, 4);
  }
  // (q & 0x0F) | 16 odd
  return _mm512_ternarylogic_epi32(q, _mm512_set1_epi16(0x0F), _mm512_set1_epi16(16 * odd), 0xEA);
}

// Unit u (SUBS blocks of 32) of 16 weight rows into bf16 tiles w[block][16 rows] of
// 32 values; rows past `rows` are zeros
template <class T>
inline void decode_unit(const uint8_t* base, int64_t row_bytes, int rows, int64_t u, __m512i* w) {
  if constexpr (NIBBLES<T>) {
    alignas(64) float sc[T::SUBS][16], mn[T::SUBS][16];
    const uint8_t* unit = base + u * T::BYTES;
    prefetch_unit(unit, row_bytes);
    unit_scales<T>(unit, row_bytes, rows, sc, mn);
    const __m512 iota =
        _mm512_sub_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                      _mm512_set1_ps(T::ZERO));
    for (int j = 0; j < T::SUBS; ++j) {
      for (int r = 0; r < 16; r += 2) {  // two rows' tables in one vector, r's low
        __m512 t0 = _mm512_fmadd_ps(iota, _mm512_set1_ps(sc[j][r]), _mm512_set1_ps(mn[j][r]));
        __m512 t1 =
            _mm512_fmadd_ps(iota, _mm512_set1_ps(sc[j][r + 1]), _mm512_set1_ps(mn[j][r + 1]));
        __m512i table = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(t1, t0));
        for (int i = 0; i < 2; ++i) {
          w[j * 16 + r + i] = r + i < rows
                                  ? _mm512_permutexvar_epi16(
                                        nibble_indices<T>(unit + (r + i) * row_bytes, j, i), table)
                                  : _mm512_setzero_si512();
        }
      }
    }
    return;
  }
  prefetch_unit(base + u * T::BYTES, row_bytes);
  if constexpr (std::is_same_v<T, Q8_0>) {  // signed bytes times the block's scale
    alignas(64) float sc[1][16], mn[1][16];
    const uint8_t* unit = base + u * T::BYTES;
    unit_scales<T>(unit, row_bytes, rows, sc, mn);
    for (int r = 0; r < 16; ++r) {
      const uint8_t* q = unit + r * row_bytes + 2;
      if (r >= rows) {
        w[r] = _mm512_setzero_si512();
        continue;
      }
      __m512 d = _mm512_set1_ps(sc[0][r]);
      __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load128(q))), d);
      __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load128(q + 16))), d);
      w[r] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    }
    return;
  }
  Block blk[T::SUBS];
  for (int r = 0; r < 16; ++r) {
    if (r >= rows) {
      for (int j = 0; j < T::SUBS; ++j) w[j * 16 + r] = _mm512_setzero_si512();
      continue;
    }
    T::decode(base + r * row_bytes, u, blk);
    for (int j = 0; j < T::SUBS; ++j) w[j * 16 + r] = bf16_weights<T>(blk[j]);
  }
}

// What a thread keeps between its groups: the decoded weights; its tile state goes
// with it
struct GroupScratch {
  std::vector<__m512i> w;
  alignas(64) float sums[2][16][16];
  GroupScratch() {  // every tile 16 rows of 64 bytes: sums, weights and activations
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
    _tile_loadconfig(&cfg);
  }
  ~GroupScratch() { _tile_release(); }
};

// sums[weight row][activation row] of one tile -> out rows 16 tile.., columns n0..
void store_tile(const float (*sums)[16], int64_t tile, int64_t m, int cols, float* out,
                int64_t ldy) {
  __m512i v[16];
  for (int r = 0; r < 16; ++r) v[r] = _mm512_load_si512(sums[r]);
  transpose16(v);
  __mmask16 mask = lanes(cols);
  for (int r = 0; r < 16 && tile * 16 + r < m; ++r) {
    _mm512_mask_storeu_ps(out + (tile * 16 + r) * ldy, mask, _mm512_castsi512_ps(v[r]));
  }
}

// One block's tile products for activation tiles `tile` and `tile` + 1 (if `two`)
// into sums 0 and 1; even blocks load tiles 4-6, odd ones 7, 2, 3, so that loads
// never wait on the products before them
#define ACCORDION_PRODUCTS(W, X0, X1, wb, b)  \
  do {                                        \
    _tile_loadd(W, wb, 64);                   \
    _tile_loadd(X0, x.at(tile, b), 64);       \
    _tile_dpbf16ps(0, W, X0);                 \
    if (two) {                                \
      _tile_loadd(X1, x.at(tile + 1, b), 64); \
      _tile_dpbf16ps(1, W, X1);               \
    }                                         \
  } while (0)

// Output columns 16g..16g+15 of one matrix for every activation row, two tiles of
// activation rows at a time. Few rows (decode) decode each unit of weights just
// before its products; many decode the group's whole row once for all their tiles.
template <class T>
void amx_group(const uint8_t* base, int64_t n, int64_t row_bytes, const TileX& x, int64_t m,
               float* out, int64_t ldy, int64_t g, GroupScratch& sc) {
  int64_t n0 = 16 * g, blocks = x.blocks, units = blocks / T::SUBS;
  const uint8_t* rows = base + n0 * row_bytes;
  int cols = static_cast<int>(std::min<int64_t>(16, n - n0));
  bool streamed = x.tiles <= 2;
  sc.w.resize(streamed ? 2 * T::SUBS * 16 : blocks * 16);  // streamed: two units in turn
  __m512i* w = sc.w.data();
  if (!streamed) {
    for (int64_t u = 0; u < units; ++u)
      decode_unit<T>(rows, row_bytes, cols, u, w + u * T::SUBS * 16);
  }
  for (int64_t tile = 0; tile < x.tiles; tile += 2) {
    bool two = tile + 1 < x.tiles;
    _tile_zero(0);
    _tile_zero(1);
    if (streamed) decode_unit<T>(rows, row_bytes, cols, 0, w);
    for (int64_t u = 0; u < units; ++u) {
      __m512i* wu = streamed ? w + (u % 2) * T::SUBS * 16 : w + u * T::SUBS * 16;
      // the next unit decoded first: its stores drain while these tiles load
      if (streamed && u + 1 < units) {
        decode_unit<T>(rows, row_bytes, cols, u + 1, w + ((u + 1) % 2) * T::SUBS * 16);
      }
      for (int j = 0; j < T::SUBS; ++j) {
        int64_t b = u * T::SUBS + j;
        if (b % 2 == 0) {
          ACCORDION_PRODUCTS(4, 5, 6, wu + j * 16, b);
        } else {
          ACCORDION_PRODUCTS(7, 2, 3, wu + j * 16, b);
        }
      }
    }
    _tile_stored(0, sc.sums[0], 64);
    store_tile(sc.sums[0], tile, m, cols, out + n0, ldy);
    if (two) {
      _tile_stored(1, sc.sums[1], 64);
      store_tile(sc.sums[1], tile + 1, m, cols, out + n0, ldy);
    }
  }
}
#undef ACCORDION_PRODUCTS
}  // namespace
#endif

bool amx_available() {
#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
  return amx_permitted();
#else
  return false;
#endif
}

bool amx_matmul(const std::vector<Part>& parts, const float* x, int64_t m, int64_t k, float* out,
                int64_t ldy) {
#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
  if (!amx_permitted()) return false;
  TileX t;  // once for all the parts
  tile_x(x, m, k, t);
  auto group = [&](GroupScratch& sc, const Part& p, int64_t g) {
    with_type(p.block_bytes, [&](auto type) {
      amx_group<decltype(type)>(p.w, p.n, p.row_bytes, t, m, out + p.col, ldy, g, sc);
    });
  };
  for_groups<GroupScratch>(parts, group);
  return true;
#else
  return false;
#endif
}

}  // namespace accordion_native
