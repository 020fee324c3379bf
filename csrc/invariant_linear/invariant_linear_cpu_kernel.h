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

// ---- GGUF blocks -> float32 (quant_linear): the loaded model's exact float32 values --------------
// IEEE half -> float (exact: every half is a float), without F16C so the copies agree by design.
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while ((man & 0x400u) == 0);
    bits = sign | ((112u - static_cast<uint32_t>(e)) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

static inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

static inline float block_scale(const uint8_t* p) {
#ifdef PTP_CPU_AVX2
  return _cvtsh_ss(load_u16(p));  // F16C: exact, as half_to_float
#else
  return half_to_float(load_u16(p));
#endif
}

// The four 8-float chunks (k = 0-7, 8-15, 16-23, 24-31 of the block) of one GGUF block, dequantised
// in registers: Q4_1 w = d * q + m (d * q exact: 11 x 4 significant bits, so the FMA rounds once,
// as numpy's d * q + m does), Q8_0 w = d * q (exact). Bitwise the loaded float32 weights.
template <bool kQ41>
static inline void dequant_block(const uint8_t* blk, vf out[4]) {
#ifdef PTP_CPU_AVX2
  const __m256 dv = _mm256_set1_ps(block_scale(blk));
  if constexpr (kQ41) {
    const __m256 mv = _mm256_set1_ps(block_scale(blk + 2));
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(bytes, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    out[0] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), mv);
    out[1] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), mv);
    out[2] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), mv);
    out[3] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), mv);
  } else {
    const __m256i q01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    const __m128i a = _mm256_castsi256_si128(q01), b = _mm256_extracti128_si256(q01, 1);
    out[0] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)));
    out[1] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))));
    out[2] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
    out[3] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))));
  }
#else
  float w[32];
  const float d = block_scale(blk);
  if constexpr (kQ41) {
    const float m = block_scale(blk + 2);
    const uint8_t* qs = blk + 4;
    for (int i = 0; i < 16; ++i) {
      w[i] = d * static_cast<float>(qs[i] & 0x0f) + m;
      w[i + 16] = d * static_cast<float>(qs[i] >> 4) + m;
    }
  } else {
    const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
    for (int i = 0; i < 32; ++i) w[i] = d * static_cast<float>(qs[i]);
  }
  for (int c = 0; c < 4; ++c) out[c] = vload(w + 8 * c);
#endif
}

// tile() over GGUF blocks: NR x rows against NW quantised weight rows (row j at w + j * row_bytes,
// K / 32 blocks of kBytes). Each accumulator gets the same FMAs in the same k order as tile() on
// the dequantised rows (K is a multiple of 32: no scalar tail), so out is bitwise the same.
template <int NR, int NW, bool kQ41>
static inline void qtile(const float* x, const uint8_t* w, int64_t K, int64_t row_bytes, float* out,
                         int64_t ldo) {
  constexpr int64_t kBytes = kQ41 ? 20 : 34;
  vf acc[NR][NW];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NW; ++j) acc[r][j] = vf{};
  const int64_t nblk = K / 32;
  for (int64_t b = 0; b < nblk; ++b) {
    const float* xb = x + b * 32;
    for (int j = 0; j < NW; ++j) {
      vf wv[4];
      dequant_block<kQ41>(w + j * row_bytes + b * kBytes, wv);
      for (int c = 0; c < 4; ++c)
        for (int r = 0; r < NR; ++r) acc[r][j] = vfma(vload(xb + r * K + 8 * c), wv[c], acc[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NW; ++j) {
      const float t = 0.f;  // tile()'s (empty) scalar tail, added the same way
      out[r * ldo + j] = vhsum(acc[r][j]) + t;
    }
}

template <int NW, bool kQ41>
static inline void qtile_rows(int64_t rows, const float* x, const uint8_t* w, int64_t K,
                              int64_t row_bytes, float* out, int64_t ldo) {
  switch (rows) {
    case 1: qtile<1, NW, kQ41>(x, w, K, row_bytes, out, ldo); break;
    case 2: qtile<2, NW, kQ41>(x, w, K, row_bytes, out, ldo); break;
#if PTP_IL_MAX_TILE >= 3
    case 3: qtile<3, NW, kQ41>(x, w, K, row_bytes, out, ldo); break;
#endif
#if PTP_IL_MAX_TILE >= 6
    case 4: qtile<4, NW, kQ41>(x, w, K, row_bytes, out, ldo); break;
    case 5: qtile<5, NW, kQ41>(x, w, K, row_bytes, out, ldo); break;
    case 6: qtile<6, NW, kQ41>(x, w, K, row_bytes, out, ldo); break;
#endif
    default: break;
  }
}

// `nrows` quantised rows (stride row_bytes) -> float32 rows (stride K) in `buf`.
template <bool kQ41>
static inline void dequant_rows(const uint8_t* w, int64_t row_bytes, int64_t nrows, int64_t K,
                                float* buf) {
  constexpr int64_t kBytes = kQ41 ? 20 : 34;
  for (int64_t j = 0; j < nrows; ++j)
    for (int64_t b = 0; b < K / 32; ++b) {
      vf wv[4];
      dequant_block<kQ41>(w + j * row_bytes + b * kBytes, wv);
      for (int c = 0; c < 4; ++c) vstore(buf + j * K + b * 32 + 8 * c, wv[c]);
    }
}

// rows_block() over quantised weight rows [n0, n1) (row n at w + n * row_bytes). Up to one
// register tile of x rows: the blocks are dequantised in registers (qtile). More rows: each
// 4-row weight tile is dequantised once into `buf` (4 * K floats, in L1) and every x tile runs
// tile() on it. Either way, the same FMAs as rows_block() on the dequantised weights.
template <bool kQ41>
static inline void qrows_block(const float* x, int64_t N, int64_t K, const uint8_t* w,
                               int64_t row_bytes, int64_t n0, int64_t n1, float* y, int64_t ldy,
                               float* buf) {
  const int64_t tiles = (N + kMaxTile - 1) / kMaxTile;
  const int64_t base = N / tiles, extra = N % tiles;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const uint8_t* wn = w + n * row_bytes;
    if (tiles == 1) {
      qtile_rows<4, kQ41>(N, x, wn, K, row_bytes, y + n, ldy);
      continue;
    }
    dequant_rows<kQ41>(wn, row_bytes, 4, K, buf);
    int64_t m = 0;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t rows = base + (t < extra ? 1 : 0);
      tile_rows<4>(rows, x + m * K, buf, K, y + m * ldy + n, ldy, nullptr);
      m += rows;
    }
  }
  for (; n < n1; ++n) {
    const uint8_t* wn = w + n * row_bytes;
    int64_t m = 0;
    for (; m + 2 <= N; m += 2) qtile<2, 1, kQ41>(x + m * K, wn, K, row_bytes, y + m * ldy + n, ldy);
    if (m < N) qtile<1, 1, kQ41>(x + m * K, wn, K, row_bytes, y + m * ldy + n, ldy);
  }
}

#undef PTP_IL_MAX_TILE
