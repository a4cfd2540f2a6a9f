// y = x @ W.T straight from a GGUF file's blocks: the one weight path of every
// step, prefill or decode, so a token's numbers never depend on its batch.
//
// Quantized weights (blocks.h) meet activations quantized per block of 32 to int16
// and held as two int8 digits (activations.h): a block's products are summed
// exactly in integers, then folded into the output by one fixed sequence of
// float32 steps (see "The arithmetic of every quantized output element" there).
// Here is the vector code: lanes across 16 weight rows, the weights of 16 rows
// decoded and transposed so that each activation quad is broadcast against all
// of them. Few activation rows stream each decoded pair of blocks; many reuse a
// panel decoded once for the whole row; on AMX-INT8 CPUs, when chosen, those take
// tiles that sum the same integers (panel_tiles: the same bits). CPUs with AMX-BF16
// take every quantized product on tiles by default instead (qmatmul_amx.cpp: bf16
// operands, float32 sums), for every row count, so each CPU still has one
// arithmetic. F32, F16 and BF16 weights take float32 activations through FMAs, each
// row's sum in a fixed order too.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "activations.h"
#include "tiles.h"

using at::Tensor;
using namespace accordion_native;

namespace {

constexpr int64_t MR = 8;  // activation rows per tile: each decoded weight block serves them all
constexpr int64_t NB = 8;  // float weights: rows per pass over a tile of activation rows

// fn(std::integral_constant<int, R>{}) for R = rows (1..MR): the kernels take their
// row count as a template argument, so that their accumulators stay in registers
template <class Fn>
inline void with_rows(int64_t rows, Fn fn) {
  switch (rows) {
    case 8:
      return fn(std::integral_constant<int, 8>{});
    case 7:
      return fn(std::integral_constant<int, 7>{});
    case 6:
      return fn(std::integral_constant<int, 6>{});
    case 5:
      return fn(std::integral_constant<int, 5>{});
    case 4:
      return fn(std::integral_constant<int, 4>{});
    case 3:
      return fn(std::integral_constant<int, 3>{});
    case 2:
      return fn(std::integral_constant<int, 2>{});
    default:
      return fn(std::integral_constant<int, 1>{});
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

constexpr int64_t STAGED = 16;  // blocks of 32 staged at a time (~10 KiB for Q8_0)

// Blocks of 32 of 16 rows copied row by row (each row read in order, as the
// prefetchers like) into the order the transpose reads: pieces side by side in
// staged_slot order, each row's scales and high bits at its index
struct Staged {
  alignas(64) uint8_t pieces[STAGED][2][16][16];  // [block][piece][slot][byte]
  alignas(64) uint16_t d[STAGED][16], m[STAGED][16];
  alignas(64) uint32_t qh[STAGED][16];
  // super-blocks (STAGED blocks of 32 are STAGED / 8 of them): all of a range staged
  // before any is transposed, which streams the weights from memory ~1.5x faster
  StagedUnit unit[STAGED / 8];
};

template <class T>
void stage(const uint8_t* base, int64_t row_bytes, int rows, int64_t b0, int64_t n, Staged& s) {
  for (int r = 0; r < 16; ++r) {
    int slot = staged_slot(r);
    if (r >= rows) {  // past the matrix's last row: zeros, whose outputs are not stored
      for (int64_t j = 0; j < n; ++j) {
        for (int i = 0; i < T::PIECES; ++i) std::fill_n(s.pieces[j][i][slot], 16, 0);
        s.d[j][r] = s.m[j][r] = 0;
        s.qh[j][r] = 0;
      }
      continue;
    }
    const uint8_t* w = base + r * row_bytes + b0 * T::BYTES;
    // the next 16 rows' same range, fetched while these are decoded (a prefetch never
    // faults, so past the matrix's end too)
    const char* ahead = reinterpret_cast<const char*>(w + 16 * row_bytes);
    for (int64_t off = 0; off < n * T::BYTES; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T1);
    for (int64_t j = 0; j < n; ++j) {
      const uint8_t* b = w + j * T::BYTES;
      for (int i = 0; i < T::PIECES; ++i) {
        _mm_store_si128(reinterpret_cast<__m128i*>(s.pieces[j][i][slot]),
                        load128(b + T::VALUES_AT + 16 * i));
      }
      s.d[j][r] = *reinterpret_cast<const uint16_t*>(b + T::SCALE_AT);
      if constexpr (T::MIN) s.m[j][r] = *reinterpret_cast<const uint16_t*>(b + T::MIN_AT);
      if constexpr (T::QH_AT >= 0) s.qh[j][r] = u32(b + T::QH_AT);
    }
  }
}

// Blocks b0..b0+n of 16 rows of a matrix of blocks of 32 into the panel from block at
template <class T>
void decode_blocks(const uint8_t* base, int64_t row_bytes, int rows, int64_t b0, int64_t n,
                   Panel& p, int64_t at, Staged& s) {
  stage<T>(base, row_bytes, rows, b0, n, s);
  for (int64_t j = 0; j < n; ++j) {
    int64_t b = at + j;
    __m512i words[8];
    for (int i = 0; i < T::PIECES; ++i) transpose_staged4(s.pieces[j][i][0], words + 4 * i);
    __m512i qh = T::QH_AT >= 0 ? _mm512_load_si512(s.qh[j]) : _mm512_setzero_si512();
    T::widen(words, qh, p.q.data() + (b / 2) * 16 + (b % 2) * 8);
    __m512 scale = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(s.d[j])));
    p.scale[2 * b] = p.scale[2 * b + 1] = scale;
    p.min[b] = T::MIN ? _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(s.m[j])))
                      : _mm512_setzero_ps();
  }
}

