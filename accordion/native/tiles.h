// The AMX-INT8 tile instructions qmatmul.cpp's many-row products use, as macros
// over the tile register numbers (the instructions take them as immediates).
//
// With ACCORDION_SOFT_TILES they are computed in C++ as Intel's manual defines
// them: a build for tests, so that the tile code's layouts, configuration and
// folds are checked bit for bit on CPUs without AMX too (tests/test_quant.py).
// Integer sums are exact, so the hardware's order of summing cannot change them:
// the C++ tiles and the CPU's compute the same numbers.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "activations.h"

namespace accordion_native {

#if defined(ACCORDION_SOFT_TILES)
constexpr bool INT8_TILES = true;

namespace soft_tiles {
struct State {
  TileConfig cfg;
  alignas(64) uint8_t t[8][16][64];  // [register][row][byte]
};

inline State& state() {
  thread_local State s;
  return s;
}

inline void configure(const TileConfig* c) {
  state().cfg = *c;
  std::memset(state().t, 0, sizeof(state().t));
}

inline void zero(int t) { std::memset(state().t[t], 0, sizeof(state().t[t])); }

// rows and bytes a row as configured; the rest of the register is zero
inline void load(int t, const void* p, int64_t stride) {
  State& s = state();
  zero(t);
  for (int r = 0; r < s.cfg.rows[t]; ++r) {
    std::memcpy(s.t[t][r], static_cast<const uint8_t*>(p) + r * stride, s.cfg.colsb[t]);
  }
}

inline void store(int t, void* p, int64_t stride) {
  State& s = state();
  for (int r = 0; r < s.cfg.rows[t]; ++r) {
    std::memcpy(static_cast<uint8_t*>(p) + r * stride, s.t[t][r], s.cfg.colsb[t]);
  }
}

// TDPBSUD: c[m][n] += sum over k, i of signed a[m][4k + i] * unsigned b[k][4n + i]
inline void dpbsud(int c, int a, int b) {
  State& s = state();
  for (int m = 0; m < s.cfg.rows[c]; ++m) {
    for (int n = 0; n < s.cfg.colsb[c] / 4; ++n) {
      int32_t sum;
      std::memcpy(&sum, s.t[c][m] + 4 * n, 4);
      for (int k = 0; k < s.cfg.colsb[a] / 4; ++k) {
        for (int i = 0; i < 4; ++i) {
          sum += static_cast<int8_t>(s.t[a][m][4 * k + i]) *
                 static_cast<int32_t>(s.t[b][k][4 * n + i]);
        }
      }
      std::memcpy(s.t[c][m] + 4 * n, &sum, 4);
    }
  }
}
}  // namespace soft_tiles

#define ACCORDION_TILE_CONFIG(cfg) soft_tiles::configure(cfg)
#define ACCORDION_TILE_RELEASE() ((void)0)
#define ACCORDION_TILE_ZERO(t) soft_tiles::zero(t)
#define ACCORDION_TILE_LOAD(t, p, stride) soft_tiles::load(t, p, stride)
#define ACCORDION_TILE_STORE(t, p, stride) soft_tiles::store(t, p, stride)
#define ACCORDION_TILE_DPBSUD(c, a, b) soft_tiles::dpbsud(c, a, b)

#elif defined(__AMX_INT8__)
constexpr bool INT8_TILES = true;
#define ACCORDION_TILE_CONFIG(cfg) _tile_loadconfig(cfg)
#define ACCORDION_TILE_RELEASE() _tile_release()
#define ACCORDION_TILE_ZERO(t) _tile_zero(t)
// tileloadd's intrinsic tells the compiler of no memory read: the barrier keeps the
// stores of what it loads before it
#define ACCORDION_TILE_LOAD(t, p, stride) \
  do {                                    \
    __asm__ volatile("" ::: "memory");    \
    _tile_loadd(t, p, stride);            \
  } while (0)
#define ACCORDION_TILE_STORE(t, p, stride) _tile_stored(t, p, stride)
#define ACCORDION_TILE_DPBSUD(c, a, b) _tile_dpbsud(c, a, b)

#else
constexpr bool INT8_TILES = false;  // the code that uses them is never reached
#define ACCORDION_TILE_CONFIG(cfg) ((void)(cfg))
#define ACCORDION_TILE_RELEASE() ((void)0)
#define ACCORDION_TILE_ZERO(t) ((void)0)
#define ACCORDION_TILE_LOAD(t, p, stride) ((void)(p), (void)(stride))
#define ACCORDION_TILE_STORE(t, p, stride) ((void)(p), (void)(stride))
#define ACCORDION_TILE_DPBSUD(c, a, b) ((void)0)
#endif

}  // namespace accordion_native
