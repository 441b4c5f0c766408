// The down projection of a LoRA branch together with its input dropout,
//   h = drop(x) A^T,  drop(x) = x * keep / (1 - p),  keep ~ Bernoulli(1 - p) per element,
// as one CUDA pass over x. The Python stack (and the LibTorch composition) writes drop(x)
// and a byte mask, then reads drop(x) again for the product and the mask again in the
// backward. Here the mask is counter-based: drawn from the CUDA generator's Philox seed and
// offset, redrawn from them by the backward and, after the generator state is restored, by
// an activation-checkpointing rerun. The optional copy of x serves the wide projections'
// K-concatenated GEMM. CUDA tensors only; where lora_down_kernel_applies() is false the
// caller keeps its LibTorch composition.
#pragma once

#include <torch/types.h>

#include <cstdint>

namespace peftfw::kernels {

// One draw of a dropout mask: p == 0 means no dropout.
struct DropMask {
  double p = 0.0;
  uint64_t seed = 0, offset = 0;
};

// Whether lora_down and dropout_backward_ run on the CUDA kernels for x [M, K] and the
// adapter's A [r, K] in x's dtype (16-bit, r in {16, 32, 48, 64}, K % 16 == 0).
bool lora_down_kernel_applies(const torch::Tensor& x, const torch::Tensor& a);

// Draws a fresh mask with drop probability p (0 <= p < 1) from the default CUDA generator
// of `device` (advancing it, as a dropout would).
DropMask draw_drop_mask(const torch::Device& device, double p);

// h <- drop(x) a^T for the mask; h is [M, r] with unit column stride (it may be the right
// columns of a wider buffer). x_copy (optional, [M, K], unit column stride) receives x;
// x_dropped (optional, [M, K] contiguous) receives drop(x). Requires lora_down_kernel_applies.
void lora_down(const torch::Tensor& x, const torch::Tensor& a, const DropMask& mask, const torch::Tensor& h,
               const torch::Tensor& x_copy = {}, const torch::Tensor& x_dropped = {});

// g <- g * keep / (1 - p) in place for the same mask: the dropout's backward. g [M, K]
// contiguous in x's dtype.
void dropout_backward_(const torch::Tensor& g, const DropMask& mask);

}  // namespace peftfw::kernels
