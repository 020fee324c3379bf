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

#include <sstream>
#include <string>

namespace ptp {

// "float32 [2, 8, 9] on cpu"
inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << c10::toString(t.scalar_type()) << " [";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << "] on " << t.device();
  return os.str();
}

#define PTP_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

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
    std::ostringstream exp;
    exp << "[";
    int64_t i = 0;
    for (int64_t s : sizes) {
      exp << (i++ ? ", " : "");
      if (s >= 0) exp << s; else exp << "*";
    }
    exp << "]";
    PTP_CHECK(false, name, " must have shape ", shape, " = ", exp.str(), ", got ", describe(t));
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