// Super-block u of 16 rows copied row by row (each read in order, as the prefetchers
// like, and fetched for the next 16 rows meanwhile) into the order quads() reads
template <class T>
void stage_unit(const uint8_t* base, int64_t row_bytes, int rows, int64_t u, StagedUnit& s) {
  constexpr int TAIL = T::BYTES - 16 * T::PIECES;
  static_assert(T::PIECES <= StagedUnit::MOST && (TAIL == 0 || TAIL == 2));
  for (int r = 0; r < 16; ++r) {
    int slot = staged_slot(r);
    if (r >= rows) {  // past the matrix's last row: zeros, whose outputs are not stored
      for (int i = 0; i < T::PIECES; ++i) std::fill_n(s.pieces[i][slot], 16, 0);
      s.tail[r] = 0;
      continue;
    }
    const uint8_t* w = base + r * row_bytes + u * T::BYTES;
    const char* ahead = reinterpret_cast<const char*>(w + 16 * row_bytes);
    for (int off = 0; off < T::BYTES; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T1);
    for (int i = 0; i < T::PIECES; ++i) {
      _mm_store_si128(reinterpret_cast<__m128i*>(s.pieces[i][slot]), load128(w + 16 * i));
    }
    if constexpr (TAIL > 0) s.tail[r] = *reinterpret_cast<const uint16_t*>(w + 16 * T::PIECES);
  }
}

// Decodes a staged super-block of 16 weight rows into the panel at block b0
template <class T>
inline void decode_unit(Panel& p, int64_t b0, const StagedUnit& s) {
  T::quads(s, p.q.data() + (b0 / 2) * 16);
  __m512 sc[16], mn[8];  // scales unpacked across the rows
  T::scales(s, sc, mn);
  for (int j = 0; j < 8; ++j) {
    int64_t b = b0 + j;
    if constexpr (T::HALVES == 2) {
      p.scale[2 * b] = sc[2 * j];
      p.scale[2 * b + 1] = sc[2 * j + 1];
    } else {
      p.scale[2 * b] = p.scale[2 * b + 1] = sc[j];
    }
    p.min[b] = T::MIN ? mn[j] : _mm512_setzero_ps();
  }
}

