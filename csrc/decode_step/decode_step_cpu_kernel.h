// The body of decode_step_cpu, included once per ISA (see decode_step_cpu.cpp) inside a namespace
// that also holds that ISA's copies of invariant_linear's kernel (namespace il) and
// tree_attention's (namespace ta). Torch-free: raw pointers in a StepArgs.
//
// Threads: one OpenMP parallel region per call. Per layer, seven phases, each ending at a barrier:
//   1. every thread RMS-normalises all rows into its own buffer (a few KB; no barrier needed),
//      then computes its share of q, k and v's output features (rows of the weights: each
//      weight byte is read by one thread, once per call, for all the call's rows);
//   2. rotary + KV-cache write, split over (row, head);
//   3. attention units (batch row, KV head, 64-key chunk), tree_attention's unit (in the AVX-512
//      copy its 16-lane form below, zattend_unit);
//   4. merge of the chunks, split over (batch row, KV head);
//   5. o_proj over the thread's output features + residual on those features;
//   then the MLP: norm (each thread, all rows), gate and up over the thread's features with
//   SiLU(gate) * up fused, barrier, down + residual over the thread's features, barrier.
// A thread's share never changes a value: every element is computed by one thread in a fixed
// order (invariant_linear's register tiles, or in the AVX-512 copy the 16-lane tiles below;
// fixed attention chunks).

#include "../common/cpu_simd.inc"

// Features [n0, n1) of thread `tid` of `P` over M features, in multiples of 4 (register tiles).
static inline void share(int64_t M, int tid, int P, int64_t& n0, int64_t& n1) {
  const int64_t tiles = (M + 3) / 4;
  n0 = std::min(M, tiles * tid / P * 4);
  n1 = std::min(M, tiles * (tid + 1) / P * 4);
}

#ifdef PTP_DS_ZMM
// ---- GGUF blocks, 16-lane (AVX-512) dot products ------------------------------------------------
// A block's 32 weights in two zmm (weights 0-15, 16-31), bitwise the loaded float32 weights:
// Q4_1 through a 16-entry table d * v + m (v = 0..15, one FMA each: d * v is exact, so it rounds
// once, as the loader's d * q + m) indexed by the nibbles (vpermps); Q8_0 as d * q (exact).
// About half the instructions of invariant_linear's 8-lane dequantisation (the blocks' matvec is
// compute-bound on one core: ~5 ns per block and row there). Each output is
// hsum16(acc) with acc = fma(x[0:16], w[0:16], acc), fma(x[16:32], w[16:32], acc) over the blocks
// in order: one fixed sequence per (row, feature), whatever the tiling (row invariance).
template <int FMT>
static inline void zweights(const uint8_t* row, int64_t b, int64_t nb, __m512& lo, __m512& hi) {
  if constexpr (FMT == 1 || FMT == 3) {
    const __m512 iota = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f,
                                       12.f, 13.f, 14.f, 15.f);
    __m512 table;
    const uint8_t* qs;
    if constexpr (FMT == 1) {  // GGUF: (d, m) fp16 then the 16 nibble bytes, in the block
      const uint8_t* blk = row + 20 * b;
      int32_t dm_bits;
      __builtin_memcpy(&dm_bits, blk, 4);
      const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm_bits));  // [d, m, 0, 0]
      table = _mm512_fmadd_ps(_mm512_broadcastss_ps(dm), iota, _mm512_broadcastss_ps(_mm_movehdup_ps(dm)));
      qs = blk + 4;
    } else {
      // q4_1 split (ops.q4_1_split): (d, m) as float32 at row + 8 b, broadcast straight from
      // memory (load ports: the fp16 load, convert and two broadcasts above occupy the shuffle
      // pipes that bound a 1-row call), the nibbles at row + 8 nb + 16 b
      const float* dm = reinterpret_cast<const float*>(row) + 2 * b;
      table = _mm512_fmadd_ps(_mm512_set1_ps(dm[0]), iota, _mm512_set1_ps(dm[1]));
      qs = row + 8 * nb + 16 * b;
    }
    // vpermps reads only an index lane's low 4 bits: the zero-extended byte indexes its low
    // nibble as it is, and shifted right by 4 its high nibble (no masks).
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    lo = _mm512_permutexvar_ps(idx, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table);
  } else {
    const uint8_t* blk = row + 34 * b;
    uint16_t d_bits;
    __builtin_memcpy(&d_bits, blk, 2);
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(d_bits));
    const __m128i* q = reinterpret_cast<const __m128i*>(blk + 2);
    lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))));
    hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))));
  }
}

constexpr int kZRows = 4;  // x rows per register tile (4 x 4 accumulators + 8 x vectors)

