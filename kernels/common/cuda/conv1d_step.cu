// The single-token (decoding) conv step.
//
// causal_conv1d_step, per (b, c):
//   state[0..K-2] = state[1..K-1]; state[K-1] = x_t
//   out = T(sum_j T(state[j] * w[j])) (+ bias, rounded) (SiLU, rounded)
// The products and sums use explicit round-to-nearest intrinsics so they are not
// contracted into FMAs: each rounds where the reference's separate tensor ops round.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "element.cuh"
#include "launch.hpp"

namespace peftfw::kernels::cuda {
namespace {

// ---- conv step --------------------------------------------------------------
template <typename T, int K>
__global__ void __launch_bounds__(256)
    conv_step_kernel(T* __restrict__ conv_state, const T* __restrict__ x_t,
                     const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ out,
                     int64_t BC, int C, bool silu) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < BC;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % C);
    T* s = conv_state + idx * K;
    T v[K];
#pragma unroll
    for (int j = 0; j < K - 1; ++j) v[j] = s[j + 1];
    v[K - 1] = x_t[idx];
#pragma unroll
    for (int j = 0; j < K; ++j) s[j] = v[j];

    // (state * weight) rounds each product to T; .sum(-1) accumulates in
    // float and rounds once.
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j)
      acc = __fadd_rn(acc, round_to<T>(__fmul_rn(Num<T>::to_f(v[j]), Num<T>::to_f(w[c * K + j]))));
    acc = round_to<T>(acc);
    if (bias != nullptr) acc = round_to<T>(__fadd_rn(acc, Num<T>::to_f(bias[c])));
    if (silu) acc = acc / (1.f + expf(-acc));
    out[idx] = Num<T>::from_f(acc);
  }
}

template <typename T>
cudaError_t conv_step_typed(void* conv_state, const void* x_t, const void* w, const void* bias,
                            void* out, int64_t BC, int C, int K, bool silu, cudaStream_t stream) {
  constexpr int threads = 256;
  int64_t blocks = (BC + threads - 1) / threads;
  if (blocks > (1LL << 30)) blocks = 1LL << 30;
  const dim3 grid(static_cast<unsigned>(blocks));
  auto* sp = static_cast<T*>(conv_state);
  auto* xp = static_cast<const T*>(x_t);
  auto* wp = static_cast<const T*>(w);
  auto* bp = static_cast<const T*>(bias);
  auto* op = static_cast<T*>(out);
  switch (K) {
    case 2: conv_step_kernel<T, 2><<<grid, threads, 0, stream>>>(sp, xp, wp, bp, op, BC, C, silu); break;
    case 3: conv_step_kernel<T, 3><<<grid, threads, 0, stream>>>(sp, xp, wp, bp, op, BC, C, silu); break;
    case 4: conv_step_kernel<T, 4><<<grid, threads, 0, stream>>>(sp, xp, wp, bp, op, BC, C, silu); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t causal_conv1d_step(DType dtype, void* conv_state, const void* x_t, const void* weight,
                               const void* bias, void* out, int64_t batch, int64_t channels,
                               int kernel_size, bool silu, cudaStream_t stream) {
  if (batch < 0 || channels < 0 || channels > INT_MAX / 4 || kernel_size < 2 || kernel_size > 4)
    return cudaErrorInvalidValue;
  if (batch == 0 || channels == 0) return cudaSuccess;
  if (conv_state == nullptr || x_t == nullptr || weight == nullptr || out == nullptr)
    return cudaErrorInvalidValue;
  const int64_t BC = batch * channels;
  const int C = static_cast<int>(channels);
  switch (dtype) {
    case DType::f32: return conv_step_typed<float>(conv_state, x_t, weight, bias, out, BC, C, kernel_size, silu, stream);
    case DType::f16: return conv_step_typed<__half>(conv_state, x_t, weight, bias, out, BC, C, kernel_size, silu, stream);
    case DType::bf16: return conv_step_typed<__nv_bfloat16>(conv_state, x_t, weight, bias, out, BC, C, kernel_size, silu, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace peftfw::kernels::cuda