// Blocks of 32 a staged range holds for a row of `blocks`: STAGED (STAGED / 8
// super-blocks); blocks of 32 in the fewest ranges of at most STAGED, of even length,
// so that a short row (a small model's 18 or 20 blocks) is not read as a range and a
// sliver
template <class T>
int64_t range_blocks(int64_t blocks) {
  static_assert(STAGED % 8 == 0, "ranges of whole super-blocks");
  if constexpr (T::SUBS > 1) return STAGED;
  int64_t ranges = (blocks + STAGED - 1) / STAGED;
  return (blocks + ranges - 1) / ranges;
}

// Blocks b0..b0+n (b0 and n multiples of range_blocks or the end) into the panel from block at
template <class T>
void decode_range(const uint8_t* base, int64_t row_bytes, int rows, int64_t b0, int64_t n, Panel& p,
                  int64_t at, Staged& s) {
  if constexpr (T::SUBS == 1) {
    decode_blocks<T>(base, row_bytes, rows, b0, n, p, at, s);
  } else {
    for (int64_t b = b0; b < b0 + n; b += T::SUBS) {
      stage_unit<T>(base, row_bytes, rows, b / T::SUBS, s.unit[(b - b0) / T::SUBS]);
    }
    for (int64_t b = b0; b < b0 + n; b += T::SUBS) {
      decode_unit<T>(p, at + b - b0, s.unit[(b - b0) / T::SUBS]);
    }
  }
}

// acc + the products of u against the 4 signed digits at p, broadcast to every lane
// (a separate broadcast: the one folded into vpdpbusd runs at half speed on Zen 4)
inline __m512i dpbusd_at(__m512i acc, __m512i u, const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return dpbusd(acc, u, _mm512_set1_epi32(v));
}

// A half of panel block pb: its exact sums 256 sum(w h) and sum(w l) against block b
// of R activation rows (lanes across 16 weight rows) into acc, by the steps every
// quantized output element follows (activations.h), whichever code summed them:
// vectors or tiles
template <class T, int R>
inline void fold(const __m512i* high, const __m512i* low, const Panel& p, int64_t pb,
                 const XBlock* const* x, int64_t b, int half, __m512* acc) {
  __m512 ws = p.scale[2 * pb + (T::HALVES == 2 ? half : 0)];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const XBlock& xb = x[r][b];
    int32_t xs = T::HALVES == 2 ? xb.sum16[half] : xb.sum16[0] + xb.sum16[1];
    __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(high[r], 8), low[r]);
    sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(T::ZERO * xs));
    __m512 scale = _mm512_mul_ps(ws, _mm512_set1_ps(xb.scale));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r]);
  }
}

// The minimums' term of panel block pb for block b of R activation rows, after its halves
template <class T, int R>
inline void fold_min(const Panel& p, int64_t pb, const XBlock* const* x, int64_t b, __m512* acc) {
  if constexpr (T::MIN) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(p.min[pb], _mm512_set1_ps(x[r][b].scaled_sum), acc[r]);
    }
  }
}

// Block pb of the panel against block b of R activation rows (row r's blocks at
// x[r]), into acc. Unrolled, so that the sums and the row pointers stay in registers.
template <class T, int R>
inline void accumulate(const Panel& p, int64_t pb, const XBlock* const* x, int64_t b, __m512* acc) {
  const __m512i* w = p.q.data() + (pb / 2) * 16 + (pb % 2) * 8;
  for (int half = 0; half < T::HALVES; ++half) {
    constexpr int QUADS = 8 / T::HALVES;
    __m512i high[R], low[R];
    for (int r = 0; r < R; ++r) high[r] = low[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int k = half * QUADS; k < (half + 1) * QUADS; ++k) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        high[r] = dpbusd_at(high[r], w[k], x[r][b].h + 4 * k);
        low[r] = dpbusd_at(low[r], w[k], x[r][b].l + 4 * k);
      }
    }
    fold<T, R>(high, low, p, pb, x, b, half, acc);
  }
  fold_min<T, R>(p, pb, x, b, acc);
}

