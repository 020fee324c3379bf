// Argument checks shared by every op and both backends.
//
// Each op has one `check_<op>_inputs` function (in its own header) built from these helpers, so
// the CPU and CUDA implementations reject exactly the same inputs with exactly the same message.
// Caller errors raise ValueError in Python (TORCH_CHECK_VALUE) and name the argument together
// with what was expected and what was given, e.g.
//   "tree_mask must be bool [B, T, T] = [2, 8, 8], got float32 [2, 8, 9] on cpu".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace ptp {

// Messages are built by plain string concatenation (`cat`), never through std::ostream: on the
// GPU machine (extension built by /opt/gcc's g++, torch 2.11) the ostream number formatting
// instantiated inside _C.so (std::ostream::_M_insert<long>) jumped into a wrong libstdc++ virtual
// and every failing check segfaulted instead of raising (2026-11-23, native backtrace:
// describe -> _M_insert<long> -> __codecvt_utf16_base::do_unshift). c10::str with one
// std::string argument returns it as is, so TORCH_CHECK_VALUE does no formatting either.
namespace detail {
inline void append(std::string& s, const char* x) { s += x; }
inline void append(std::string& s, const std::string& x) { s += x; }
inline void append(std::string& s, c10::string_view x) { s.append(x.data(), x.size()); }
inline void append(std::string& s, bool x) { s += x ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
inline void append(std::string& s, T x) {
  s += std::to_string(x);
}
inline void append(std::string& s, double x) {  // like ostream's default (%g, 6 digits)
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  s += buf;
}
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }
inline void append(std::string& s, c10::IntArrayRef a) {  // "[2, 8, 9]"
  s += "[";
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a[i]);
  }
  s += "]";
}
}  // namespace detail

template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

// "float32 [2, 8, 9] on cpu"
inline std::string describe(const at::Tensor& t) {
  return cat(t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

#define PTP_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, ::ptp::cat(__VA_ARGS__))

// t.dim() == ndim and every size that is >= 0 in `sizes` matches; `shape` is the human-readable
// expected shape for the message (e.g. "[B, T, H_q, D]").
inline void check_shape(const at::Tensor& t, const char* name, const char* shape,
                        std::initializer_list<int64_t> sizes) {
  bool ok = t.dim() == static_cast<int64_t>(sizes.size());
  if (ok) {
    int64_t i = 0;
    for (int64_t s : sizes) {
      if (s >= 0 && t.size(i) != s) ok = false;
      ++i;
    }
  }
  if (!ok) {
    std::string exp = "[";
    int64_t i = 0;
    for (int64_t s : sizes) {
      if (i++) exp += ", ";
      exp += s >= 0 ? std::to_string(s) : std::string("*");
    }
    exp += "]";
    PTP_CHECK(false, name, " must have shape ", shape, " = ", exp, ", got ", describe(t));
  }
}

inline bool is_float_type(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline void check_float(const at::Tensor& t, const char* name) {
  PTP_CHECK(is_float_type(t.scalar_type()), name,
            " must be float32, float16 or bfloat16, got ", describe(t));
}

inline void check_dtype(const at::Tensor& t, at::ScalarType s, const char* name) {
  PTP_CHECK(t.scalar_type() == s, name, " must be ", c10::toString(s), ", got ", describe(t));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  PTP_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (",
            ref.device(), "), got ", describe(t));
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  PTP_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides(), " for ",
            describe(t));
}

}  // namespace ptp
