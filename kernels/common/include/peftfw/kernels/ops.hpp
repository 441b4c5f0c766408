// Ops shared by the model families (Mamba-2 now, Mamba-1 next): the causal conv1d and its
// decoding step, the gated RMSNorm and the gated MLP activation, behind the kernels' one
// dispatch point (peftfw/kernels/dispatch.hpp).
//
// Each has a LibTorch reference (CPU and GPU, differentiable by autograd; see
// kernels/common/reference.cpp) and, when the CUDA kernels are built, a fused
// implementation for CUDA tensors (kernels/common/cuda).
#pragma once

#include <torch/types.h>

#include <optional>

#include "peftfw/kernels/dispatch.hpp"

namespace peftfw::kernels {

// Causal depthwise conv1d over time, then SiLU when `silu` is set.
//   x [B,T,C], weight [C,K], bias [C] (optional), seq_ids [B,T] (optional).
// With seq_ids the window never reaches into a different sequence.
torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, const torch::Tensor& seq_ids, bool silu);

// One decoding step of the conv: shifts `conv_state` [B,C,K] left, appends
// x_t [B,C], returns the conv (+SiLU) output [B,C].
torch::Tensor causal_conv1d_step(torch::Tensor& conv_state, const torch::Tensor& x_t,
                                 const torch::Tensor& weight, const torch::Tensor& bias, bool silu);

// Gated RMSNorm: w * rmsnorm(y * silu(z)) over the last dim, float32 math; the
// normalised value is rounded to y's dtype before the weight (transformers'
// MambaRMSNormGated). With out_dtype the result is cast to it (once).
torch::Tensor gated_rms_norm(const torch::Tensor& y, const torch::Tensor& z,
                             const torch::Tensor& weight, double eps,
                             std::optional<torch::ScalarType> out_dtype = std::nullopt);

// Gated MLP activation: silu(a) * b where gu = [a | b] along the last dim
// (Granite's shared MLP: first half gate, second half up).
torch::Tensor silu_mul(const torch::Tensor& gu);

namespace reference {
torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, const torch::Tensor& seq_ids, bool silu);
torch::Tensor causal_conv1d_step(torch::Tensor& conv_state, const torch::Tensor& x_t,
                                 const torch::Tensor& weight, const torch::Tensor& bias, bool silu);
torch::Tensor gated_rms_norm(const torch::Tensor& y, const torch::Tensor& z,
                             const torch::Tensor& weight, double eps,
                             std::optional<torch::ScalarType> out_dtype = std::nullopt);
torch::Tensor silu_mul(const torch::Tensor& gu);
}  // namespace reference

}  // namespace peftfw::kernels
