// Cross-entropy over the rows of a logits block, the hot part of the causal-LM loss
// (framework/src/model/lean_loss.cpp): one pass over the 16-bit logits forward and one
// backward, where the LibTorch composition converts to float32, divides, and reduces in
// several passes over [rows, vocabulary]. CUDA kernels for CUDA tensors when built, the
// LibTorch reference otherwise (and with PEFTFW_KERNELS=reference).
#pragma once

#include <torch/types.h>

namespace peftfw::kernels {

struct RowNll {
  torch::Tensor loss;  // [m] float32: lse - z[target]
  torch::Tensor lse;   // [m] float32: log sum_v exp(z_v)
};

// logits [m, V] (any float dtype, unit stride in V), targets [m] int64 in [0, V).
// z = float32(logits) / divisor.
RowNll row_nll(const torch::Tensor& logits, const torch::Tensor& targets, double divisor);

// The gradient of sum_r scale * loss_r with respect to z, (softmax(z) - onehot(target)) *
// scale, in logits' dtype; lse from row_nll, scale a float32 scalar tensor (it may carry
// 1 / divisor and the incoming gradient).
torch::Tensor row_nll_backward(const torch::Tensor& logits, const torch::Tensor& targets,
                               const torch::Tensor& lse, double divisor, const torch::Tensor& scale);

// Whether row_nll and row_nll_backward run the CUDA kernels for these tensors.
bool row_nll_kernel_applies(const torch::Tensor& logits, const torch::Tensor& targets);

namespace reference {
RowNll row_nll(const torch::Tensor& logits, const torch::Tensor& targets, double divisor);
torch::Tensor row_nll_backward(const torch::Tensor& logits, const torch::Tensor& targets,
                               const torch::Tensor& lse, double divisor, const torch::Tensor& scale);
}  // namespace reference

}  // namespace peftfw::kernels
