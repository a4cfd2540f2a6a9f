// Products of many activation rows on AMX tiles.
//
// On CPUs with AMX-INT8 a tile product computes the 16 x 16 exact block sums of 16
// weight rows (the u8 tile) against 16 activation rows (the s8 tile, h or l
// digits); the float steps that follow are activations.h's canonical ones, lanes
// running across activation rows instead of weight rows (w_scale * x_scale is the
// same product either way). Results are bit for bit those of qmatmul.cpp's vectors.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "activations.h"

namespace accordion_native {

#ifdef __AMX_INT8__
namespace {
constexpr int64_t AMX_MIN_ROWS = 32;  // below this the tiles' fixed costs do not pay

bool amx_permitted() {  // Linux lends the tile state to a process that asks
  static const bool ok =
      syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

// Activations for the tiles: per tile of 16 rows and block, the h and l digits as
// quads [8][16 rows][4], and the per-row scale, sums and scaled sums as vectors.
struct TileAct {
  int64_t tiles = 0, blocks = 0;
  std::unique_ptr<int32_t[]> h, l;        // [tiles][blocks][8][16], written by tile_of
  std::vector<__m512> scale, scaled_sum;  // [tiles][blocks]
  std::vector<__m512i> sum16;             // [tiles][blocks][2]
};

// Tile `tile` of the activations: its 16 rows' digits, scales and sums, block by block
void tile_of(const Act& a, int64_t m, int64_t tile, TileAct& t) {
  for (int64_t b = 0; b < t.blocks; ++b) {
    alignas(64) float sc[16] = {}, ss[16] = {};
    alignas(64) int32_t s0[16] = {}, s1[16] = {};
    int64_t o = (tile * t.blocks + b) * 128;
    for (int r = 0; r < 16; ++r) {
      if (tile * 16 + r >= m) {  // past the last row: zeros, whose sums are not stored
        for (int k = 0; k < 8; ++k) t.h[o + k * 16 + r] = t.l[o + k * 16 + r] = 0;
        continue;
      }
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

void tile_activations(const Act& a, int64_t m, TileAct& t) {
  t.tiles = (m + 15) / 16;
  t.blocks = a.blocks;
  t.h.reset(new int32_t[t.tiles * t.blocks * 128]);  // uninitialized: tile_of fills all
  t.l.reset(new int32_t[t.tiles * t.blocks * 128]);
  t.scale.resize(t.tiles * t.blocks);
  t.scaled_sum.resize(t.tiles * t.blocks);
  t.sum16.resize(t.tiles * t.blocks * 2);
  at::parallel_for(0, t.tiles, 1, [&](int64_t first, int64_t last) {
    for (int64_t tile = first; tile < last; ++tile) tile_of(a, m, tile, t);
  });
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

// What a thread keeps between its groups: decoded weights and the tiles' sums; the
// thread's tile state goes with it
struct GroupScratch {
  std::vector<uint8_t> q;
  std::vector<float> wscale, wmin;
  alignas(64) int32_t high[2][16][16], low[2][16][16];  // step s in buffer s % 2
  ~GroupScratch() { _tile_release(); }
};

// Output columns 16g..16g+15 of one matrix for every activation row
template <class T>
void amx_group(const uint8_t* base, int64_t n, int64_t row_bytes, const TileAct& t, int64_t m,
               float* out, int64_t ldy, int64_t g, GroupScratch& sc) {
  int64_t blocks = t.blocks;
  constexpr int BYTES = 32 / T::HALVES, QUADS = 8 / T::HALVES;  // per tile product
  TileConfig cfg;
  for (int i = 0; i < 4; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;  // two pairs of sums
  cfg.rows[4] = 16, cfg.colsb[4] = BYTES;  // weights: 16 rows of one (half) block
  for (int i = 5; i < 7; ++i) cfg.rows[i] = QUADS, cfg.colsb[i] = 64;  // digits h, l
  _tile_loadconfig(&cfg);
  auto& [q, wscale, wmin, high, low] = sc;
  int64_t n0 = 16 * g;
  int cols = static_cast<int>(std::min<int64_t>(16, n - n0));
  decode_rows<T>(base + n0 * row_bytes, row_bytes, cols, blocks, q, wscale, wmin);
  for (int64_t tile = 0; tile < t.tiles; ++tile) {
    __m512 acc[16];  // acc[weight row] across the tile's activation rows
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    // the tile intrinsics take their tile numbers as literals: one copy per pair
#define ACCORDION_PRODUCT(H, L, step)                              \
  do {                                                             \
    int64_t b_ = (step) / T::HALVES, half_ = (step) % T::HALVES;   \
    int64_t j_ = tile * blocks + b_;                               \
    _tile_zero(H);                                                 \
    _tile_zero(L);                                                 \
    _tile_loadd(4, q.data() + b_ * 512 + half_ * BYTES, 32);       \
    _tile_loadd(5, t.h.get() + j_ * 128 + half_ * QUADS * 16, 64); \
    _tile_loadd(6, t.l.get() + j_ * 128 + half_ * QUADS * 16, 64); \
    _tile_dpbusd(H, 4, 5);                                         \
    _tile_dpbusd(L, 4, 6);                                         \
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
}  // namespace
#endif

bool amx_available() {
#ifdef __AMX_INT8__
  return amx_permitted();
#else
  return false;
#endif
}

bool amx_matmul(const std::vector<Part>& parts, const Act& a, int64_t m, float* out, int64_t ldy) {
#ifdef __AMX_INT8__
  if (m < AMX_MIN_ROWS || !amx_permitted()) return false;
  TileAct t;  // once for all the parts
  tile_activations(a, m, t);
  for_groups<GroupScratch>(parts, [&](GroupScratch& sc, const Part& p, int64_t g) {
    with_type(p.block_bytes, [&](auto type) {
      amx_group<decltype(type)>(p.w, p.n, p.row_bytes, t, m, out + p.col, ldy, g, sc);
    });
  });
  return true;
#else
  return false;
#endif
}

}  // namespace accordion_native
