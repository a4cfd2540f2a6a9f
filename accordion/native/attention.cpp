// Paged attention, the one path of every query token, decode or prefill: each
// reads its keys and values straight from the block-paged cache, run by run, with
// nothing gathered and one call per layer for the whole batch. A long context is cut in parts that
// run on different threads and merge by their softmax maxima (as flash-decoding does). Written with
// GCC's vector extensions (16 floats, an AVX-512 register where there is one) so the arithmetic is
// vector code whatever the auto-vectorizer decides; a bf16 cache's scores come from AMX tile
// products where the CPU has AMX-BF16 (tile_scores). head_dim must be 16, 32, 64, 128 or 256;
// models/batched_decode.py checks that and otherwise gathers and calls
// scaled_dot_product_attention, the reference the tests compare against.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "activations.h"

using at::Tensor;

namespace {

typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));
constexpr int W = 16;

inline f16v load(const float* p) {
  f16v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f16v load(const c10::BFloat16* p) {  // bf16 is the top half of a float32
  h16v h;
  std::memcpy(&h, p, sizeof h);
  i16v wide = __builtin_convertvector(h, i16v) << 16;
  return reinterpret_cast<f16v&>(wide);
}

inline void store(float* p, f16v v) { std::memcpy(p, &v, sizeof v); }

inline void store(c10::BFloat16* p, f16v v) {  // rounded to nearest even, as c10::BFloat16 does
  typedef uint32_t u16v __attribute__((vector_size(64)));
  u16v u = reinterpret_cast<u16v&>(v);
  u16v bits = (u + (((u >> 16) & 1) + 0x7FFFu)) >> 16;
  bits = (v != v) ? u16v{} + 0x7FC0u : bits;  // NaN
  h16v h = __builtin_convertvector(bits, h16v);
  std::memcpy(p, &h, sizeof h);
}

inline float sum(f16v v) {  // a tree of shuffles: four dependent adds, not fifteen
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// exp(x) for x <= 0, 16 at a time: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by
// its degree-6 Taylor polynomial (relative error ~1e-7), 2^n built in the
// exponent bits; n is rounded by adding and removing 1.5 * 2^23.
inline f16v exp_nonpositive(f16v x) {
  const f16v zero = {}, lo = zero - 87.0f, magic = zero + 12582912.0f;
  x = x < lo ? lo : x;
  f16v n = (x * 1.44269504f + magic) - magic;
  f16v r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  f16v p =
      1.f +
      r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  return p * reinterpret_cast<f16v&>(bits);
}

// reduce16(v)[i] = sum of v[i]'s lanes, for sixteen vectors at once: four rounds
// that each add the two halves of every vector's partial sums, two vectors into
// one; 15 adds and 30 shuffles where one vector at a time takes 64 and 64.
template <int M>  // partial sums per vector before this round
inline f16v fold(f16v a, f16v b) {
  if constexpr (M == 16) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                   31);
  } else if constexpr (M == 8) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                   31);
  } else if constexpr (M == 4) {
    return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                   31);
  } else {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                   30) +
           __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  }
}

inline f16v reduce16(f16v* v) {
  for (int i = 0; i < 8; ++i) v[i] = fold<16>(v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 4; ++i) v[i] = fold<8>(v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 2; ++i) v[i] = fold<4>(v[2 * i], v[2 * i + 1]);
  return fold<2>(v[0], v[1]);
}

constexpr int64_t MAX_GROUP = 16;
constexpr int64_t MAX_C = 16;             // 16-float vectors in a head (256 dims)
constexpr int64_t PART = 256;             // keys per task: a long context spreads over the threads
constexpr size_t KEPT = size_t{1} << 20;  // floats of parts kept between calls (4 MiB)

// The cache slots of the keys l in [lo, hi) of a sequence whose keys are the slot
// ranges spans[0:n_spans] in order: slots[l - lo]. The kernels below prefetch rows
// by these, across the jumps between runs that a hardware prefetcher cannot see.
inline void key_slots(const int64_t* spans, int64_t n_spans, int64_t lo, int64_t hi,
                      int64_t* slots) {
  int64_t base = 0;
  for (int64_t i = 0; i < n_spans && base < hi; ++i) {
    int64_t a = spans[2 * i], n = spans[2 * i + 1] - a;
    for (int64_t l = std::max(lo, base); l < std::min(hi, base + n); ++l)
      slots[l - lo] = a + l - base;
    base += n;
  }
}

