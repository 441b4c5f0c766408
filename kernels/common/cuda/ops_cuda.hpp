// LibTorch entry points for the generic ops' CUDA kernels (launch.hpp).
//
// Same signatures and results as the reference ops in peftfw/kernels/ops.hpp.
// causal_conv1d, gated_rms_norm and silu_mul are autograd Functions with
// hand-written backward kernels; causal_conv1d_step is inference-only (it
// updates the state in place). Cases the kernels do not cover (CPU tensors, K
// outside 2..4, mixed dtypes, D > 8192, inputs that would need autograd through
// a step op) fall back to the reference implementation.
#pragma once

#include <torch/types.h>

#include "peftfw/kernels/ops.hpp"

namespace peftfw::kernels::cuda_ops {

torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, const torch::Tensor& seq_ids, bool silu);

torch::Tensor gated_rms_norm(const torch::Tensor& y, const torch::Tensor& z,
                             const torch::Tensor& weight, double eps,
                             std::optional<torch::ScalarType> out_dtype);

torch::Tensor silu_mul(const torch::Tensor& gu);

// Shifts conv_state in place when it is contiguous (otherwise conv_state is
// replaced by the updated contiguous copy); returns the output [B,C].
torch::Tensor causal_conv1d_step(torch::Tensor& conv_state, const torch::Tensor& x_t,
                                 const torch::Tensor& weight, const torch::Tensor& bias, bool silu);

}  // namespace peftfw::kernels::cuda_ops
