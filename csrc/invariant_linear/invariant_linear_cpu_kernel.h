// The inner kernel of invariant_linear_cpu, included three times (baseline ISA, AVX2 + FMA + F16C,
// and the same with AVX-512VL for 32 vector registers; see invariant_linear_cpu.cpp); it
// includes nothing but common/cpu_simd.inc.
//
// y[m, n] = hsum(acc) + tail (+ bias[n]), acc an 8-lane float32 accumulator over the full
// 8-float chunks of k in order, tail the scalar sum of the last K % 8 products in order, hsum a
// fixed left-to-right lane sum. That sequence depends on (m, n) only: the register tiles (4
// weight rows x 1..kMaxTile x rows) share loads, never partial sums.
//
// kMaxTile: x rows per register tile, 3 with 16 vector registers (12 accumulators), 6 with 32
// (24 accumulators, AVX-512VL's ymm16-31). A weight tile is loaded once per register tile, so
// fewer, taller tiles mean fewer loads per FMA: with 6-row tiles a call of up to 6 rows costs
// about what one row costs (the weight stream from memory bounds both).
#ifndef PTP_IL_MAX_TILE
#define PTP_IL_MAX_TILE 3
#endif
constexpr int kMaxTile = PTP_IL_MAX_TILE;

#include "../common/cpu_simd.inc"

static inline float sfma(float a, float b, float c) {
#ifdef PTP_CPU_AVX2
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// NR x rows (stride K) against NW weight rows (stride K): out[r * ldo + w]. `pf` (or null): weight
// rows further down the stream, prefetched into L2 a cache line per row every 16 floats of k,
// so the memory stream keeps flowing while this tile computes (prefetches never change sums).
template <int NR, int NW>
static inline void tile(const float* x, const float* w, int64_t K, float* out, int64_t ldo,
                        const float* pf = nullptr) {
  vf acc[NR][NW];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NW; ++j) acc[r][j] = vf{};
  const int64_t K8 = K / kW * kW;
  for (int64_t k = 0; k < K8; k += kW) {
#ifdef PTP_CPU_AVX2
    if (pf && (k & 15) == 0)
      for (int j = 0; j < NW; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(pf + j * K + k), _MM_HINT_T1);
#endif
    vf xv[NR];
    for (int r = 0; r < NR; ++r) xv[r] = vload(x + r * K + k);
    for (int j = 0; j < NW; ++j) {
      const vf wv = vload(w + j * K + k);
      for (int r = 0; r < NR; ++r) acc[r][j] = vfma(xv[r], wv, acc[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NW; ++j) {
      float t = 0.f;
      for (int64_t k = K8; k < K; ++k) t = sfma(x[r * K + k], w[j * K + k], t);
      out[r * ldo + j] = vhsum(acc[r][j]) + t;
    }
}

// `rows` x rows (1 <= rows <= kMaxTile) against NW weight rows.
template <int NW>
static inline void tile_rows(int64_t rows, const float* x, const float* w, int64_t K, float* out,
                             int64_t ldo, const float* pf) {
  switch (rows) {
    case 1: tile<1, NW>(x, w, K, out, ldo, pf); break;
    case 2: tile<2, NW>(x, w, K, out, ldo, pf); break;
#if PTP_IL_MAX_TILE >= 3
    case 3: tile<3, NW>(x, w, K, out, ldo, pf); break;
#endif
#if PTP_IL_MAX_TILE >= 6
    case 4: tile<4, NW>(x, w, K, out, ldo, pf); break;
    case 5: tile<5, NW>(x, w, K, out, ldo, pf); break;
    case 6: tile<6, NW>(x, w, K, out, ldo, pf); break;
#endif
    default: break;
  }
}

// Prefetch distance: this many 4-row weight tiles ahead (16 rows, 37 KB for K = 576). With the
// L2 hint it keeps enough lines in flight for one core to stream at its share of the memory
// bandwidth; one tile ahead into L1 did not (measured on the 2-core dev VM, SmolLM2 shapes:
// 1 row 19.5 -> 13 ms, 4 rows 25 -> 18 ms with the same 3-row tiles).
constexpr int64_t kPrefetchTiles = 4;

// Weight rows [n0, n1) (float32, already converted) against all N x rows; y is [N, ldy].
// `pf_end` (or null: no prefetch): the end of the weight rows this thread reads in this call;
// prefetches stay below it.
static inline void rows_block(const float* x, int64_t N, int64_t K, const float* w, int64_t n0,
                              int64_t n1, float* y, int64_t ldy, const float* pf_end = nullptr) {
  // N rows in the fewest register tiles, of near-equal heights (the tiling never changes a row's
  // arithmetic, so it may depend on N).
  const int64_t tiles = (N + kMaxTile - 1) / kMaxTile;
  const int64_t base = N / tiles, extra = N % tiles;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* wn = w + (n - n0) * K;
    const float* pf = wn + kPrefetchTiles * 4 * K;
    if (pf_end == nullptr || pf + 4 * K > pf_end) pf = nullptr;
    int64_t m = 0;
    for (int64_t t = 0; t < tiles; ++t, pf = nullptr) {  // prefetch with the first x tile only
      const int64_t rows = base + (t < extra ? 1 : 0);
      tile_rows<4>(rows, x + m * K, wn, K, y + m * ldy + n, ldy, pf);
      m += rows;
    }
  }
  for (; n < n1; ++n) {
    const float* wn = w + (n - n0) * K;
    int64_t m = 0;
    for (; m + 2 <= N; m += 2) tile<2, 1>(x + m * K, wn, K, y + m * ldy + n, ldy);
    if (m < N) tile<1, 1>(x + m * K, wn, K, y + m * ldy + n, ldy);
  }
}

#undef PTP_IL_MAX_TILE