// One part of the keys of up to MAX_Q query tokens that share their runs and first
// key `lo` (a prefill chunk's tokens; a decode token alone): member j sees keys
// [lo, his[j]), his[j] <= lo + PART. For each of its `group` query heads (sharing
// one kv head; K and V rows [slots, d], contiguous) it writes to outs[j] the part's
// maximum score, the sum of exp(score - maximum) and the unnormalized output:
// {max, sum, out[0:d]} per head.
//
// Every number a member gets is computed by the same operations, in the same order,
// as if it were alone. A score is the scaled query times the key, lane i of 16
// accumulating dims i, 16 + i, ... (a product, then fmas), the 16 lanes then summed
// by one fixed tree (reduce16's). Few (member, head) pairs take each key's 16 lane
// sums and reduce 16 keys at once (scores_by_keys); many take a tile of 16 keys
// transposed once for all of them, so lanes run across keys and the same tree is
// plain vector adds (scores_by_tiles): the same bits either way. (On a CPU with AMX-BF16
// a bf16 cache's scores all come from tile_scores instead, alone or many.) The output is
// sum over its own keys, in order, of fma(p, v, acc).
constexpr int64_t MAX_Q = 16;
constexpr int64_t TILED_PAIRS = 8;  // pairs from which a transposed tile pays for itself
constexpr int64_t PB = 8;           // pairs per pass over a tile's 16 lane vectors

struct Scratch {
  std::vector<float> scores;
  std::vector<int64_t> slots;
  std::vector<f16v> qv, dots, acc, rows;
  std::vector<uint32_t> qt;  // queries laid out for the tiles
};

inline f16v fma(f16v a, f16v b, f16v c) {
  return reinterpret_cast<f16v>(_mm512_fmadd_ps(
      reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(c)));
}

inline f16v splat(float x) { return reinterpret_cast<f16v>(_mm512_set1_ps(x)); }

template <typename T, int C>
void load_row(const T* row, f16v* out) {
  for (int c = 0; c < C; ++c) out[c] = load(row + c * W);
}

template <typename T, int C>
void scores_by_keys(const T* k, int64_t n, int64_t pairs, int64_t stride, Scratch& s) {
  f16v row[C];
  int fill = 0;
  auto flush = [&](int64_t end) {  // scores of keys [end - fill, end) from their lane sums
    for (int64_t p = 0; p < pairs; ++p) {
      f16v* dots = s.dots.data() + p * W;
      for (int f = fill; f < W; ++f) dots[f] = f16v{};
      f16v r = reduce16(dots);
      store(s.scores.data() + p * stride + end - fill, r);
    }
    fill = 0;
  };
  for (int64_t l = 0; l < n; ++l) {
    if (l + 8 < n) __builtin_prefetch(k + s.slots[l + 8] * C * W);
    load_row<T, C>(k + s.slots[l] * C * W, row);
    for (int64_t p = 0; p < pairs; ++p) {
      const f16v* qv = s.qv.data() + p * C;
      f16v dot = qv[0] * row[0];
      for (int c = 1; c < C; ++c) dot = fma(qv[c], row[c], dot);
      s.dots[p * W + fill] = dot;
    }
    if (++fill == W) flush(l + 1);
  }
  if (fill > 0) flush(n);
}

// reduce16's tree for one key per lane: lane sums x_m = P_m + P_(m+8), then m + 4, + 2, + 1
inline f16v tree16(const f16v* P) {
  f16v x[8], y[4];
  for (int m = 0; m < 8; ++m) x[m] = P[m] + P[m + 8];
  for (int m = 0; m < 4; ++m) y[m] = x[m] + x[m + 4];
  return (y[0] + y[2]) + (y[1] + y[3]);
}

