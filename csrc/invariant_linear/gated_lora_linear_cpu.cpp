// gated_lora_linear and gated_lora_quant_linear on the CPU: the composites in gated_lora_linear.h
// over invariant_linear_cpu / quant_linear_cpu.
//
// (A direct single-thread loop for the LoRA delta, instead of two invariant_linear calls, measured
// slower on the 2-core dev CPU: 15-24 us against ~12 us per SmolLM2 layer at 4 auxiliary rows;
// the products are small but not negligible without the kernel's wide register tiles.)
#include <ATen/ops/add.h>

#include "gated_lora_linear.h"

namespace ptp {

at::Tensor gated_lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b, double scale, int64_t aux_start) {
  return gated_lora_linear_impl(x, weight, bias, lora_a, lora_b, scale, aux_start,
                                &invariant_linear_cpu);
}

at::Tensor gated_lora_quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                       c10::string_view format,
                                       const std::optional<at::Tensor>& bias,
                                       const at::Tensor& lora_a, const at::Tensor& lora_b,
                                       double scale, int64_t aux_start) {
  return gated_lora_quant_linear_impl(x, qweight, format, bias, lora_a, lora_b, scale, aux_start,
                                      &quant_linear_cpu, &invariant_linear_cpu);
}

}  // namespace ptp
