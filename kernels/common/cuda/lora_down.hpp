// Torch-free CUDA entry points of the LoRA down projection with its input dropout
// (peftfw/kernels/lora_down.hpp), so that CI compiles them with nvcc on a machine without a
// GPU. dtype: 1 float16, 2 bfloat16.
//
// The dropout mask is counter-based: Philox4x32-10 keyed by `seed`, with the counter laid
// out as curand's, (offset / 4) in the low words and the element group i / 8 (element
// i = m * K + k of the [M, K] input) as the subsequence in the high ones. The backward
// redraws the mask from (seed, offset) instead of reading a stored one, a rerun with the
// generator state restored draws the same one, and the words are those a PyTorch Philox
// kernel would use at that offset, which the generator hands out only once. One call gives
// the 8 elements 8q..8q+7 a 16-bit word each (counter subsequence q); element i is kept when
// its word is >= round(p * 2^16), so p is applied at a resolution of 2^-16, and kept elements
// are scaled by 1 / (1 - p).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace peftfw::kernels::cuda {

struct DropDraw {
  double p = 0.0;  // 0: no dropout (no random words drawn)
  uint64_t seed = 0, offset = 0;
};

// Whether lora_down covers this dtype code, rank and input width.
bool lora_down_supported(int dtype, int64_t r, int64_t K);

// h[m, :] = drop(x)[m, :] A^T for x [M, K] (rows ld_x apart), A [r, K] contiguous, h rows
// ld_h apart; float32 accumulation, one rounding to the dtype. Optional outputs (null to
// skip): x_copy (rows ld_c apart) receives x unchanged, x_dropped [M, K] contiguous
// receives drop(x). x, x_copy and x_dropped rows must be 16-byte aligned.
cudaError_t lora_down(int dtype, const void* x, int64_t ld_x, const void* A, int64_t r, int64_t M, int64_t K,
                      const DropDraw& drop, void* h, int64_t ld_h, void* x_copy, int64_t ld_c, void* x_dropped,
                      cudaStream_t stream);

// g <- g * keep / (1 - p) in place, g [M, K] contiguous (K % 8 == 0): the dropout's backward
// for the mask lora_down drew with the same DropDraw.
cudaError_t dropout_scale(int dtype, void* g, int64_t M, int64_t K, const DropDraw& drop, cudaStream_t stream);

}  // namespace peftfw::kernels::cuda