template <typename T, int C>
void scores_by_tiles(const T* k, int64_t n, int64_t pairs, int64_t stride, Scratch& s) {
  constexpr int64_t d = C * W;
  alignas(64) f16v kt[C * W];  // kt[c * 16 + i] lane j: dim c * 16 + i of the tile's key j
  alignas(64) f16v lanes[PB][W];
  for (int64_t t = 0; t * W < n; ++t) {
    int64_t keys = std::min<int64_t>(W, n - t * W);
    for (int c = 0; c < C; ++c) {
      __m512i block[W];
      for (int64_t j = 0; j < W; ++j) {
        f16v v = j < keys ? load(k + s.slots[t * W + j] * d + c * W) : f16v{};
        block[j] = reinterpret_cast<__m512i>(v);
      }
      accordion_native::transpose16(block);
      for (int i = 0; i < W; ++i) kt[c * W + i] = reinterpret_cast<f16v>(block[i]);
    }
    if ((t + 1) * W < n) {
      for (int64_t j = (t + 1) * W; j < std::min(n, (t + 2) * W); ++j)
        __builtin_prefetch(k + s.slots[j] * d);
    }
    for (int64_t p0 = 0; p0 < pairs; p0 += PB) {
      int64_t nb = std::min(PB, pairs - p0);
      for (int i = 0; i < W; ++i) {
        f16v kr[C];
        for (int c = 0; c < C; ++c) kr[c] = kt[c * W + i];
#pragma GCC unroll 8
        for (int64_t b = 0; b < nb; ++b) {
          const float* q = reinterpret_cast<const float*>(s.qv.data() + (p0 + b) * C);
          f16v lane = splat(q[i]) * kr[0];
          for (int c = 1; c < C; ++c) lane = fma(splat(q[c * W + i]), kr[c], lane);
          lanes[b][i] = lane;
        }
      }
      for (int64_t b = 0; b < nb; ++b) {
        f16v r = tree16(lanes[b]);
        store(s.scores.data() + (p0 + b) * stride + t * W, r);
      }
    }
  }
}

#ifdef __AMX_BF16__
// On CPUs with AMX-BF16 every score of a bf16 cache comes from tile products, for a
// query alone as for a tile of 48: a 16-pair tile of queries (32 dims a row) times a
// 16-key tile of keys (their 32-bit words, two dims each, transposed so rows run
// over words), summed over the head's 32-dim chunks in order, then scaled. Which
// pairs share a tile changes nothing in a pair's scores; every query on such a CPU
// goes this way, so outputs stay a function of the request alone.
template <int C>
void tile_scores(const c10::BFloat16* const* qs, int64_t group, const c10::BFloat16* k, int64_t n,
                 int64_t pairs, int64_t stride, float scale, Scratch& s) {
  constexpr int64_t d = C * W;
  constexpr int H = (C + 1) / 2;          // chunks of 32 dims (a 16-dim head: one of 16)
  constexpr int WORDS = C == 1 ? 8 : 16;  // 32-bit words of a chunk
  int64_t tiles = (pairs + 15) / 16;
  // the queries, [tile][chunk][16 pairs][WORDS words], zero past the last pair
  s.qt.assign(tiles * H * 16 * WORDS, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(qs[p / group] + (p % group) * d);
    for (int h = 0; h < H; ++h)
      std::memcpy(s.qt.data() + ((p / 16 * H + h) * 16 + p % 16) * WORDS, row + h * WORDS,
                  WORDS * 4);
  }
  accordion_native::TileConfig cfg;
  cfg.rows[0] = 16, cfg.colsb[0] = 64;         // scores: 16 pairs x 16 keys
  cfg.rows[1] = 16, cfg.colsb[1] = WORDS * 4;  // queries
  cfg.rows[2] = WORDS, cfg.colsb[2] = 64;      // keys: WORDS words x 16 keys
  _tile_loadconfig(&cfg);
  alignas(64) __m512i kt[H][16];  // kt[h][m] lane j: word m of chunk h of the tile's key j
  for (int64_t t = 0; t * W < n; ++t) {
    int64_t keys = std::min<int64_t>(W, n - t * W);
    for (int h = 0; h < H; ++h) {
      for (int64_t j = 0; j < W; ++j) {
        const c10::BFloat16* row = k + s.slots[t * W + j] * d + 32 * h;
        kt[h][j] =
            j >= keys ? __m512i{}
            : C == 1
                ? _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)))
                : _mm512_loadu_si512(row);
      }
      accordion_native::transpose16(kt[h]);
    }
    if ((t + 1) * W < n) {
      for (int64_t j = (t + 1) * W; j < std::min(n, (t + 2) * W); ++j)
        __builtin_prefetch(k + s.slots[j] * d);
    }
    for (int64_t tile = 0; tile < tiles; ++tile) {
      _tile_zero(0);
      for (int h = 0; h < H; ++h) {
        _tile_loadd(1, s.qt.data() + (tile * H + h) * 16 * WORDS, WORDS * 4);
        _tile_loadd(2, kt[h], 64);
        _tile_dpbf16ps(0, 1, 2);
      }
      float* out = s.scores.data() + tile * 16 * stride + t * W;
      _tile_stored(0, out, stride * 4);
      for (int r = 0; r < 16; ++r) store(out + r * stride, load(out + r * stride) * scale);
    }
  }
  _tile_release();
}
#endif