template <int R>
inline void store_rows(const __m512* acc, float* y, int64_t ldy, int cols) {
  __mmask16 m = lanes(cols);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy, m, acc[r]);
}

// The panel (16 weight rows decoded for the whole K) against activation rows
// r0..r0+R.
template <class T, int R>
void panel_rows(const Panel& p, const Act& a, int64_t r0, float* y, int64_t ldy, int cols) {
  __m512 acc[R];
  const XBlock* x[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), x[r] = a.row(r0 + r);
  for (int64_t b = 0; b < a.blocks; ++b) accumulate<T, R>(p, b, x, b, acc);
  store_rows<R>(acc, y, ldy, cols);
}

// Tile registers of panel_tiles: the two sums, the activation digits h and l, the
// weights. Macros of plain numbers: the tile intrinsics paste their register
// numbers into the instruction's text, where a constant's name is no register.
#define HIGH_SUMS 0
#define LOW_SUMS 1
#define HIGH_DIGITS 2
#define LOW_DIGITS 3
#define WEIGHTS 4

// Where a thread's tile sums land for the fold
struct TileSums {
  alignas(64) int32_t high[16][16], low[16][16];  // [activation row][weight row]
};

// The tiles' shapes for T: a product sums a block half (QUADS quads) of 16 rows
template <class T>
void configure_tiles() {
  constexpr int QUADS = 8 / T::HALVES;
  TileConfig cfg;
  cfg.rows[HIGH_SUMS] = cfg.rows[LOW_SUMS] = cfg.rows[HIGH_DIGITS] = cfg.rows[LOW_DIGITS] = 16;
  cfg.colsb[HIGH_SUMS] = cfg.colsb[LOW_SUMS] = cfg.colsb[WEIGHTS] = 64;
  cfg.colsb[HIGH_DIGITS] = cfg.colsb[LOW_DIGITS] = 4 * QUADS;
  cfg.rows[WEIGHTS] = QUADS;
  ACCORDION_TILE_CONFIG(&cfg);
}

