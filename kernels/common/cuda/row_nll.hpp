// Torch-free CUDA entry points of row_nll (peftfw/kernels/row_nll.hpp), so that CI
// compiles them with nvcc on a machine without a GPU. dtype: 0 float32, 1 float16,
// 2 bfloat16. logits rows are `ld` elements apart; targets int64.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace peftfw::kernels::cuda {

cudaError_t row_nll_fwd(int dtype, const void* logits, int64_t ld, const int64_t* targets, int64_t rows,
                        int64_t vocab, float divisor, float* loss, float* lse, cudaStream_t stream);

// dlogits [rows, vocab] contiguous, dtype; scale: one float32 on the device.
cudaError_t row_nll_bwd(int dtype, const void* logits, int64_t ld, const int64_t* targets, const float* lse,
                        const float* scale, int64_t rows, int64_t vocab, float divisor, void* dlogits,
                        cudaStream_t stream);

}  // namespace peftfw::kernels::cuda
