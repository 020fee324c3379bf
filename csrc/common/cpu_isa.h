// Run-time ISA dispatch shared by the CPU kernels.
//
// A kernel header is included by its .cpp once per ISA, inside one namespace each: the baseline
// ISA, between PTP_AVX2_BEGIN and PTP_AVX2_END (AVX2 + FMA + F16C, PTP_CPU_AVX2 defined for the
// header), and for invariant_linear also between PTP_AVX512VL_BEGIN and PTP_AVX512VL_END;
// ptp::cpu_has_avx2() / cpu_has_avx512vl() pick one at run time.
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

// A third copy for kernels that want 32 vector registers: the same 8-lane (256-bit) arithmetic
// as the AVX2 copy, compiled with AVX-512VL so ymm16-31 exist (larger register tiles).
#if defined(__clang__)
#define PTP_AVX512VL_BEGIN                                                                      \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c,avx512f,avx512vl\"))), " \
          "apply_to = function)")
#define PTP_AVX512VL_END _Pragma("clang attribute pop")
#else
#define PTP_AVX512VL_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,avx512f,avx512vl\")")
#define PTP_AVX512VL_END _Pragma("GCC pop_options")
#endif

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace ptp {

// The environment variable PTP_CPU_ISA caps the kernel copy the CPU kernels pick: "baseline",
// "avx2" or "avx512vl" (default: the best the CPU has). Read once, at the first kernel call;
// tests use it to run every copy on one machine.
inline int cpu_isa_cap() {
  static const int cap = [] {
    const char* v = std::getenv("PTP_CPU_ISA");
    if (v == nullptr || *v == '\0') return 2;
    if (std::strcmp(v, "baseline") == 0) return 0;
    if (std::strcmp(v, "avx2") == 0) return 1;
    if (std::strcmp(v, "avx512vl") == 0) return 2;
    throw std::invalid_argument(std::string("PTP_CPU_ISA must be baseline, avx2 or avx512vl, got '") + v +
                                "'");
  }();
  return cap;
}

// True when this CPU has AVX2, FMA and F16C (checked once) and PTP_CPU_ISA allows them.
inline bool cpu_has_avx2() {
#ifdef PTP_HAVE_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok && cpu_isa_cap() >= 1;
#else
  return false;
#endif
}

// True when this CPU also has AVX-512F and AVX-512VL (checked once).
inline bool cpu_has_avx512vl() {
#ifdef PTP_HAVE_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return ok && cpu_has_avx2() && cpu_isa_cap() >= 2;
#else
  return false;
#endif
}

}  // namespace ptp