// panel_rows for 16 activation rows r0.. (the Act padded to 16) on AMX-INT8 tiles:
// a block half's sums of signed digits times unsigned weights are the very
// integers vpdpbusd sums, then folded by the vector code's steps, so the outputs
// are panel_rows' bits. The panel's quads across 16 rows are the weight tile's
// layout as they are; each activation row's digits are a row of its tiles.
template <class T>
void panel_tiles(const Panel& p, const Act& a, int64_t r0, int rows, float* y, int64_t ldy,
                 int cols, TileSums& s) {
  constexpr int QUADS = 8 / T::HALVES;
  __m512 acc[16];
  const XBlock* x[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps(), x[r] = a.row(r0 + r);
  const int64_t stride = a.blocks * static_cast<int64_t>(sizeof(XBlock));
  const __m512i *high = reinterpret_cast<const __m512i*>(s.high),
                *low = reinterpret_cast<const __m512i*>(s.low);
  for (int64_t b = 0; b < a.blocks; ++b) {
    const __m512i* w = p.q.data() + (b / 2) * 16 + (b % 2) * 8;
    for (int half = 0; half < T::HALVES; ++half) {
      ACCORDION_TILE_ZERO(HIGH_SUMS);
      ACCORDION_TILE_ZERO(LOW_SUMS);
      ACCORDION_TILE_LOAD(HIGH_DIGITS, x[0][b].h + 4 * QUADS * half, stride);
      ACCORDION_TILE_LOAD(LOW_DIGITS, x[0][b].l + 4 * QUADS * half, stride);
      ACCORDION_TILE_LOAD(WEIGHTS, w + QUADS * half, 64);
      ACCORDION_TILE_DPBSUD(HIGH_SUMS, HIGH_DIGITS, WEIGHTS);
      ACCORDION_TILE_DPBSUD(LOW_SUMS, LOW_DIGITS, WEIGHTS);
      ACCORDION_TILE_STORE(HIGH_SUMS, s.high, 64);
      ACCORDION_TILE_STORE(LOW_SUMS, s.low, 64);
      fold<T, 16>(high, low, p, b, x, b, half, acc);
    }
    fold_min<T, 16>(p, b, x, b, acc);
  }
  __mmask16 mask = lanes(cols);
  for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(y + r * ldy, mask, acc[r]);
}
#undef HIGH_SUMS
#undef LOW_SUMS
#undef HIGH_DIGITS
#undef LOW_DIGITS
#undef WEIGHTS

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

// Output columns 16g..16g+15 of one matrix for all m activation rows.
template <class T>
void run_group(const uint8_t* base, int64_t n, int64_t row_bytes, const Act& a, int64_t m,
               float* out, int64_t ldy, int64_t g, Panel& panel, Staged& staged, TileSums* sums) {
  int64_t n0 = 16 * g;
  const uint8_t* rows = base + n0 * row_bytes;
  int cols = static_cast<int>(std::min<int64_t>(16, n - n0));
  const int64_t span = range_blocks<T>(a.blocks);
  if (m <= MR) {  // decode rows: each staged range used at once, the panel small enough for L1
    panel.resize(STAGED / 2);
    with_rows(m, [&](auto r) {
      constexpr int R = decltype(r)::value;
      __m512 acc[R];
      const XBlock* x[R];
      for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps(), x[i] = a.row(i);
      for (int64_t b0 = 0; b0 < a.blocks; b0 += span) {
        int64_t k = std::min(span, a.blocks - b0);
        decode_range<T>(rows, row_bytes, cols, b0, k, panel, 0, staged);
        for (int64_t j = 0; j < k; ++j) accumulate<T, R>(panel, j, x, b0 + j, acc);
      }
      store_rows<R>(acc, out + n0, ldy, cols);
    });
    return;
  }
  panel.resize((a.blocks + 1) / 2);  // many rows: the panel decoded once for the whole K
  for (int64_t b0 = 0; b0 < a.blocks; b0 += span) {
    decode_range<T>(rows, row_bytes, cols, b0, std::min(span, a.blocks - b0), panel, b0, staged);
  }
  if (sums != nullptr) {  // AMX-INT8: the same bits as the vector loop below
    configure_tiles<T>();
    for (int64_t r0 = 0; r0 < m; r0 += 16) {
      int count = static_cast<int>(std::min<int64_t>(16, m - r0));
      panel_tiles<T>(panel, a, r0, count, out + r0 * ldy + n0, ldy, cols, *sums);
    }
    ACCORDION_TILE_RELEASE();
    return;
  }
  for (int64_t r0 = 0; r0 < m; r0 += MR) {
    float* y = out + r0 * ldy + n0;
    with_rows(std::min(MR, m - r0),
              [&](auto r) { panel_rows<T, decltype(r)::value>(panel, a, r0, y, ldy, cols); });
  }
}

// What a thread keeps between its groups of 16 rows
struct GroupScratch {
  Panel panel;
  Staged staged;  // ~19 KiB of the thread's stack
  TileSums sums;  // 2 KiB, read only by the tile code
};

// Many rows on AMX-INT8 tiles: off until measured against the bf16 tiles (see
// qmatmul_int8_tiles); the results are the vector code's either way.
bool use_int8_tiles = false;

bool int8_tiles_ready() {
#if defined(ACCORDION_SOFT_TILES)
  return true;
#else
  return INT8_TILES && amx_available();
#endif
}

void run_quantized(const std::vector<Part>& parts, const Act& a, int64_t m, float* out, int64_t ldy,
                   bool tiles) {
  for_groups<GroupScratch>(parts, [&](GroupScratch& sc, const Part& p, int64_t g) {
    with_type(p.block_bytes, [&](auto type) {
      run_group<decltype(type)>(p.w, p.n, p.row_bytes, a, m, out + p.col, ldy, g, sc.panel,
                                sc.staged, tiles ? &sc.sums : nullptr);
    });
  });
}

template <class W>
void run_float(const Tensor& w, const float* x, int64_t m, int64_t k, float* out, int64_t ldy) {
  const W* base = w.data_ptr<W>();
  for_tiles(m, w.size(0), [&](int64_t r0, int64_t rows, int64_t j) {
    const W* row = base + j * k;
    float* y = out + r0 * ldy + j;
    with_rows(rows, [&](auto r) { dot_float<W, decltype(r)::value>(row, x, r0, k, y, ldy); });
  });
}

bool use_amx = true;  // tests switch it off to check the vector code on AMX CPUs

// Values per block of a quantized part (see with_type).
int64_t block_values(int64_t bytes) {
  int64_t values = 0;
  bool known = with_type(bytes, [&](auto type) { values = decltype(type)::BLOCK; });
  TORCH_CHECK(known, "no quantized type has ", bytes, "-byte blocks");
  return values;
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
  if (any_quantized) TORCH_CHECK(k % 32 == 0, "quantized weights need K a multiple of 32");
  float* y = out.data_ptr<float>();
  // quantized matrices all in one parallel loop: on AMX-BF16 tiles where the CPU has
  // them, else through the vector code
  std::vector<Part> quantized;
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
        quantized.push_back({part.data_ptr<uint8_t>(), part.size(0), part.size(1) * part.size(2),
                             part.size(2), col});
        break;
      default:
        TORCH_CHECK(false, "weights: float32, float16, bfloat16 or GGUF blocks (uint8)");
    }
    col += part.size(0);
  }
  const float* xs = x.data_ptr<float>();
  if (!quantized.empty() && !(use_amx && amx_matmul(quantized, xs, m, k, y, total))) {
    bool tiles = use_int8_tiles && m > MR && int8_tiles_ready();
    Act act;
    quantize(xs, m, k, act, tiles ? 16 : 1);
    run_quantized(quantized, act, m, y, total, tiles);
  }
  if (bias.has_value()) out.add_(*bias);
  return out;
}

