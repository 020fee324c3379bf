// gated_lora_linear on the CPU: the composite in gated_lora_linear.h over invariant_linear_cpu.
#include <ATen/ops/add.h>

#include "gated_lora_linear.h"

namespace ptp {

at::Tensor gated_lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b, double scale, int64_t aux_start) {
  return gated_lora_linear_impl(x, weight, bias, lora_a, lora_b, scale, aux_start,
                                &invariant_linear_cpu);
}

}  // namespace ptp
