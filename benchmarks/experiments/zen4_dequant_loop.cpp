// Standalone timing of decode_step's 1-row register tile (1 x-row against 4 weight rows) over an
// L2-resident 1536 x 576 matrix, with variants of the per-block dequantisation: what bounds a
// 1-row GGUF matvec on a given core (benchmarks/results/2026-12-07-cpu-decode-step.md).
// Build and run on an AVX-512 x86 CPU:
//   g++ -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c \
//       -o /tmp/dequant_loop benchmarks/experiments/zen4_dequant_loop.cpp && /tmp/dequant_loop [GHz]
// Prints ns per 32-weight block and row, and cycles at the given clock (default 3.66, the
// 2-core EPYC dev VM's, measured). The "probe" variants compute wrong values on purpose: they
// drop one or both table lookups to time what remains.
#include <immintrin.h>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>
#include <chrono>
#include <random>
#include <cstdlib>
#include <algorithm>
constexpr int M = 1536, K = 576, NB = K / 32;
static inline uint64_t now() { return std::chrono::steady_clock::now().time_since_epoch().count(); }

template <int V>
static inline void w41(const uint8_t* row, int b, __m512& lo, __m512& hi) {
  const __m512 iota = _mm512_setr_ps(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15);
  const float* dm = reinterpret_cast<const float*>(row) + 2 * b;
  const uint8_t* qs = row + 8 * NB + 16 * b;
  if constexpr (V == 0) {  // current main: vpmovzxbd + 2 vpermps
    __m512 table = _mm512_fmadd_ps(_mm512_set1_ps(dm[0]), iota, _mm512_set1_ps(dm[1]));
    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs));
    lo = _mm512_permutexvar_ps(idx, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table);
  } else if constexpr (V == 1) {  // bcast + srlv
    __m512 table = _mm512_fmadd_ps(_mm512_set1_ps(dm[0]), iota, _mm512_set1_ps(dm[1]));
    const __m512i sh = _mm512_setr_epi32(0,0,0,0,4,4,4,4,8,8,8,8,12,12,12,12);
    __m512i idx = _mm512_srlv_epi32(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)qs)), sh);
    lo = _mm512_permutexvar_ps(idx, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 16), table);
  } else if constexpr (V == 2) {  // no table: cvt + fma (both halves)
    __m512 d = _mm512_set1_ps(dm[0]), m = _mm512_set1_ps(dm[1]);
    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs));
    const __m512i f = _mm512_set1_epi32(15);
    lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(idx, f)), m);
    hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_srli_epi32(idx, 4)), m);
  } else if constexpr (V == 3) {  // mixed: lo via table, hi via cvt+fma
    __m512 d = _mm512_set1_ps(dm[0]), m = _mm512_set1_ps(dm[1]);
    __m512 table = _mm512_fmadd_ps(d, iota, m);
    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs));
    lo = _mm512_permutexvar_ps(idx, table);
    hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_srli_epi32(idx, 4)), m);
  } else if constexpr (V == 4) {  // timing probe: one vpermps only (wrong values)
    __m512 table = _mm512_fmadd_ps(_mm512_set1_ps(dm[0]), iota, _mm512_set1_ps(dm[1]));
    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs));
    lo = _mm512_permutexvar_ps(idx, table);
    hi = lo;
  } else if constexpr (V == 5) {  // timing probe: no dequant at all (table only)
    __m512 table = _mm512_fmadd_ps(_mm512_set1_ps(dm[0]), iota, _mm512_set1_ps(dm[1]));
    lo = table; hi = _mm512_castsi512_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs)));
  } else if constexpr (V == 6) {  // bcast + srlv, mixed: lo table, hi cvt+fma with and
    __m512 d = _mm512_set1_ps(dm[0]), m = _mm512_set1_ps(dm[1]);
    __m512 table = _mm512_fmadd_ps(d, iota, m);
    const __m512i sh = _mm512_setr_epi32(0,0,0,0,4,4,4,4,8,8,8,8,12,12,12,12);
    __m512i idx = _mm512_srlv_epi32(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)qs)), sh);
    lo = _mm512_permutexvar_ps(idx, table);
    hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(idx, 16), _mm512_set1_epi32(15))), m);
  }
}
template <int V>
static inline void w80(const uint8_t* row, int b, __m512& lo, __m512& hi) {
  if constexpr (V == 0) {  // GGUF q8_0: fp16 d in block
    const uint8_t* blk = row + 34 * b; uint16_t db; memcpy(&db, blk, 2);
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(db));
    const __m128i* q = (const __m128i*)(blk + 2);
    lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))));
    hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))));
  } else if constexpr (V == 1) {  // split: float d array then 32 B per block
    const float* dd = (const float*)row; const __m512 d = _mm512_set1_ps(dd[b]);
    const __m128i* q = (const __m128i*)(row + 4 * NB + 32 * b);
    lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))));
    hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))));
  } else if constexpr (V == 2) {  // split + shift sign-extension from broadcasts
    const float* dd = (const float*)row; const __m512 d = _mm512_set1_ps(dd[b]);
    const __m128i* q = (const __m128i*)(row + 4 * NB + 32 * b);
    const __m512i sh = _mm512_setr_epi32(24,24,24,24,16,16,16,16,8,8,8,8,0,0,0,0);
    __m512i a = _mm512_srai_epi32(_mm512_sllv_epi32(_mm512_broadcast_i32x4(_mm_loadu_si128(q)), sh), 24);
    __m512i c = _mm512_srai_epi32(_mm512_sllv_epi32(_mm512_broadcast_i32x4(_mm_loadu_si128(q + 1)), sh), 24);
    lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(a));
    hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(c));
  } else if constexpr (V == 3) {  // split, 32B broadcast once (ymm->zmm), sllv per half
    const float* dd = (const float*)row; const __m512 d = _mm512_set1_ps(dd[b]);
    const __m512i all = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(row + 4 * NB + 32 * b)));
    const __m512i s1 = _mm512_setr_epi32(24,24,24,24,24,24,24,24,16,16,16,16,16,16,16,16);
    const __m512i s2 = _mm512_setr_epi32(8,8,8,8,8,8,8,8,0,0,0,0,0,0,0,0);
    lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_sllv_epi32(all, s1), 24)));
    hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_sllv_epi32(all, s2), 24)));
  }
}
template <int FMT, int V>
__attribute__((noinline)) void tile(const float* x, const uint8_t* w, int64_t rb, float* out, int M_) {
  for (int n = 0; n < M_; n += 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int b = 0; b < NB; ++b) {
      const __m512 xl = _mm512_loadu_ps(x + 32 * b), xh = _mm512_loadu_ps(x + 32 * b + 16);
      for (int j = 0; j < 4; ++j) {
        __m512 lo, hi;
        if constexpr (FMT == 1) w41<V>(w + (n + j) * rb, b, lo, hi); else w80<V>(w + (n + j) * rb, b, lo, hi);
        acc[j] = _mm512_fmadd_ps(xl, lo, acc[j]);
        acc[j] = _mm512_fmadd_ps(xh, hi, acc[j]);
      }
    }
    for (int j = 0; j < 4; ++j) out[n + j] = _mm512_reduce_add_ps(acc[j]);
  }
}
// Q4_1 by algebra: d * sum(x q) + m * sum(x) per block (sx: the block sums of x, once per call).
// Not bitwise the loaded weights' dot products (another rounding): timing only.
__attribute__((noinline)) void tile_alg(const float* x, const float* sx, const uint8_t* w, int64_t rb,
                                        float* out, int M_) {
  for (int n = 0; n < M_; n += 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    float macc[4] = {0, 0, 0, 0};
    for (int b = 0; b < NB; ++b) {
      const __m512 xl = _mm512_loadu_ps(x + 32 * b), xh = _mm512_loadu_ps(x + 32 * b + 16);
      for (int j = 0; j < 4; ++j) {
        const uint8_t* row = w + (n + j) * rb;
        const float* dm = reinterpret_cast<const float*>(row) + 2 * b;
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + 8 * NB + 16 * b)));
        const __m512 ql = _mm512_cvtepi32_ps(_mm512_and_si512(idx, _mm512_set1_epi32(15)));
        const __m512 qh = _mm512_cvtepi32_ps(_mm512_srli_epi32(idx, 4));
        const __m512 bs = _mm512_fmadd_ps(xh, qh, _mm512_mul_ps(xl, ql));
        acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(dm[0]), bs, acc[j]);
        macc[j] = __builtin_fmaf(dm[1], sx[b], macc[j]);
      }
    }
    for (int j = 0; j < 4; ++j) out[n + j] = _mm512_reduce_add_ps(acc[j]) + macc[j];
  }
}
template <int FMT, int V>
void run(const char* name, const uint8_t* w, int64_t rb, const float* x, float* out, double ghz) {
  double best = 1e30;
  for (int r = 0; r < 30; ++r) {
    uint64_t t0 = now(); for (int i = 0; i < 20; ++i) tile<FMT, V>(x, w, rb, out, M); uint64_t t1 = now();
    best = std::min(best, (t1 - t0) / 20.0);
  }
  printf("%-30s %.2f ns/block  %.2f cycles  (out[0] %.4f)\n", name, best / (M * NB), best / (M * NB) * ghz, out[0]);
}
int main(int argc, char** argv) {
  const double ghz = argc > 1 ? std::atof(argv[1]) : 3.66;
  std::mt19937 g(0);
  std::vector<uint8_t> w41v(M * NB * 24), w80v(M * NB * 36 + 64);
  for (auto& c : w41v) c = g(); for (auto& c : w80v) c = g();
  for (int n = 0; n < M; ++n) { float* dm = (float*)(w41v.data() + n * NB * 24); for (int i = 0; i < 2 * NB; ++i) dm[i] = 0.01f * (g() % 100); 
    float* d = (float*)(w80v.data() + n * NB * 36); for (int i = 0; i < NB; ++i) d[i] = 0.01f; }
  std::vector<uint8_t> gg(M * NB * 34); for (auto& c : gg) c = g() & 0x3f;
  std::vector<float> x(K), out(M); for (auto& v : x) v = (g() % 1000) / 1000.f;
  {
    std::vector<float> sx(NB);
    for (int b = 0; b < NB; ++b) { float t = 0; for (int k = 0; k < 32; ++k) t += x[32 * b + k]; sx[b] = t; }
    double best = 1e30;
    for (int r = 0; r < 30; ++r) {
      uint64_t t0 = now(); for (int i = 0; i < 20; ++i) tile_alg(x.data(), sx.data(), w41v.data(), NB * 24, out.data(), M);
      best = std::min(best, (now() - t0) / 20.0);
    }
    printf("%-30s %.2f ns/block  %.2f cycles  (another rounding)\n", "q41 algebra: d*sum(xq)+m*sum(x)",
           best / (M * NB), best / (M * NB) * ghz);
  }
  run<1, 0>("q41 split: zext+2perm", w41v.data(), NB * 24, x.data(), out.data(), ghz);
  run<1, 1>("q41 split: bcast+srlv+2perm", w41v.data(), NB * 24, x.data(), out.data(), ghz);
  run<1, 2>("q41: cvt+fma both", w41v.data(), NB * 24, x.data(), out.data(), ghz);
  run<1, 3>("q41: perm lo, cvt hi", w41v.data(), NB * 24, x.data(), out.data(), ghz);
  run<1, 6>("q41: bcast, perm lo, cvt hi", w41v.data(), NB * 24, x.data(), out.data(), ghz);
  run<1, 4>("probe: 1 perm", w41v.data(), NB * 24, x.data(), out.data(), ghz);
  run<1, 5>("probe: no perm", w41v.data(), NB * 24, x.data(), out.data(), ghz);
  run<2, 0>("q80 gguf", gg.data(), NB * 34, x.data(), out.data(), ghz);
  run<2, 1>("q80 split f32 d", w80v.data(), NB * 36, x.data(), out.data(), ghz);
  run<2, 2>("q80 split + shifts", w80v.data(), NB * 36, x.data(), out.data(), ghz);
  run<2, 3>("q80 split + 256 bcast", w80v.data(), NB * 36, x.data(), out.data(), ghz);
}
