// Torch-free launchers for the generic ops' CUDA kernels (conv1d.cu, conv1d_step.cu,
// gated_norm.cu, silu_mul.cu) and the element type code every family's launchers share
// (DType). Pointers are device pointers to contiguous row-major buffers; the
// element type of every `void*` buffer is `dtype` unless stated otherwise.
// Each launcher enqueues its kernel(s) on `stream` and returns
// cudaGetLastError() (or cudaErrorInvalidValue, without launching anything,
// for arguments it does not support). Math is float32 throughout; results are
// rounded to `dtype` at the same points as the LibTorch reference
// (kernels/common/reference.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace peftfw::kernels::cuda {

enum class DType { f32, f16, bf16 };

// Causal depthwise conv1d (+ SiLU) forward.
//   x [B,T,C], weight [C,K], bias [C] (nullable), seq_ids [B,T] int64
//   (nullable), out [B,T,C]. K must be 2..4. With seq_ids, tap t-j is used
//   only when seq_ids[b,t-j] == seq_ids[b,t]. The pre-activation is
//   accumulated in float32 and rounded to dtype once (as conv1d does), then
//   SiLU is applied to the rounded value and rounded again.
//   x's rows (time steps) are x_ld elements apart (x_ld >= C; C when contiguous, more
//   for a column slice of a wider tensor); out and dx are contiguous.
cudaError_t causal_conv1d_fwd(DType dtype, const void* x, int64_t x_ld, const void* weight,
                              const void* bias, const int64_t* seq_ids, void* out, int64_t batch,
                              int64_t seqlen, int64_t channels, int kernel_size, bool silu,
                              cudaStream_t stream);

// Causal conv1d backward. dout/x/weight/bias/seq_ids as in the forward.
//   dx [B,T,C] dtype (nullable: not computed), dweight [C,K] float32 and
//   dbias [C] float32 (nullable; when given they must be zero-filled by the
//   caller, the kernel accumulates into them with atomicAdd).
cudaError_t causal_conv1d_bwd(DType dtype, const void* dout, const void* x, int64_t x_ld,
                              const void* weight, const void* bias, const int64_t* seq_ids, void* dx,
                              float* dweight, float* dbias, int64_t batch, int64_t seqlen,
                              int64_t channels, int kernel_size, bool silu, cudaStream_t stream);

// Gated RMSNorm forward over the last dim: y [R,D], z [R,D] (nullable),
// weight [D], out [R,D], rstd [R] float32 (written, for the backward).
//   g = y * silu(z); rstd = rsqrt(mean(g^2) + eps); out = weight * Y(g * rstd),
// Y being y's type. With y_f32, y (and the backward's dy) is float32 while z,
// weight and out are dtype (16-bit): out is the float32 result rounded once.
// D must be 1..8192.
// z's rows are z_ld elements apart (z_ld >= D; D when contiguous); dz is contiguous.
cudaError_t gated_rms_norm_fwd(DType dtype, bool y_f32, const void* y, const void* z,
                               int64_t z_ld, const void* weight, void* out, float* rstd,
                               int64_t rows, int64_t dim, float eps, cudaStream_t stream);

// Gated RMSNorm backward. dy [R,D] (nullable), dz [R,D] (nullable; ignored
// when z is null), dweight [D] float32 (nullable; zero-filled by the caller,
// accumulated with atomicAdd). rstd is the forward's output.
cudaError_t gated_rms_norm_bwd(DType dtype, bool y_f32, const void* dout, const void* y,
                               const void* z, int64_t z_ld, const void* weight, const float* rstd,
                               void* dy, void* dz, float* dweight, int64_t rows, int64_t dim,
                               cudaStream_t stream);

// Gated MLP activation: gu [R, 2I], out [R, I] = silu(gu[:, :I]) * gu[:, I:],
// rounded as the LibTorch composition is. Backward: dout [R, I] -> dgu [R, 2I]
// (both halves written).
cudaError_t silu_mul_fwd(DType dtype, const void* gu, void* out, int64_t rows, int64_t inner,
                         cudaStream_t stream);
cudaError_t silu_mul_bwd(DType dtype, const void* dout, const void* gu, void* dgu, int64_t rows,
                         int64_t inner, cudaStream_t stream);

// One decoding step of the causal conv: conv_state [B,C,K] (in place: shift
// left, append x_t), x_t [B,C], weight [C,K], bias [C] (nullable), out [B,C].
// K must be 2..4.
cudaError_t causal_conv1d_step(DType dtype, void* conv_state, const void* x_t, const void* weight,
                               const void* bias, void* out, int64_t batch, int64_t channels,
                               int kernel_size, bool silu, cudaStream_t stream);

}  // namespace peftfw::kernels::cuda