// acc[p] = fma(p(l), v(l), acc[p]) over each pair's own keys l in order, 16 keys' rows
// (as float) at a time. NP pairs share each row's loads and give the fma units eight
// independent sums to overlap.
template <int C, int NP>
inline void weigh_rows(const f16v* rows, int64_t a, int64_t b, const float* const* pr,
                       f16v* const* acc) {
  f16v sums[NP][C];
  for (int j = 0; j < NP; ++j)
    for (int c = 0; c < C; ++c) sums[j][c] = acc[j][c];
  for (int64_t l = a; l < b; ++l) {
    const f16v* row = rows + (l - a) * C;  // rows holds keys from a on
    for (int j = 0; j < NP; ++j) {
      f16v w = splat(pr[j][l]);
      for (int c = 0; c < C; ++c) sums[j][c] = fma(w, row[c], sums[j][c]);
    }
  }
  for (int j = 0; j < NP; ++j)
    for (int c = 0; c < C; ++c) acc[j][c] = sums[j][c];
}

template <typename T, int C>
void weigh_values(const T* v, int64_t n, int64_t pairs, int64_t stride, const int64_t* ends,
                  Scratch& s) {
  constexpr int64_t d = C * W;
  constexpr int NP = C >= 8 ? 1 : 8 / C;
  s.rows.resize(W * C);
  for (int64_t a = 0; a < n; a += W) {
    int64_t b = std::min(n, a + W);
    for (int64_t l = a; l < b; ++l) load_row<T, C>(v + s.slots[l] * d, s.rows.data() + (l - a) * C);
    const f16v* rows = s.rows.data();
    int64_t p = 0;
    for (; p + NP <= pairs; p += NP) {  // together up to the nearest end, then one by one
      const float* pr[NP];
      f16v* acc[NP];
      int64_t common = b;
      for (int j = 0; j < NP; ++j) {
        pr[j] = s.scores.data() + (p + j) * stride;
        acc[j] = s.acc.data() + (p + j) * C;
        common = std::min(common, ends[p + j]);
      }
      if (common > a) weigh_rows<C, NP>(rows, a, common, pr, acc);
      for (int j = 0; j < NP; ++j) {
        int64_t end = std::min(b, ends[p + j]), from = std::max(a, common);
        if (end > from) weigh_rows<C, 1>(rows + (from - a) * C, from, end, pr + j, acc + j);
      }
    }
    for (; p < pairs; ++p) {
      const float* pr = s.scores.data() + p * stride;
      f16v* acc = s.acc.data() + p * C;
      int64_t end = std::min(b, ends[p]);
      if (end > a) weigh_rows<C, 1>(rows, a, end, &pr, &acc);
    }
  }
}

// The scores of a bf16 cache on AMX (tile_scores), where the CPU has it: false where not
template <typename T, int C>
bool tile_scored(const T* const* qs, int64_t group, const T* k, int64_t n, int64_t pairs,
                 int64_t stride, float scale, Scratch& s) {
#ifdef __AMX_BF16__
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (accordion_native::amx_available()) {
      tile_scores<C>(qs, group, k, n, pairs, stride, scale, s);
      return true;
    }
  }
#endif
  return false;
}

