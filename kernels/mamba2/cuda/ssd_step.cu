// The single-token (decoding) SSD state update.
//
// ssd_step, per (b, h):
//   dt  = T(clamp(T(softplus(T(dt_raw + T(dt_bias)))), dt_min, dt_max))
//   dA  = exp(dt * -exp(A_log))
//   state[p,n] = state[p,n] * dA + (dt * B[g,n]) * x[p]       (g = h / (H/G))
//   y[p] = sum_n state[p,n] * C[g,n] + D[h] * x[p]
// The elementwise products and sums use explicit round-to-nearest intrinsics
// so they are not contracted into FMAs: each rounds where the reference's
// separate tensor ops round.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../../common/cuda/element.cuh"
#include "ssd_step.hpp"

namespace peftfw::kernels::mamba2::cuda {
using namespace ::peftfw::kernels::cuda;  // element.cuh, DType
namespace {

// ---- SSD state update -------------------------------------------------------
constexpr int kStepWarps = 4;    // warps per block
constexpr int kRowsPerWarp = 4;  // head_dim rows per warp
constexpr int kRowsPerBlock = kStepWarps * kRowsPerWarp;

template <typename T>
__global__ void __launch_bounds__(32 * kStepWarps)
    ssd_step_kernel(float* __restrict__ state, const T* __restrict__ x, const T* __restrict__ dt,
                    const float* __restrict__ A_log, const float* __restrict__ Dskip,
                    const float* __restrict__ dt_bias, const T* __restrict__ Bm,
                    const T* __restrict__ Cm, float* __restrict__ y, int H, int P, int G, int N,
                    float dt_min, float dt_max) {
  extern __shared__ float smem[];  // [2N]: dt * B[g, :], C[g, :]
  float* sdB = smem;
  float* sC = smem + N;

  const int h = blockIdx.y;
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * H + h;
  const int g = h / (H / G);
  const int64_t bg = static_cast<int64_t>(blockIdx.z) * G + g;

  const float dtv = ssd_dt_parts<T>(Num<T>::to_f(dt[bh]), dt_bias[h], dt_min, dt_max).dt;
  const float A = -expf(A_log[h]);
  const float dA = expf(__fmul_rn(dtv, A));

  for (int n = threadIdx.y * 32 + threadIdx.x; n < N; n += 32 * kStepWarps) {
    sdB[n] = __fmul_rn(dtv, Num<T>::to_f(Bm[bg * N + n]));
    sC[n] = Num<T>::to_f(Cm[bg * N + n]);
  }
  __syncthreads();

  const float dskip = Dskip != nullptr ? Dskip[h] : 0.f;
  const int p_begin = blockIdx.x * kRowsPerBlock + threadIdx.y * kRowsPerWarp;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int p = p_begin + r;
    if (p >= P) break;  // uniform over the warp
    const float xp = Num<T>::to_f(x[bh * P + p]);
    float* st = state + (bh * P + p) * N;
    float acc = 0.f;
    for (int n = threadIdx.x; n < N; n += 32) {
      const float s = __fadd_rn(__fmul_rn(st[n], dA), __fmul_rn(sdB[n], xp));
      st[n] = s;
      acc = fmaf(s, sC[n], acc);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (threadIdx.x == 0) {
      if (Dskip != nullptr) acc = __fadd_rn(acc, __fmul_rn(dskip, xp));
      y[bh * P + p] = acc;
    }
  }
}

template <typename T>
cudaError_t ssd_step_typed(float* state, const void* x, const void* dt, const float* A_log,
                           const float* D, const float* dt_bias, const void* B, const void* C,
                           float* y, int Bsz, int H, int P, int G, int N, float dt_min,
                           float dt_max, cudaStream_t stream) {
  const dim3 block(32, kStepWarps);
  const dim3 grid((P + kRowsPerBlock - 1) / kRowsPerBlock, H, Bsz);
  const size_t smem = 2 * static_cast<size_t>(N) * sizeof(float);
  if (smem > 48 * 1024) return cudaErrorInvalidValue;
  ssd_step_kernel<T><<<grid, block, smem, stream>>>(
      state, static_cast<const T*>(x), static_cast<const T*>(dt), A_log, D, dt_bias,
      static_cast<const T*>(B), static_cast<const T*>(C), y, H, P, G, N, dt_min, dt_max);
  return cudaGetLastError();
}

}  // namespace

cudaError_t ssd_step(DType dtype, float* state, const void* x, const void* dt, const float* A_log,
                     const float* D, const float* dt_bias, const void* B, const void* C, float* y,
                     int64_t batch, int64_t heads, int64_t head_dim, int64_t groups,
                     int64_t state_dim, float dt_min, float dt_max, cudaStream_t stream) {
  if (batch < 0 || heads < 0 || head_dim < 0 || state_dim < 0 || groups < 1) return cudaErrorInvalidValue;
  if (batch > 65535 || heads > 65535 || head_dim > INT_MAX || state_dim > INT_MAX)
    return cudaErrorInvalidValue;
  if (heads % groups != 0) return cudaErrorInvalidValue;
  if (batch == 0 || heads == 0 || head_dim == 0) return cudaSuccess;
  if (state == nullptr || x == nullptr || dt == nullptr || A_log == nullptr || dt_bias == nullptr ||
      B == nullptr || C == nullptr || y == nullptr)
    return cudaErrorInvalidValue;
  const int Bsz = static_cast<int>(batch), H = static_cast<int>(heads),
            P = static_cast<int>(head_dim), G = static_cast<int>(groups),
            N = static_cast<int>(state_dim);
  switch (dtype) {
    case DType::f32:
      return ssd_step_typed<float>(state, x, dt, A_log, D, dt_bias, B, C, y, Bsz, H, P, G, N, dt_min, dt_max, stream);
    case DType::f16:
      return ssd_step_typed<__half>(state, x, dt, A_log, D, dt_bias, B, C, y, Bsz, H, P, G, N, dt_min, dt_max, stream);
    case DType::bf16:
      return ssd_step_typed<__nv_bfloat16>(state, x, dt, A_log, D, dt_bias, B, C, y, Bsz, H, P, G, N, dt_min, dt_max, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace peftfw::kernels::mamba2::cuda