// NR x rows against NW weight rows: GGUF blocks dequantised in registers (kBuf false, row j at
// w + j * row_bytes) or float32 rows already dequantised into buf (kBuf true, row j at
// buf + j * K). The same FMAs either way.
template <int NR, int NW, int FMT, bool kBuf>
static inline void ztile(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes,
                         const float* buf, float* out, int64_t ldo) {
  __m512 acc[NR][NW];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NW; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    __m512 xl[NR], xh[NR];
    for (int r = 0; r < NR; ++r) {
      xl[r] = _mm512_loadu_ps(x + r * K + b * 32);
      xh[r] = _mm512_loadu_ps(x + r * K + b * 32 + 16);
    }
    for (int j = 0; j < NW; ++j) {
      __m512 lo, hi;
      if constexpr (kBuf) {
        lo = _mm512_loadu_ps(buf + j * K + b * 32);
        hi = _mm512_loadu_ps(buf + j * K + b * 32 + 16);
      } else {
        zweights<FMT>(w + j * row_bytes, b, K / 32, lo, hi);
      }
      for (int r = 0; r < NR; ++r) {
        acc[r][j] = _mm512_fmadd_ps(xl[r], lo, acc[r][j]);
        acc[r][j] = _mm512_fmadd_ps(xh[r], hi, acc[r][j]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NW; ++j) out[r * ldo + j] = _mm512_reduce_add_ps(acc[r][j]);
}

template <int NW, int FMT, bool kBuf>
static inline void ztile_rows(int64_t rows, const float* x, int64_t K, const uint8_t* w,
                              int64_t row_bytes, const float* buf, float* out, int64_t ldo) {
  switch (rows) {
    case 1: ztile<1, NW, FMT, kBuf>(x, K, w, row_bytes, buf, out, ldo); break;
    case 2: ztile<2, NW, FMT, kBuf>(x, K, w, row_bytes, buf, out, ldo); break;
    case 3: ztile<3, NW, FMT, kBuf>(x, K, w, row_bytes, buf, out, ldo); break;
    default: ztile<4, NW, FMT, kBuf>(x, K, w, row_bytes, buf, out, ldo); break;
  }
}

// Taller tiles (5..8 x rows) against NW (1 or 2) weight rows, the weights dequantised in registers
// once per block for all the tile's rows and each row's x vectors loaded as they are used (8 x 2
// accumulators + 4 weight vectors + 2 x vectors: no spills). The same FMAs per accumulator as
// ztile (acc = fma(x[0:16], w[0:16], acc), fma(x[16:32], w[16:32], acc) over the blocks in order),
// so a row's outputs are bitwise those of any other tiling.
constexpr int kZTall = 8;

template <int NR, int NW, int FMT>
static inline void ztall(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes, float* out,
                         int64_t ldo) {
  __m512 acc[NR][NW];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NW; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    __m512 lo[NW], hi[NW];
    for (int j = 0; j < NW; ++j) zweights<FMT>(w + j * row_bytes, b, K / 32, lo[j], hi[j]);
    for (int r = 0; r < NR; ++r) {
      const __m512 xl = _mm512_loadu_ps(x + r * K + b * 32);
      const __m512 xh = _mm512_loadu_ps(x + r * K + b * 32 + 16);
      for (int j = 0; j < NW; ++j) {
        acc[r][j] = _mm512_fmadd_ps(xl, lo[j], acc[r][j]);
        acc[r][j] = _mm512_fmadd_ps(xh, hi[j], acc[r][j]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NW; ++j) out[r * ldo + j] = _mm512_reduce_add_ps(acc[r][j]);
}

template <int NW, int FMT>
static inline void ztall_rows(int64_t rows, const float* x, int64_t K, const uint8_t* w,
                              int64_t row_bytes, float* out, int64_t ldo) {
  switch (rows) {
    case 1: ztall<1, NW, FMT>(x, K, w, row_bytes, out, ldo); break;
    case 2: ztall<2, NW, FMT>(x, K, w, row_bytes, out, ldo); break;
    case 3: ztall<3, NW, FMT>(x, K, w, row_bytes, out, ldo); break;
    case 4: ztall<4, NW, FMT>(x, K, w, row_bytes, out, ldo); break;
    case 5: ztall<5, NW, FMT>(x, K, w, row_bytes, out, ldo); break;
    case 6: ztall<6, NW, FMT>(x, K, w, row_bytes, out, ldo); break;
    case 7: ztall<7, NW, FMT>(x, K, w, row_bytes, out, ldo); break;
    default: ztall<8, NW, FMT>(x, K, w, row_bytes, out, ldo); break;
  }
}

// Features [n0, n1) of a GGUF-block linear over all N rows of x. Up to 4 rows: one register tile
// of 4 weight rows (ztile). 5-8 rows: one tall tile against 2 weight rows at a time (ztall; the
// buffered path below made 5 rows cost twice 4). More: each 4-row weight tile dequantised once
// into buf (exact values), then every 4-row x tile reads it.
#ifndef PTP_ZPF_ROWS
#define PTP_ZPF_ROWS 12
#endif
// Software prefetch distance in weight rows (3 register tiles): the blocks of the rows this far
// ahead in the thread's range are requested into L2 while a tile computes, so that the weight
// stream keeps flowing from DRAM (a prefetch never changes a value). Interleaved A/B on the
// 2-core EPYC, one SmolLM2 call at a 256-token context: no prefetch 9.0 ms, 4 rows 7.6, 8-12 rows
// 7.0, 32 rows 7.5, 128 rows 8.1 (with the cheaper Q4_1 dequantisation a shorter distance keeps
// up, and a longer one only evicts).
constexpr int64_t kZPrefetchRows = PTP_ZPF_ROWS;

// `nta`: in a 1-row call the layers' weights are prefetched non-temporally (into L1 only: on Zen
// the L3 is filled by L2 evictions, so these lines never enter it), which keeps the LM head
// (prefetched into L2, the default) and the KV cache resident in L3 from one call to the next
// instead of being evicted by 66 MB of layer blocks. Interleaved A/B on the 2-core EPYC (32 MB
// L3), SmolLM2 1-row calls: 7.87 -> 7.18 ms at a 64-token context, 7.42 -> 6.86 at 256, 9.47 ->
// 8.77 at 800 (another time, on a busier host, even). With more rows the x rows crowd L1 and
// the weight lines, which NTA keeps out of L2, are fetched again: 2 and 3 rows were 5-8 % slower
// with it, so they prefetch into L2.
template <int FMT>
static inline void zrows_block(const float* x, int64_t N, int64_t K, const uint8_t* w,
                               int64_t row_bytes, int64_t n0, int64_t n1, float* y, int64_t ldy,
                               float* buf, bool nta) {
  const int64_t tiles = (N + kZRows - 1) / kZRows;
  const int64_t base = N / tiles, extra = N % tiles;
  int64_t n = n0;
  // the bytes prefetched so far (from the range's start, one tile ahead at first)
  const uint8_t* pf = w + n0 * row_bytes;
  const uint8_t* const pf_end = w + n1 * row_bytes;
  const bool tall = tiles > 1 && N <= kZTall;
  for (; n < n1;) {
    const int nw = tall ? (n + 2 <= n1 ? 2 : 1) : (n + 4 <= n1 ? 4 : 1);
    const uint8_t* wn = w + n * row_bytes;
    const uint8_t* pf_to = std::min(pf_end, wn + (kZPrefetchRows + nw) * row_bytes);
    if (nta && N == 1)
      for (; pf < pf_to; pf += 64) _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_NTA);
    else
      for (; pf < pf_to; pf += 64) _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T1);
    if (tiles == 1) {
      if (nw == 4)
        ztile_rows<4, FMT, false>(N, x, K, wn, row_bytes, nullptr, y + n, ldy);
      else
        ztile_rows<1, FMT, false>(N, x, K, wn, row_bytes, nullptr, y + n, ldy);
    } else if (tall) {
      if (nw == 2)
        ztall_rows<2, FMT>(N, x, K, wn, row_bytes, y + n, ldy);
      else
        ztall_rows<1, FMT>(N, x, K, wn, row_bytes, y + n, ldy);
    } else {
      for (int j = 0; j < nw; ++j)
        for (int64_t b = 0; b < K / 32; ++b) {
          __m512 lo, hi;
          zweights<FMT>(wn + j * row_bytes, b, K / 32, lo, hi);
          _mm512_storeu_ps(buf + j * K + b * 32, lo);
          _mm512_storeu_ps(buf + j * K + b * 32 + 16, hi);
        }
      int64_t m = 0;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t rows = base + (t < extra ? 1 : 0);
        if (nw == 4)
          ztile_rows<4, FMT, true>(rows, x + m * K, K, nullptr, 0, buf, y + m * ldy + n, ldy);
        else
          ztile_rows<1, FMT, true>(rows, x + m * K, K, nullptr, 0, buf, y + m * ldy + n, ldy);
        m += rows;
      }
    }
    n += nw;
  }
}

// The same tiles over float32 weights (K a multiple of 32): bitwise the blocks' results for the
// same weight values, so a layer gives the same outputs whether it kept its GGUF blocks or not
// (e.g. a model copy whose blocks no longer match), as quant_linear / invariant_linear do.
static inline void zrows_block_f32(const float* x, int64_t N, int64_t K, const float* w, int64_t n0,
                                   int64_t n1, float* y, int64_t ldy) {
  const int64_t tiles = (N + kZRows - 1) / kZRows;
  const int64_t base = N / tiles, extra = N % tiles;
  for (int64_t n = n0; n < n1;) {
    const int nw = n + 4 <= n1 ? 4 : 1;
    int64_t m = 0;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t rows = base + (t < extra ? 1 : 0);
      if (nw == 4)
        ztile_rows<4, 1, true>(rows, x + m * K, K, nullptr, 0, w + n * K, y + m * ldy + n, ldy);
      else
        ztile_rows<1, 1, true>(rows, x + m * K, K, nullptr, 0, w + n * K, y + m * ldy + n, ldy);
      m += rows;
    }
    n += nw;
  }
}
// ---- Attention units, 16-lane (AVX-512) ---------------------------------------------------------
// The same unit as tree_attention's (batch row, KV head, key range; all G * T query rows sharing
// every key read; online softmax in base 2 over fixed 32-key blocks by position; tree rows read
// their visible new tokens at positions L, L + 1, ... in vis order), computed without
// transposing keys: a score is a dot product over the head dim in 16-lane chunks (lane l sums
// q[16c + l] * k[16c + l] over the chunks c in order) and then a fixed pairwise tree over the 16
// lanes, so its bits depend on (q row, key) only, wherever the key sits in a block (row
// invariance for chains and trees). P @ V as tree_attention: acc = acc * alpha, then
// acc = fma(p[j], v[j], acc) over the block's keys in order. The 8-lane unit transposes every
// key block, which a 1-row call's 3 query rows per KV head do not amortise: interleaved A/B on the
// 2-core EPYC, SmolLM2 1-row calls 2 % (128-token context), 6 % (512) and 8 % (900) faster; with
// the chunk loops unrolled at compile time (queries and accumulators in registers), 2- and 4-row
// calls at 512 tokens 4 % and 8 % faster than the first version (medians of 8 alternating rounds).
constexpr int kZBK = 32;  // keys per online-softmax block (as tree_attention's kBK)
constexpr int kZRowsAtt = 4;  // query rows per register group in P @ V

