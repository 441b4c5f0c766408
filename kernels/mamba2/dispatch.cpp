// The one dispatch point for Mamba-2 ops: CUDA kernels for CUDA tensors when
// they are built (PEFTFW_HAVE_CUDA), the LibTorch reference otherwise.
#include <torch/torch.h>

#include "peftfw/kernels/mamba2.hpp"

namespace peftfw::kernels::mamba2 {

const char* implementation_for(const torch::Device& device) {
  (void)device;
  return "reference";  // the CUDA kernels register here when built
}

torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, const torch::Tensor& seq_ids, bool silu) {
  return reference::causal_conv1d(x, weight, bias, seq_ids, silu);
}

SsdResult ssd_chunk_scan(const SsdArgs& args) { return reference::ssd_chunk_scan(args); }

torch::Tensor gated_rms_norm(const torch::Tensor& y, const torch::Tensor& z,
                             const torch::Tensor& weight, double eps) {
  return reference::gated_rms_norm(y, z, weight, eps);
}

torch::Tensor ssd_step(SsdStepArgs& args) { return reference::ssd_step(args); }

torch::Tensor causal_conv1d_step(torch::Tensor& conv_state, const torch::Tensor& x_t,
                                 const torch::Tensor& weight, const torch::Tensor& bias, bool silu) {
  return reference::causal_conv1d_step(conv_state, x_t, weight, bias, silu);
}

}  // namespace peftfw::kernels::mamba2