template <typename T, int C>  // C = d / 16
void attend_part(const T* const* qs, int64_t nq, const T* k, const T* v, const int64_t* spans,
                 int64_t n_spans, int64_t lo, const int64_t* his, int64_t group, float scale,
                 float* const* outs, Scratch& s) {
  constexpr int64_t d = C * W;
  int64_t hi = *std::max_element(his, his + nq), n = hi - lo, stride = (n + W - 1) / W * W;
  int64_t pairs = nq * group;                        // (member, head)
  s.scores.resize((pairs + 15) / 16 * 16 * stride);  // every score is written before it is read
  s.acc.assign(pairs * C, f16v{});
  s.slots.resize(n);
  key_slots(spans, n_spans, lo, hi, s.slots.data());
  int64_t ends[MAX_Q * MAX_GROUP];
  for (int64_t p = 0; p < pairs; ++p) ends[p] = his[p / group] - lo;
  if (!tile_scored<T, C>(qs, group, k, n, pairs, stride, scale, s)) {
    s.qv.resize(pairs * C);  // the vector paths' queries and lane sums
    s.dots.resize(pairs * W);
    for (int64_t p = 0; p < pairs; ++p) {
      for (int c = 0; c < C; ++c)
        s.qv[p * C + c] = load(qs[p / group] + (p % group) * d + c * W) * scale;
    }
    if (pairs >= TILED_PAIRS) {
      scores_by_tiles<T, C>(k, n, pairs, stride, s);
    } else {
      scores_by_keys<T, C>(k, n, pairs, stride, s);
    }
  }
  for (int64_t p = 0; p < pairs; ++p) {  // softmax numerators; padding lanes count 0
    int64_t nj = ends[p], sj_stride = (nj + W - 1) / W * W;
    float* sj = s.scores.data() + p * stride;
    f16v most = splat(-INFINITY);  // the maximum, 16 at a time (a scalar max waits on each)
    for (int64_t m = 0; m < nj; m += W) {
      f16v x = load(sj + m);
      for (int64_t z = nj - m; z < W; ++z) x[z] = -INFINITY;
      most = most > x ? most : x;
    }
    float top = most[0];
    for (int z = 1; z < W; ++z) top = std::max(top, most[z]);
    f16v run = {};
    for (int64_t m = 0; m < sj_stride; m += W) {
      f16v e = exp_nonpositive(load(sj + m) - top);
      for (int64_t z = nj - m; z < W; ++z) e[z] = 0.f;
      store(sj + m, e);
      run += e;
    }
    float* out = outs[p / group] + (p % group) * (d + 2);
    out[0] = top;
    out[1] = sum(run);
  }
  weigh_values<T, C>(v, n, pairs, stride, ends, s);
  for (int64_t p = 0; p < pairs; ++p) {
    std::memcpy(outs[p / group] + (p % group) * (d + 2) + 2, s.acc.data() + p * C, d * 4);
  }
}

template <typename T>
using PartFn = void (*)(const T* const*, int64_t, const T*, const T*, const int64_t*, int64_t,
                        int64_t, const int64_t*, int64_t, float, float* const*, Scratch&);

template <typename T>
PartFn<T> part_fn(int64_t d) {
  switch (d) {
    case 16:
      return attend_part<T, 1>;
    case 32:
      return attend_part<T, 2>;
    case 64:
      return attend_part<T, 4>;
    case 128:
      return attend_part<T, 8>;
    case 256:
      return attend_part<T, 16>;
    default:
      TORCH_CHECK(false, "head_dim must be 16, 32, 64, 128 or 256");
  }
}