static inline int64_t zatt_chunks(int64_t D) { return (D + 15) / 16; }
// lanes of the last 16-float chunk of a D-float row that hold values
static inline __mmask16 zatt_tail(int64_t D) {
  return D % 16 ? static_cast<__mmask16>((1u << (D % 16)) - 1) : static_cast<__mmask16>(0xffff);
}
// chunk c (of Dc) of a row: the last one masked to the row's D floats (zeros beyond)
static inline __m512 zatt_load(const float* row, int64_t c, int64_t Dc, __mmask16 tail) {
  return c + 1 < Dc ? _mm512_loadu_ps(row + 16 * c) : _mm512_maskz_loadu_ps(tail, row + 16 * c);
}
// floats of scratch for R query rows of head dim D
static inline int64_t zatt_work_floats(int64_t R, int64_t D) {
  return R * zatt_chunks(D) * 16 + kZRowsAtt * kZBK * 16 + R * kZBK + 32;
}

// lane j of the result = the sum of the 16 lanes of v[j] (v: 16 vectors of 16 floats), by halving
// the partial sums four times (partial l += partial l + half): one fixed tree for every vector.
static inline __m512 zreduce16(const float* v) {
  const __m512i a1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i a2 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i a3 = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
  const __m512i a4 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i b1 = _mm512_add_epi32(a1, _mm512_set1_epi32(8));
  const __m512i b2 = _mm512_add_epi32(a2, _mm512_set1_epi32(4));
  const __m512i b3 = _mm512_add_epi32(a3, _mm512_set1_epi32(2));
  const __m512i b4 = _mm512_add_epi32(a4, _mm512_set1_epi32(1));
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i) {
    const __m512 p = _mm512_loadu_ps(v + 32 * i), q = _mm512_loadu_ps(v + 32 * i + 16);
    w[i] = _mm512_add_ps(_mm512_permutex2var_ps(p, a1, q), _mm512_permutex2var_ps(p, b1, q));
  }
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_permutex2var_ps(w[2 * i], a2, w[2 * i + 1]),
                         _mm512_permutex2var_ps(w[2 * i], b2, w[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_permutex2var_ps(x[2 * i], a3, x[2 * i + 1]),
                         _mm512_permutex2var_ps(x[2 * i], b3, x[2 * i + 1]));
  return _mm512_add_ps(_mm512_permutex2var_ps(y[0], a4, y[1]), _mm512_permutex2var_ps(y[0], b4, y[1]));
}

// 2^x for x <= 0 (or NaN), tree_attention's vexp2 in 16 lanes: exactly 0 below -126.
static inline __m512 zexp2(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-126.f), magic = _mm512_set1_ps(12582912.f);
  const __mmask16 below = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  const __m512 xc = _mm512_mask_mov_ps(x, below, lo);
  const __m512 t = _mm512_add_ps(xc, magic);
  const __m512 f = _mm512_sub_ps(xc, _mm512_sub_ps(t, magic));
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i n = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B400000));
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~below), p, scale);
}

// The max of 16 non-NaN lanes, in a fixed order.
static inline float zhmax(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  float r = t[0];
  for (int i = 1; i < 16; ++i) r = t[i] > r ? t[i] : r;
  return r;
}