// Whether quantized products may use AMX-BF16 tiles (where the CPU has them); returns
// whether they will. Tests switch them off to check the vector code here too.
bool qmatmul_amx(bool on) {
  use_amx = on;
  return on && amx_available();
}

// Whether the vector code's products of many rows may take AMX-INT8 tiles (where
// the CPU has them); returns whether they will. Their bits are the vector code's,
// so decode steps keep the vectors' speed at one row while prefill takes the tiles.
bool qmatmul_int8_tiles(bool on) {
  use_int8_tiles = on;
  return on && int8_tiles_ready();
}

#ifndef ACCORDION_OPS  // the ops' namespace: tests build the C++ tiles under another
#define ACCORDION_OPS accordion
#endif

TORCH_LIBRARY_FRAGMENT(ACCORDION_OPS, m) {
  m.def("qmatmul(Tensor x, Tensor[] w, Tensor? bias) -> Tensor");
  m.def("qmatmul_amx(bool on) -> bool");
  m.def("qmatmul_int8_tiles(bool on) -> bool");
  m.impl("qmatmul_amx", c10::DispatchKey::CatchAll, &qmatmul_amx);
  m.impl("qmatmul_int8_tiles", c10::DispatchKey::CatchAll, &qmatmul_int8_tiles);
  m.impl("qmatmul", c10::DispatchKey::CompositeImplicitAutograd, &qmatmul);
}