// Each query's keys are cut in parts of PART from its first key. Parts that read the
// same keys from the same slots go together in tasks of up to MAX_Q queries: a prefill
// chunk's tokens, and the decode tokens of sequences sharing a cached prefix. Every
// (task, kv head) runs in parallel; then each query head's parts merge by their maxima.
template <typename T>
void run(const T* q, const T* k, const T* v, T* out, const int64_t* span, const int64_t* range,
         int64_t b, int64_t heads, int64_t kv_heads, int64_t d, int64_t hs, float scale) {
  int64_t group = heads / kv_heads, per = group * (d + 2);
  std::vector<int64_t> first_part(b + 1, 0);  // query i owns parts [first_part[i], ...[i + 1])
  for (int64_t i = 0; i < b; ++i) {
    int64_t n = range[4 * i + 3] - range[4 * i + 2];
    first_part[i + 1] = first_part[i] + (n + PART - 1) / PART;
  }
  struct Task {
    std::vector<int64_t> members;  // queries reading part `part` of theirs from the same slots
    int64_t part;
  };
  std::vector<Task> tasks;
  // A part is named by its index, its first key and the slot runs of its keys; parts of
  // one name go together. Names are hashed, and a task's own name is kept to compare
  // (two names with one hash make two tasks). Which queries share a task changes
  // nothing in any query's numbers, only how often the threads load the keys.
  std::vector<int64_t> names;                 // every task's name, one after another
  std::vector<size_t> name_at{0};             // task t's name is names[name_at[t]:name_at[t + 1]]
  std::unordered_map<uint64_t, size_t> open;  // a name's hash -> its last task
  std::vector<int64_t> key;
  for (int64_t i = 0; i < b; ++i) {
    const int64_t *runs = span + 2 * range[4 * i], n_runs = range[4 * i + 1] - range[4 * i];
    int64_t total = 0;
    for (int64_t r = 0; r < n_runs; ++r) total += runs[2 * r + 1] - runs[2 * r];
    for (int64_t p = 0; p < first_part[i + 1] - first_part[i]; ++p) {
      int64_t lo = range[4 * i + 2] + p * PART, hi = std::min(total, lo + PART), base = 0;
      key.assign({p, lo});  // then the slot runs of keys [lo, hi)
      for (int64_t r = 0; r < n_runs && base < hi; ++r) {
        int64_t a = runs[2 * r], len = runs[2 * r + 1] - a;
        int64_t from = std::max(lo, base), to = std::min(hi, base + len);
        if (from < to) key.insert(key.end(), {a + from - base, a + to - base});
        base += len;
      }
      uint64_t hash = 1469598103934665603ull;  // FNV-1a over the name's numbers
      for (int64_t x : key) hash = (hash ^ static_cast<uint64_t>(x)) * 1099511628211ull;
      auto [entry, fresh] = open.try_emplace(hash, tasks.size());
      size_t t = entry->second;
      if (fresh || tasks[t].members.size() == MAX_Q ||
          !std::equal(key.begin(), key.end(), names.begin() + name_at[t],
                      names.begin() + name_at[t + 1])) {
        t = entry->second = tasks.size();
        tasks.push_back({{}, p});
        names.insert(names.end(), key.begin(), key.end());
        name_at.push_back(names.size());
      }
      tasks[t].members.push_back(i);
    }
  }
  // Every number of it is written by its task before the merge reads it. Up to KEPT
  // floats are kept between calls (fresh pages would fault in again at every layer);
  // a long prefill's larger need is met for the call alone, so memory still follows use.
  size_t need = first_part[b] * kv_heads * per;
  thread_local std::unique_ptr<float[]> kept(new float[KEPT]);
  std::unique_ptr<float[]> own(need > KEPT ? new float[need] : nullptr);
  float* parts = need > KEPT ? own.get() : kept.get();
  PartFn<T> fn = part_fn<T>(d);
  auto run_task = [&](int64_t t, Scratch& scratch) {
    const Task& task = tasks[t / kv_heads];
    int64_t g = t % kv_heads, i0 = task.members[0];
    int64_t lo = range[4 * i0 + 2] + task.part * PART;
    const T* qs[MAX_Q];
    int64_t his[MAX_Q];
    float* outs[MAX_Q];
    int64_t nq = 0;
    for (int64_t i : task.members) {
      qs[nq] = q + (i * heads + g * group) * d;
      his[nq] = std::min(range[4 * i + 3], lo + PART);
      outs[nq] = parts + ((first_part[i] + task.part) * kv_heads + g) * per;
      ++nq;
    }
    fn(qs, nq, k + g * hs, v + g * hs, span + 2 * range[4 * i0], range[4 * i0 + 1] - range[4 * i0],
       lo, his, group, scale, outs, scratch);
  };
  // Causal prefill makes tasks of very different sizes; an even split of the list would
  // leave one thread with all the long ones. Largest first, each thread taking the next.
  int64_t n_tasks = static_cast<int64_t>(tasks.size()) * kv_heads;
  std::vector<int64_t> order(n_tasks);
  std::vector<int64_t> cost(tasks.size());
  for (size_t t = 0; t < tasks.size(); ++t) {
    const Task& task = tasks[t];
    int64_t lo = range[4 * task.members[0] + 2] + task.part * PART, hi = lo;
    for (int64_t i : task.members) hi = std::max(hi, std::min(range[4 * i + 3], lo + PART));
    cost[t] = (hi - lo) * static_cast<int64_t>(task.members.size());
  }
  for (int64_t t = 0; t < n_tasks; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return cost[x / kv_heads] > cost[y / kv_heads]; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t t; (t = next.fetch_add(1)) < n_tasks;) run_task(order[t], scratch);
  });
  at::parallel_for(0, b, 32, [&](int64_t begin, int64_t end) {  // each query's parts merge
    f16v o[MAX_C];
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t h = 0; h < heads; ++h) {
        int64_t g = h / group, j = h % group, c16 = d / W;
        auto at = [&](int64_t part) { return parts + (part * kv_heads + g) * per + j * (d + 2); };
        float top = -INFINITY, total = 0.f;
        for (int64_t part = first_part[i]; part < first_part[i + 1]; ++part)
          top = std::max(top, at(part)[0]);
        for (int64_t c = 0; c < c16; ++c) o[c] = f16v{};
        for (int64_t part = first_part[i]; part < first_part[i + 1]; ++part) {
          const float* p = at(part);
          float w = std::exp(p[0] - top);
          total += w * p[1];  // a product, then a sum: two roundings, not an fma
          for (int64_t c = 0; c < c16; ++c) o[c] += splat(w) * load(p + 2 + c * W);
        }
        T* row = out + (i * heads + h) * d;
        for (int64_t c = 0; c < c16; ++c) store(row + c * W, o[c] / total);
      }
    }
  });
}

}  // namespace