// Scores of rows [r0, r0 + NR) (Qf rows of Dc chunks) against the block's keys kp[j], j < n
// (key rows of D floats; nullptr: no key, score left unset): the 16-lane products of key j and
// row r land in P16[r - r0][j], then S[r][j] = zreduce16 of them. The head-dim chunks go 4 at a
// time (NC: a compile-time count, so the queries stay in registers and the loops unroll); a
// later group adds to the products the earlier ones left in P16, chunk by chunk in order.
template <int NR, int NC>
static inline void zscores_chunks(const float* Qf, int64_t Dc, int64_t c0, __mmask16 tail,
                                  const float* const* kp, int n, float* P16, int r0) {
  __m512 qr[NR][NC];
  for (int rr = 0; rr < NR; ++rr)
    for (int cc = 0; cc < NC; ++cc) qr[rr][cc] = _mm512_loadu_ps(Qf + (r0 + rr) * Dc * 16 + 16 * (c0 + cc));
  for (int j = 0; j < n; ++j) {
    if (kp[j] == nullptr) continue;
    __m512 p[NR];
    for (int cc = 0; cc < NC; ++cc) {
      const int64_t c = c0 + cc;
      const __m512 kk = zatt_load(kp[j], c, Dc, tail);
      for (int rr = 0; rr < NR; ++rr) {
        if (cc == 0)
          p[rr] = c0 == 0 ? _mm512_mul_ps(qr[rr][0], kk)
                          : _mm512_fmadd_ps(qr[rr][0], kk, _mm512_loadu_ps(P16 + (rr * kZBK + j) * 16));
        else
          p[rr] = _mm512_fmadd_ps(qr[rr][cc], kk, p[rr]);
      }
    }
    for (int rr = 0; rr < NR; ++rr) _mm512_storeu_ps(P16 + (rr * kZBK + j) * 16, p[rr]);
  }
}

template <int NR>
static inline void zscores(const float* Qf, int64_t Dc, int64_t D, const float* const* kp, int n,
                           float* P16, float* S, int r0) {
  const __mmask16 tail = zatt_tail(D);
  int64_t c0 = 0;
  for (; c0 + 4 <= Dc; c0 += 4) zscores_chunks<NR, 4>(Qf, Dc, c0, tail, kp, n, P16, r0);
  switch (Dc - c0) {
    case 1: zscores_chunks<NR, 1>(Qf, Dc, c0, tail, kp, n, P16, r0); break;
    case 2: zscores_chunks<NR, 2>(Qf, Dc, c0, tail, kp, n, P16, r0); break;
    case 3: zscores_chunks<NR, 3>(Qf, Dc, c0, tail, kp, n, P16, r0); break;
    default: break;
  }
  for (int rr = 0; rr < NR; ++rr) {
    float* s = S + (r0 + rr) * kZBK;
    _mm512_storeu_ps(s, zreduce16(P16 + rr * kZBK * 16));
    if (n > 16) _mm512_storeu_ps(s + 16, zreduce16(P16 + (rr * kZBK + 16) * 16));
  }
}

// Row r's scores s[kZBK] (lanes with `valid` clear: weight 0) -> probabilities in place, (m, l)
// updated; returns alpha for the old accumulator (1 when the row sees nothing so far). The
// non-finite rules of tree_attention's softmax_update (a NaN score makes m, p and l NaN).
static inline float zsoftmax(float* s, uint32_t valid, float& m, float& l) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const __m512 v0 = _mm512_mask_mov_ps(ninf, static_cast<__mmask16>(valid), _mm512_loadu_ps(s));
  const __m512 v1 = _mm512_mask_mov_ps(ninf, static_cast<__mmask16>(valid >> 16), _mm512_loadu_ps(s + 16));
  __m512 mx = ninf;
  mx = _mm512_mask_mov_ps(mx, _mm512_cmp_ps_mask(v0, mx, _CMP_GT_OQ), v0);
  mx = _mm512_mask_mov_ps(mx, _mm512_cmp_ps_mask(v1, mx, _CMP_GT_OQ), v1);
  float m_new = std::max(m, zhmax(mx));
  if (m_new == -INFINITY) {
    const bool nan = _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) || _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
    if (!nan) {
      _mm512_storeu_ps(s, _mm512_setzero_ps());
      _mm512_storeu_ps(s + 16, _mm512_setzero_ps());
      return 1.f;
    }
    m_new = NAN;
  }
  const float alpha = std::exp2(m - m_new);  // 0 when m = -inf
  const __m512 mb = _mm512_set1_ps(m_new);
  const __m512 p0 = zexp2(_mm512_sub_ps(v0, mb)), p1 = zexp2(_mm512_sub_ps(v1, mb));
  _mm512_storeu_ps(s, p0);
  _mm512_storeu_ps(s + 16, p1);
  l = l * alpha + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
  m = m_new;
  return alpha;
}

// acc_r = acc_r * alpha_r + sum_{j < n} p_r[j] * v_j for rows [r0, r0 + NR), head-dim chunks
// [c0, c0 + NC) held in registers (acc rows of stride Dp; the last chunk masked to D).
template <int NR, int NC>
static inline void zpv_chunks(float* acc, int64_t Dp, int64_t Dc, int64_t c0, __mmask16 tail,
                              const float* alpha, const float* S, const float* const* vp, int n, int r0) {
  __m512 x[NR][NC];
  for (int rr = 0; rr < NR; ++rr) {
    const __m512 al = _mm512_set1_ps(alpha[rr]);
    for (int cc = 0; cc < NC; ++cc) {
      const int64_t c = c0 + cc;
      x[rr][cc] = _mm512_mul_ps(zatt_load(acc + (r0 + rr) * Dp, c, Dc, tail), al);
    }
  }
  for (int j = 0; j < n; ++j)
    for (int cc = 0; cc < NC; ++cc) {
      const int64_t c = c0 + cc;
      const __m512 vv = zatt_load(vp[j], c, Dc, tail);
      for (int rr = 0; rr < NR; ++rr)
        x[rr][cc] = _mm512_fmadd_ps(_mm512_set1_ps(S[(r0 + rr) * kZBK + j]), vv, x[rr][cc]);
    }
  for (int rr = 0; rr < NR; ++rr)
    for (int cc = 0; cc < NC; ++cc) {
      const int64_t c = c0 + cc;
      float* dst = acc + (r0 + rr) * Dp + 16 * c;
      if (c + 1 < Dc)
        _mm512_storeu_ps(dst, x[rr][cc]);
      else
        _mm512_mask_storeu_ps(dst, tail, x[rr][cc]);
    }
}

