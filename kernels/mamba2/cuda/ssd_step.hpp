// Torch-free launcher for the SSD's decoding step (ssd_step.cu). Pointers are device
// pointers to contiguous row-major buffers; it enqueues the kernel on `stream` and returns
// cudaGetLastError() (or cudaErrorInvalidValue, without launching anything, for arguments
// it does not support). Math is float32; results are rounded to `dtype` at the same points
// as the LibTorch reference (kernels/mamba2/reference.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../../common/cuda/launch.hpp"

namespace peftfw::kernels::mamba2::cuda {

using ::peftfw::kernels::cuda::DType;

// One decoding step of the SSD recurrence.
//   state [B,H,P,N] float32 (updated in place), x [B,H,P], dt [B,H] (raw),
//   A_log [H] float32, D [H] float32 (nullable), dt_bias [H] float32,
//   B, C [B,G,N], y [B,H,P] float32 (out). H must be a multiple of G.
//   dt = clamp(softplus(dt + dtype(dt_bias)), dt_min, dt_max), rounded to
//   dtype at each step as the reference does.
cudaError_t ssd_step(DType dtype, float* state, const void* x, const void* dt, const float* A_log,
                     const float* D, const float* dt_bias, const void* B, const void* C, float* y,
                     int64_t batch, int64_t heads, int64_t head_dim, int64_t groups,
                     int64_t state_dim, float dt_min, float dt_max, cudaStream_t stream);

}  // namespace peftfw::kernels::mamba2::cuda
