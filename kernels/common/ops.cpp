// The dispatch point of the shared ops (peftfw/kernels/ops.hpp): their CUDA glue
// (cuda/ops_cuda.cpp) for CUDA tensors when the kernels are built and the switch allows
// (peftfw/kernels/dispatch.hpp), the LibTorch reference (reference.cpp) otherwise.
#include "peftfw/kernels/ops.hpp"

#include <torch/torch.h>

#ifdef PEFTFW_HAVE_CUDA
#include "cuda/ops_cuda.hpp"
#endif

namespace peftfw::kernels {

torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, const torch::Tensor& seq_ids, bool silu) {
#ifdef PEFTFW_HAVE_CUDA
  if (use_cuda(x)) return cuda_ops::causal_conv1d(x, weight, bias, seq_ids, silu);
#endif
  return reference::causal_conv1d(x, weight, bias, seq_ids, silu);
}

torch::Tensor causal_conv1d_step(torch::Tensor& conv_state, const torch::Tensor& x_t,
                                 const torch::Tensor& weight, const torch::Tensor& bias, bool silu) {
#ifdef PEFTFW_HAVE_CUDA
  if (use_cuda(x_t)) return cuda_ops::causal_conv1d_step(conv_state, x_t, weight, bias, silu);
#endif
  return reference::causal_conv1d_step(conv_state, x_t, weight, bias, silu);
}

torch::Tensor gated_rms_norm(const torch::Tensor& y, const torch::Tensor& z,
                             const torch::Tensor& weight, double eps,
                             std::optional<torch::ScalarType> out_dtype) {
#ifdef PEFTFW_HAVE_CUDA
  if (use_cuda(y)) return cuda_ops::gated_rms_norm(y, z, weight, eps, out_dtype);
#endif
  return reference::gated_rms_norm(y, z, weight, eps, out_dtype);
}

torch::Tensor silu_mul(const torch::Tensor& gu) {
#ifdef PEFTFW_HAVE_CUDA
  if (use_cuda(gu)) return cuda_ops::silu_mul(gu);
#endif
  return reference::silu_mul(gu);
}

}  // namespace peftfw::kernels