// q [B, heads, d]: B query tokens, of one sequence or many, decode or prefill.
// Query b's keys are the slot runs spans[ranges[b, 0]:ranges[b, 1]] (rows [a, c) of
// [kv_heads, slots, d]) taken in order, of which it sees keys ranges[b, 2] to
// ranges[b, 3] (exclusive): queries of one sequence share its runs. Each query
// is computed alone, the same way whichever step it is in and whatever shares
// that step. Returns [B, heads, d] in the cache's dtype.
Tensor paged_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& spans, const Tensor& ranges, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "shapes");
  TORCH_CHECK(
      q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
      "q and the caches must share a dtype");
  TORCH_CHECK(k_cache.stride(2) == 1 && k_cache.stride(1) == k_cache.size(2) &&
                  v_cache.strides() == k_cache.strides(),
              "cache planes must be [kv_heads, slots, d] with rows contiguous");
  TORCH_CHECK(spans.scalar_type() == at::kLong && ranges.scalar_type() == at::kLong,
              "spans and ranges are int64");
  Tensor qc = q.contiguous(), sp = spans.contiguous(), rg = ranges.contiguous();
  int64_t b = qc.size(0), heads = qc.size(1), d = qc.size(2), kv_heads = k_cache.size(0);
  int64_t group = heads / kv_heads, slots = k_cache.size(1);
  TORCH_CHECK(d == 16 || d == 32 || d == 64 || d == 128 || d == 256, "head_dim");
  TORCH_CHECK(group <= MAX_GROUP, "at most 16 query heads per kv head");
  TORCH_CHECK(group * kv_heads == heads && rg.numel() == b * 4, "heads or ranges");
  const int64_t* span = sp.data_ptr<int64_t>();
  const int64_t* range = rg.data_ptr<int64_t>();
  for (int64_t i = 0; i < sp.size(0); ++i) {
    TORCH_CHECK(0 <= span[2 * i] && span[2 * i] < span[2 * i + 1] && span[2 * i + 1] <= slots,
                "span out of range");
  }
  for (int64_t i = 0; i < b; ++i) {
    const int64_t* r = range + 4 * i;
    TORCH_CHECK(0 <= r[0] && r[0] < r[1] && r[1] <= sp.size(0), "runs out of range");
    int64_t n = 0;
    for (int64_t j = r[0]; j < r[1]; ++j) n += span[2 * j + 1] - span[2 * j];
    TORCH_CHECK(0 <= r[2] && r[2] < r[3] && r[3] <= n, "a query without keys, or past its runs");
  }
  Tensor out = at::empty_like(qc);
  int64_t hs = k_cache.stride(0);
  auto f = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) {
    using B = c10::BFloat16;
    run(qc.data_ptr<B>(), k_cache.data_ptr<B>(), v_cache.data_ptr<B>(), out.data_ptr<B>(), span,
        range, b, heads, kv_heads, d, hs, f);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "bfloat16 or float32 only");
    run(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
        out.data_ptr<float>(), span, range, b, heads, kv_heads, d, hs, f);
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(accordion, m) {
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor spans,"
      " Tensor ranges, float scale) -> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CompositeImplicitAutograd, &paged_attention);
}