template <int NR>
static inline void zpv(float* acc, int64_t Dp, int64_t D, const float* alpha, const float* S,
                       const float* const* vp, int n, int r0) {
  const int64_t Dc = zatt_chunks(D);
  const __mmask16 tail = zatt_tail(D);
  int64_t c0 = 0;
  for (; c0 + 4 <= Dc; c0 += 4) zpv_chunks<NR, 4>(acc, Dp, Dc, c0, tail, alpha, S, vp, n, r0);
  switch (Dc - c0) {
    case 1: zpv_chunks<NR, 1>(acc, Dp, Dc, c0, tail, alpha, S, vp, n, r0); break;
    case 2: zpv_chunks<NR, 2>(acc, Dp, Dc, c0, tail, alpha, S, vp, n, r0); break;
    case 3: zpv_chunks<NR, 3>(acc, Dp, Dc, c0, tail, alpha, S, vp, n, r0); break;
    default: break;
  }
}

// Rows [r0, r1) of one block: scores against kp, row r's visible keys the bits of
// valid[(r - r0) * vstride], softmax, P @ V with vp.
static inline void zblock_rows(const UnitArgs& a, const float* Qf, int64_t Dc, float* P16, float* S,
                               const float* const* kp, const float* const* vp, int n,
                               const uint32_t* valid, int vstride, int r0, int r1) {
  const int64_t D = a.D;
  for (int r = r0; r < r1;) {
    const int nr = std::min(kZRowsAtt, r1 - r);
    switch (nr) {
      case 1: zscores<1>(Qf, Dc, D, kp, n, P16, S, r); break;
      case 2: zscores<2>(Qf, Dc, D, kp, n, P16, S, r); break;
      case 3: zscores<3>(Qf, Dc, D, kp, n, P16, S, r); break;
      default: zscores<4>(Qf, Dc, D, kp, n, P16, S, r); break;
    }
    float alpha[kZRowsAtt];
    for (int rr = 0; rr < nr; ++rr)
      alpha[rr] = zsoftmax(S + (r + rr) * kZBK, valid[(r + rr - r0) * vstride], a.m[r + rr], a.l[r + rr]);
    switch (nr) {
      case 1: zpv<1>(a.acc, a.Dp, D, alpha, S, vp, n, r); break;
      case 2: zpv<2>(a.acc, a.Dp, D, alpha, S, vp, n, r); break;
      case 3: zpv<3>(a.acc, a.Dp, D, alpha, S, vp, n, r); break;
      default: zpv<4>(a.acc, a.Dp, D, alpha, S, vp, n, r); break;
    }
    r += nr;
  }
}

// One unit (tree_attention's attend_unit, float32 caches): q rows of token t at q + t *
// q_stride_t, query head g of the KV head at + g * D; k / v the head's cache rows [S, D].
static inline void zattend_unit(const float* q, const float* k, const float* v, const UnitArgs& a) {
  const int T = a.T, G = a.G, R = T * G;
  const int64_t D = a.D, Dc = zatt_chunks(D), L = a.L;
  float* Qf = a.work;                  // [R, Dc * 16] scaled queries, zero-padded
  float* P16 = Qf + R * Dc * 16;       // [kZRowsAtt, kZBK, 16] lane products
  float* S = P16 + kZRowsAtt * kZBK * 16;  // [R, kZBK] scores / probabilities
  for (int r = 0; r < R; ++r) {
    const float* src = q + (r / G) * a.q_stride_t + static_cast<int64_t>(r % G) * D;
    float* dst = Qf + r * Dc * 16;
    for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * a.scale2;
    for (int64_t d = D; d < Dc * 16; ++d) dst[d] = 0.f;
  }
  for (int r = 0; r < R; ++r) {
    std::fill(a.acc + r * a.Dp, a.acc + (r + 1) * a.Dp, 0.f);
    a.m[r] = -INFINITY;
    a.l[r] = 0.f;
  }
  const float* kp[kZBK];
  const float* vp[kZBK];
  uint32_t valid[64];  // visible keys of up to 64 rows
  for (int64_t kb = a.kbeg; kb < a.kend; kb += kZBK) {
    const int n = static_cast<int>(std::min<int64_t>(kZBK, a.kend - kb));
    constexpr int kPrefetchBlocks = 2;  // keys and values this many blocks ahead
    if (kb + kPrefetchBlocks * kZBK < a.kend) {
      const int64_t kq = kb + kPrefetchBlocks * kZBK;
      const int64_t bytes = std::min<int64_t>(kZBK, a.kend - kq) * D * 4;
      const char* k2 = reinterpret_cast<const char*>(k + kq * D);
      const char* v2 = reinterpret_cast<const char*>(v + kq * D);
      for (int64_t off = 0; off < bytes; off += 64) {
        _mm_prefetch(k2 + off, _MM_HINT_T0);
        _mm_prefetch(v2 + off, _MM_HINT_T0);
      }
    }
    const uint32_t all = n == 32 ? 0xffffffffu : ((1u << n) - 1);
    if (a.vis && kb + n > L) {
      // tree mask: each token's rows read their own keys (visible new tokens in vis order, then
      // the invisible ones' values with weight 0)
      for (int t = 0; t < T; ++t) {
        const int32_t* idx = a.vis + static_cast<int64_t>(t) * T;
        const int64_t cnt = a.vis_cnt[t];
        uint32_t ok = 0;
        for (int j = 0; j < n; ++j) {
          const int64_t vpos = kb + j;
          const int64_t src = vpos < L ? vpos : L + idx[vpos - L];
          const bool vis = vpos < L || vpos - L < cnt;
          kp[j] = vis ? k + src * D : nullptr;
          vp[j] = v + src * D;
          if (vis) ok |= 1u << j;
        }
        zblock_rows(a, Qf, Dc, P16, S, kp, vp, n, &ok, 0, t * G, (t + 1) * G);
      }
      continue;
    }
    for (int j = 0; j < n; ++j) {
      kp[j] = k + (kb + j) * D;
      vp[j] = v + (kb + j) * D;
    }
    // causal among the new tokens: row t sees new token jj <= t (or the tree mask's row t, when
    // the block does not reach the new tokens: all of it)
    for (int r0 = 0; r0 < R; r0 += 64) {
      const int r1 = std::min(R, r0 + 64);
      for (int r = r0; r < r1; ++r) {
        uint32_t ok = all;
        const int t = r / G;
        for (int j = static_cast<int>(std::max<int64_t>(0, L - kb)); j < n; ++j)
          if (kb + j - L > t) ok &= ~(1u << j);
        valid[r - r0] = ok;
      }
      zblock_rows(a, Qf, Dc, P16, S, kp, vp, n, valid, 1, r0, r1);
    }
  }
}

