// CUDA launcher of invariant_linear: shared argument check, device guard, current stream; the
// kernel (and why it is row-invariant) is in invariant_linear_kernels.cuh. Meant for
// decoding-sized calls (rows in the tens); no host synchronisation, CUDA-graph safe.
// Also gated_lora_linear and gated_lora_quant_linear on CUDA: the composites of gated_lora_linear.h
// over this launcher and quant_linear's (three products, one add on the current stream).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>

#include "gated_lora_linear.h"
#include "invariant_linear.h"
#include "invariant_linear_kernels.cuh"
#include "quant_linear.h"

namespace ptp {
namespace {

namespace k = invariant_linear_kernels;

template <typename T>
void run(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
         at::Tensor& y, cudaStream_t stream) {
  C10_CUDA_CHECK(k::launch<T>(static_cast<const T*>(x.data_ptr()),
                              static_cast<const T*>(weight.data_ptr()),
                              bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr,
                              static_cast<T*>(y.data_ptr()), x.size(0), x.size(1), weight.size(0),
                              stream));
}

}  // namespace

at::Tensor invariant_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias) {
  check_invariant_linear_inputs(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.size(0) == 0 || weight.size(0) == 0) return y;
  PTP_CHECK((weight.size(0) + k::kWarps - 1) / k::kWarps < (int64_t{1} << 31),
            "invariant_linear: too many output features for one grid");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  switch (x.scalar_type()) {
    case at::kFloat:
      run<float>(x, weight, bias, y, stream);
      break;
    case at::kHalf:
      run<__half>(x, weight, bias, y, stream);
      break;
    default:
      run<__nv_bfloat16>(x, weight, bias, y, stream);
  }
  return y;
}

at::Tensor quant_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, c10::string_view format,
                             const std::optional<at::Tensor>& bias) {
  check_quant_linear_inputs(x, qweight, format, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), qweight.size(0)}, x.options());
  if (x.size(0) == 0 || qweight.size(0) == 0) return y;
  PTP_CHECK((qweight.size(0) + k::kWarps - 1) / k::kWarps < (int64_t{1} << 31),
            "quant_linear: too many output features for one grid");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const auto launch = format == "q4_1" ? &k::launch_quant<true> : &k::launch_quant<false>;
  C10_CUDA_CHECK(launch(x.data_ptr<float>(), qweight.data_ptr<uint8_t>(), b, y.data_ptr<float>(),
                        x.size(0), x.size(1), qweight.size(0), qweight.size(1), stream));
  return y;
}

at::Tensor gated_lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                  const at::Tensor& lora_b, double scale, int64_t aux_start) {
  const c10::cuda::CUDAGuard guard(x.device());
  return gated_lora_linear_impl(x, weight, bias, lora_a, lora_b, scale, aux_start,
                                &invariant_linear_cuda);
}

at::Tensor gated_lora_quant_linear_cuda(const at::Tensor& x, const at::Tensor& qweight,
                                        c10::string_view format,
                                        const std::optional<at::Tensor>& bias,
                                        const at::Tensor& lora_a, const at::Tensor& lora_b,
                                        double scale, int64_t aux_start) {
  const c10::cuda::CUDAGuard guard(x.device());
  return gated_lora_quant_linear_impl(x, qweight, format, bias, lora_a, lora_b, scale, aux_start,
                                      &quant_linear_cuda, &invariant_linear_cuda);
}

}  // namespace ptp
