// Run-time ISA dispatch shared by the CPU kernels.
//
// A kernel header is included twice by its .cpp, inside two namespaces: once for the baseline
// ISA and once between PTP_AVX2_BEGIN and PTP_AVX2_END (compiled for AVX2 + FMA + F16C, with
// PTP_CPU_AVX2 defined for the header); ptp::cpu_has_avx2() picks one at run time.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PTP_HAVE_X86 1
#endif

#if defined(__clang__)
#define PTP_AVX2_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define PTP_AVX2_END _Pragma("clang attribute pop")
#else
#define PTP_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define PTP_AVX2_END _Pragma("GCC pop_options")
#endif

namespace ptp {

// True when this CPU has AVX2, FMA and F16C (checked once).
inline bool cpu_has_avx2() {
#ifdef PTP_HAVE_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

}  // namespace ptp