#endif

// `rows` rows of q4_1 split (format 3, row stride row_bytes) -> their float32 weights d * q + m
// (one rounding: d * q is exact), rows of K floats in out.
static inline void q41_split_dequant(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K,
                                     float* out) {
  const int64_t nb = K / 32;
  for (int64_t j = 0; j < rows; ++j) {
    const uint8_t* row = w + j * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      float dm[2];
      std::memcpy(dm, row + 8 * b, 8);
      const uint8_t* qs = row + 8 * nb + 16 * b;
      float* o = out + j * K + 32 * b;
      for (int i = 0; i < 16; ++i) {
        o[i] = dm[0] * static_cast<float>(qs[i] & 15) + dm[1];  // fused or not: the same
        o[i + 16] = dm[0] * static_cast<float>(qs[i] >> 4) + dm[1];
      }
    }
  }
}

// y[m, n] (+ bias[n]) for the call's N rows of x and features [n0, n1) of one linear.
// `nta`: the decoding call's layers, whose weights in a 1-row call stream past L2 and L3 (see
// zrows_block); the LM head keeps the default.
static inline void linear_part(const LinearW& w, const float* x, int64_t N, float* y, int64_t ldy,
                               int64_t n0, int64_t n1, float* buf, bool nta = false) {
  if (n0 >= n1 || N == 0) return;
  const int64_t K = w.K;
#ifdef PTP_DS_ZMM
  if (w.format == 1) {
    zrows_block<1>(x, N, K, static_cast<const uint8_t*>(w.w), w.row_bytes, n0, n1, y, ldy, buf, nta);
  } else if (w.format == 3) {
    zrows_block<3>(x, N, K, static_cast<const uint8_t*>(w.w), w.row_bytes, n0, n1, y, ldy, buf, nta);
  } else if (w.format == 2) {
    zrows_block<2>(x, N, K, static_cast<const uint8_t*>(w.w), w.row_bytes, n0, n1, y, ldy, buf, nta);
  } else if (K % 32 == 0) {
    zrows_block_f32(x, N, K, static_cast<const float*>(w.w), n0, n1, y, ldy);
  } else
#endif
  if (w.format == 1) {
    il::qrows_block<true>(x, N, K, static_cast<const uint8_t*>(w.w), w.row_bytes, n0, n1, y, ldy, buf);
  } else if (w.format == 3) {  // 4 rows at a time to float32 (what qrows_block does for q4_1)
    for (int64_t n = n0; n < n1; n += 4) {
      const int64_t rows = std::min<int64_t>(4, n1 - n);
      q41_split_dequant(static_cast<const uint8_t*>(w.w) + n * w.row_bytes, w.row_bytes, rows, K, buf);
      il::rows_block(x, N, K, buf, 0, rows, y + n, ldy);
    }
  } else if (w.format == 2) {
    il::qrows_block<false>(x, N, K, static_cast<const uint8_t*>(w.w), w.row_bytes, n0, n1, y, ldy, buf);
  } else {
    const float* wf = static_cast<const float*>(w.w);
    il::rows_block(x, N, K, wf + n0 * K, n0, n1, y, ldy, wf + n1 * K);
  }
  if (w.bias)
    for (int64_t m = 0; m < N; ++m)
      for (int64_t n = n0; n < n1; ++n) y[m * ldy + n] += w.bias[n];
}

// linear_part plus the gated-LoRA delta scale * (x A^T) B^T on rows t >= aux_start of every batch
// row (the aux rows: a suffix of each row's T tokens). x A^T ([naux, R], small) is computed by
// every thread for all aux rows; the delta only for the thread's features.
static inline void linear_lora(const LinearW& w, const float* x, int64_t B, int64_t T,
                               int64_t aux_start, float* y, int64_t ldy, int64_t n0, int64_t n1,
                               float* buf, float* lora_t, float* lora_d) {
  linear_part(w, x, B * T, y, ldy, n0, n1, buf, /*nta=*/true);
  const int64_t naux = T - aux_start;
  if (w.lora_a == nullptr || naux <= 0 || n0 >= n1) return;
  const int64_t K = w.K, R = w.rank, M = w.M;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r0 = b * T + aux_start;
    il::rows_block(x + r0 * K, naux, K, w.lora_a, 0, R, lora_t, R);
    il::rows_block(lora_t, naux, R, w.lora_b + n0 * R, n0, n1, lora_d, M);
    for (int64_t i = 0; i < naux; ++i)
      for (int64_t n = n0; n < n1; ++n) y[(r0 + i) * ldy + n] += w.lora_scale * lora_d[i * M + n];
  }
}

// out = weight * (x * rsqrt(mean(x^2) + eps)) over one row of H (HF's Llama RMSNorm, float32).
static inline void rms_norm(const float* x, const float* weight, int64_t H, float eps, float* out) {
  vf acc = vf{};
  const int64_t H8 = H / kW * kW;
  for (int64_t i = 0; i < H8; i += kW) {
    const vf v = vload(x + i);
    acc = vfma(v, v, acc);
  }
  float ss = vhsum(acc);
  for (int64_t i = H8; i < H; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < H; ++i) out[i] = weight[i] * (x[i] * r);
}

// Rotary in place on one head of D values: x * cos + rotate_half(x) * sin (HF's
// apply_rotary_pos_emb; rotate_half(x) = [-x2, x1]).
static inline void rotary(float* x, const float* c, const float* s, int64_t D, float* tmp) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < D; ++d) tmp[d] = x[d];
  for (int64_t d = 0; d < h; ++d) {
    const float a = tmp[d] * c[d], b = -tmp[d + h] * s[d];
    x[d] = a + b;
  }
  for (int64_t d = h; d < D; ++d) {
    const float a = tmp[d] * c[d], b = tmp[d - h] * s[d];
    x[d] = a + b;
  }
}

static inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// One linear over all N rows of x in the step's arithmetic (decode_linear: the decoding call's LM
// head), features split over the team in multiples of 4 as the step's projections.
static void run_linear(const LinearW& w, const float* x, int64_t N, float* y, int num_threads) {
  std::vector<float> buf(static_cast<size_t>(4 * w.K * num_threads));
#pragma omp parallel num_threads(num_threads)
  {
    const int P = team_size(), tid = team_rank();
    int64_t n0, n1;
    share(w.M, tid, P, n0, n1);
    linear_part(w, x, N, y, w.M, n0, n1, buf.data() + 4 * w.K * tid);
  }
}

static void run_step(const StepArgs& a) {
  const int64_t B = a.B, T = a.T, H = a.H, Hq = a.Hq, Hkv = a.Hkv, D = a.D, I = a.I, S = a.S;
  const int64_t N = B * T, G = Hq / Hkv, R = T * G;
  const int64_t Wq = Hq * D, Wkv = Hkv * D, Wqkv = Wq + 2 * Wkv;
  const int64_t Dp = (D + ta::kW - 1) / ta::kW * ta::kW;
  const int P0 = a.num_threads;

  // Attention units: fixed 64-key chunks (row invariance: a key's chunk depends on its position
  // only). Finer than tree_attention's 512: SmolLM2 has 3 KV heads, so a short context made 3
  // units for 2 threads (one waited at the barrier); 64-key chunks balance them (plain decoding
  // of short prompts +10 % on 2 threads; the chunks' merge is a few hundred flops each).
  constexpr int64_t chunk = 64;
  static_assert(chunk % ta::kBK == 0, "chunks hold whole key blocks");
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; ++b) max_keys = std::max(max_keys, a.lens[b] + T);
  const int64_t nsplit = std::max<int64_t>(1, (max_keys + chunk - 1) / chunk);
  const int64_t units = B * Hkv * nsplit;
  std::vector<int32_t> vis, vis_cnt;
  if (a.mask) {
    vis.assign(static_cast<size_t>(B * T * T), 0);
    vis_cnt.assign(static_cast<size_t>(B * T), 0);
    for (int64_t bt = 0; bt < B * T; ++bt) {
      int32_t c = 0;
      for (int64_t j = 0; j < T; ++j)
        if (a.mask[bt * T + j]) vis[bt * T + c++] = static_cast<int32_t>(j);
      vis_cnt[bt] = c;
    }
  }

  // Shared buffers, and per-thread ones (index tid).
  const int64_t maxK = std::max(H, std::max(I, Wq));
  const int64_t maxM = std::max(Wqkv, std::max(I, H));
  int64_t max_rank = 0;
  for (int64_t l = 0; l < a.num_layers; ++l)
    for (int j = 0; j < 7; ++j) max_rank = std::max(max_rank, a.layers[l].lin[j].rank);
  const int64_t naux = T - a.aux_start;
#ifdef PTP_DS_ZMM
  const int64_t work = zatt_work_floats(R, D);
#else
  const int64_t work = ta::work_floats(static_cast<int>(R), static_cast<int>(D), static_cast<int>(Dp));
#endif
  const int64_t per_thread = N * H + 4 * maxK + naux * max_rank + naux * maxM + D + work + Dp;
  std::vector<float> shared_buf(static_cast<size_t>(N * Wqkv + N * Wq + N * H + 2 * N * I +
                                                    units * R * Dp + 2 * units * R));
  std::vector<float> thread_buf(static_cast<size_t>(per_thread * P0));
  float* qkv = shared_buf.data();       // [N, Wqkv]: q | k | v per row
  float* att = qkv + N * Wqkv;          // [N, Wq]
  float* tmp = att + N * Wq;            // [N, H]: o_proj / down outputs
  float* gate = tmp + N * H;            // [N, I] (then SiLU(gate) * up)
  float* up = gate + N * I;             // [N, I]
  float* part_acc = up + N * I;         // [units, R, Dp]
  float* part_m = part_acc + units * R * Dp;
  float* part_l = part_m + units * R;
  const float scale2 = static_cast<float>(a.scale * M_LOG2E);

#pragma omp parallel num_threads(P0)
  {
    const int P = team_size(), tid = team_rank();
    float* xn = thread_buf.data() + per_thread * tid;  // [N, H] normed rows
    float* lbuf = xn + N * H;                          // 4 * maxK: a dequantised weight tile
    float* lora_t = lbuf + 4 * maxK;                   // [naux, R]
    float* lora_d = lora_t + naux * max_rank;          // [naux, M]
    float* rtmp = lora_d + naux * maxM;                // [D]
    float* wbuf = rtmp + D;                            // attention scratch
    float* obuf = wbuf + work;                         // [Dp]
    float* h = a.h;
    int64_t n0, n1;
    for (int64_t l = 0; l < a.num_layers; ++l) {
      const LayerW& Lw = a.layers[l];
      // 1. norm (every thread, all rows) + q / k / v features of this thread
      for (int64_t m = 0; m < N; ++m) rms_norm(h + m * H, Lw.ln1, H, a.eps, xn + m * H);
      share(Wq, tid, P, n0, n1);
      linear_lora(Lw.lin[0], xn, B, T, a.aux_start, qkv, Wqkv, n0, n1, lbuf, lora_t, lora_d);
      share(Wkv, tid, P, n0, n1);
      linear_lora(Lw.lin[1], xn, B, T, a.aux_start, qkv + Wq, Wqkv, n0, n1, lbuf, lora_t, lora_d);
      linear_lora(Lw.lin[2], xn, B, T, a.aux_start, qkv + Wq + Wkv, Wqkv, n0, n1, lbuf, lora_t, lora_d);
#pragma omp barrier
      // 2. rotary on q and k, K / V written to the cache at cache_lens[b] + t
      share(N * (Hq + Hkv), tid, P, n0, n1);
      for (int64_t it = n0; it < n1; ++it) {
        const int64_t m = it / (Hq + Hkv), hd = it % (Hq + Hkv), b = m / T, t = m % T;
        float* row = qkv + m * Wqkv;
        rotary(row + hd * D, a.cos + m * D, a.sin + m * D, D, rtmp);
        if (hd >= Hq) {
          const int64_t hk = hd - Hq, pos = a.lens[b] + t;
          float* kd = Lw.key_cache + ((b * Hkv + hk) * S + pos) * D;
          float* vd = Lw.value_cache + ((b * Hkv + hk) * S + pos) * D;
          std::copy(row + hd * D, row + hd * D + D, kd);
          std::copy(row + Wq + Wkv + hk * D, row + Wq + Wkv + hk * D + D, vd);
        }
      }
#pragma omp barrier
      // 3. attention units. Each starts by requesting the keys and values of the thread's next
      // unit (one 64-key chunk: 16 KB each for a 64-dim head), so that only a thread's first unit
      // of a layer waits on DRAM (KV rows are evicted by every call's weight stream; interleaved
      // A/B, SmolLM2 at an 800-token context: 8.44 -> 8.12 ms a call). A thread takes one
      // contiguous range of units (which thread computes a unit never changes its values): its
      // chunks of a head are adjacent in the cache, one long stream per head for the hardware
      // prefetchers instead of every P-th 16 KB piece (SmolLM2 1-row calls, interleaved A/B on
      // the 2-core EPYC: +2 % at 384 keys, +5 % at 1,024; whole generations +1 % plain, +3.5 %
      // with `auto`).
      // unit u: batch row b, KV head hk, keys [kbeg, kend) (a 64-key chunk of the L + T keys)
      struct Unit { int64_t b, hk, kbeg, kend; };
      const auto unit = [&](int64_t u) {
        const int64_t bh = u / nsplit, sp = u % nsplit, b = bh / Hkv, keys = a.lens[b] + T;
        return Unit{b, bh % Hkv, std::min(keys, sp * chunk), std::min(keys, (sp + 1) * chunk)};
      };
      const int64_t u_end = units * (tid + 1) / P;
      for (int64_t u = units * tid / P; u < u_end; ++u) {
        if (u + 1 < u_end) {
          const Unit nx = unit(u + 1);
          const int64_t off = ((nx.b * Hkv + nx.hk) * S + nx.kbeg) * D;
          const char* kp = reinterpret_cast<const char*>(Lw.key_cache + off);
          const char* vp = reinterpret_cast<const char*>(Lw.value_cache + off);
          for (int64_t byte = 0; byte < (nx.kend - nx.kbeg) * D * 4; byte += 64) {
            __builtin_prefetch(kp + byte, 0, 3);
            __builtin_prefetch(vp + byte, 0, 3);
          }
        }
        const Unit un = unit(u);
        const int64_t b = un.b, hk = un.hk;
        UnitArgs ua;
        ua.L = a.lens[b];
        ua.T = static_cast<int>(T);
        ua.G = static_cast<int>(G);
        ua.D = static_cast<int>(D);
        ua.Dp = static_cast<int>(Dp);
        ua.kbeg = un.kbeg;
        ua.kend = un.kend;
        ua.q_stride_t = Wqkv;
        ua.mask = a.mask ? a.mask + b * T * T : nullptr;
        ua.vis = a.mask ? vis.data() + b * T * T : nullptr;
        ua.vis_cnt = a.mask ? vis_cnt.data() + b * T : nullptr;
        ua.scale2 = scale2;
        ua.acc = part_acc + u * R * Dp;
        ua.m = part_m + u * R;
        ua.l = part_l + u * R;
        ua.work = wbuf;
        const float* q = qkv + b * T * Wqkv + hk * G * D;
        const float* kc = Lw.key_cache + (b * Hkv + hk) * S * D;
        const float* vc = Lw.value_cache + (b * Hkv + hk) * S * D;
#ifdef PTP_DS_ZMM
        zattend_unit(q, kc, vc, ua);
#else
        ta::attend_unit<float>(q, kc, vc, ua);
#endif
      }
#pragma omp barrier
      // 4. merge the chunks (log-sum-exp) into att [N, H_q * D]
      for (int64_t bh = tid; bh < B * Hkv; bh += P) {
        const int64_t b = bh / Hkv, hk = bh % Hkv;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t t = r / G, hq = hk * G + r % G;
          float M = -INFINITY;
          for (int64_t sp = 0; sp < nsplit; ++sp) M = std::max(M, part_m[(bh * nsplit + sp) * R + r]);
          float* dst = att + (b * T + t) * Wq + hq * D;
          if (M == -INFINITY) {
            std::fill(dst, dst + D, 0.f);
            continue;
          }
          std::fill(obuf, obuf + Dp, 0.f);
          float lsum = 0.f;
          for (int64_t sp = 0; sp < nsplit; ++sp) {
            const int64_t u = bh * nsplit + sp;
            const float mu = part_m[u * R + r];
            if (mu == -INFINITY) continue;
            const float wgt = std::exp2(mu - M);
            lsum += wgt * part_l[u * R + r];
            const float* acc = part_acc + (u * R + r) * Dp;
            for (int64_t d = 0; d < D; ++d) obuf[d] += wgt * acc[d];
          }
          const float inv = 1.f / lsum;
          for (int64_t d = 0; d < D; ++d) dst[d] = obuf[d] * inv;
        }
      }
#pragma omp barrier
      // 5. o_proj + residual on this thread's features
      share(H, tid, P, n0, n1);
      linear_lora(Lw.lin[3], att, B, T, a.aux_start, tmp, H, n0, n1, lbuf, lora_t, lora_d);
      for (int64_t m = 0; m < N; ++m)
        for (int64_t n = n0; n < n1; ++n) h[m * H + n] = h[m * H + n] + tmp[m * H + n];
#pragma omp barrier
      // MLP: norm (all rows), gate / up features, SiLU(gate) * up
      for (int64_t m = 0; m < N; ++m) rms_norm(h + m * H, Lw.ln2, H, a.eps, xn + m * H);
      share(I, tid, P, n0, n1);
      linear_lora(Lw.lin[4], xn, B, T, a.aux_start, gate, I, n0, n1, lbuf, lora_t, lora_d);
      linear_lora(Lw.lin[5], xn, B, T, a.aux_start, up, I, n0, n1, lbuf, lora_t, lora_d);
      for (int64_t m = 0; m < N; ++m)
        for (int64_t n = n0; n < n1; ++n) gate[m * I + n] = silu(gate[m * I + n]) * up[m * I + n];
#pragma omp barrier
      share(H, tid, P, n0, n1);
      linear_lora(Lw.lin[6], gate, B, T, a.aux_start, tmp, H, n0, n1, lbuf, lora_t, lora_d);
      for (int64_t m = 0; m < N; ++m)
        for (int64_t n = n0; n < n1; ++n) h[m * H + n] = h[m * H + n] + tmp[m * H + n];
#pragma omp barrier
    }
    share(N, tid, P, n0, n1);
    for (int64_t m = n0; m < n1; ++m) rms_norm(h + m * H, a.final_norm, H, a.eps, a.out + m * H);
  }
}
