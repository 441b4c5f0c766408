// The selective scan's decoding step (scan.hpp): per channel (b, d), with dt = T(softplus(delta)),
//   state[n] = exp(dt A[n]) state[n] + dt u B[n];   y = (sum_n state[n] C[n] + D u) silu(z).
// G lanes (a power of two, up to 32) share a channel; lane g takes states g, g+G, ...
#include <climits>

#include "scan_common.cuh"

namespace peftfw::kernels::mamba1::cuda {
namespace {

using namespace scan_detail;

constexpr int kStepThreads = 256;

template <typename T, int G>
__global__ void __launch_bounds__(kStepThreads)
    scan_step_kernel(float* __restrict__ state, const T* __restrict__ u, const T* __restrict__ delta,
                     const T* __restrict__ z, const float* __restrict__ A_log, const T* __restrict__ Bm,
                     const T* __restrict__ Cm, const float* __restrict__ Dskip, float* __restrict__ y,
                     int64_t channels, int Dm, int N) {
  const int64_t ch = (static_cast<int64_t>(blockIdx.x) * kStepThreads + threadIdx.x) / G;
  const int g = threadIdx.x % G;
  const bool ok = ch < channels;  // every lane stays for the shuffles
  const int64_t b = ok ? ch / Dm : 0, d = ok ? ch % Dm : 0;
  float uv = 0.f, dt = 0.f;
  if (ok) {
    uv = Num<T>::to_f(u[ch]);
    dt = dt_of<T>(Num<T>::to_f(delta[ch]));
  }
  float acc = 0.f;
  if (ok) {
    float* st = state + ch * N;
    for (int n = g; n < N; n += G) {
      const float A2 = -__expf(A_log[d * N + n]) * kLog2e;
      const float h = fmaf(fast_exp2(dt * A2), st[n], dt * uv * Num<T>::to_f(Bm[b * N + n]));
      st[n] = h;
      acc = fmaf(h, Num<T>::to_f(Cm[b * N + n]), acc);
    }
  }
#pragma unroll
  for (int off = G / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (!ok || g != 0) return;
  if (Dskip != nullptr) acc = fmaf(Dskip[d], uv, acc);
  if (z != nullptr) {
    const float zv = Num<T>::to_f(z[ch]);
    acc *= zv * sigmoid_f(zv);
  }
  y[ch] = acc;
}

template <typename T, int G>
cudaError_t launch_step(float* state, const void* u, const void* delta, const void* z, const float* A_log,
                        const void* B, const void* C, const float* D, float* y, int64_t batch, int Dm, int N,
                        cudaStream_t stream) {
  const int64_t channels = batch * Dm;
  const int64_t blocks = (channels * G + kStepThreads - 1) / kStepThreads;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  scan_step_kernel<T, G><<<static_cast<unsigned>(blocks), kStepThreads, 0, stream>>>(
      state, static_cast<const T*>(u), static_cast<const T*>(delta), static_cast<const T*>(z), A_log,
      static_cast<const T*>(B), static_cast<const T*>(C), D, y, channels, Dm, N);
  return cudaGetLastError();
}

}  // namespace

cudaError_t selective_scan_step(DType dtype, float* state, const void* u, const void* delta, const void* z,
                                const float* A_log, const void* B, const void* C, const float* D, float* y,
                                int64_t batch, int64_t dim, int64_t state_dim, cudaStream_t stream) {
  if (batch < 0 || dim < 0 || state_dim < 1 || dim > INT_MAX || state_dim > INT_MAX) return cudaErrorInvalidValue;
  if (batch == 0 || dim == 0) return cudaSuccess;
  if (state == nullptr || u == nullptr || delta == nullptr || A_log == nullptr || B == nullptr || C == nullptr ||
      y == nullptr)
    return cudaErrorInvalidValue;
  const int Dm = static_cast<int>(dim), N = static_cast<int>(state_dim);
  return by_dtype_code(static_cast<int>(dtype), [&](auto t) {
    using T = decltype(t);
    if (N <= 4) return launch_step<T, 4>(state, u, delta, z, A_log, B, C, D, y, batch, Dm, N, stream);
    if (N <= 8) return launch_step<T, 8>(state, u, delta, z, A_log, B, C, D, y, batch, Dm, N, stream);
    if (N <= 16) return launch_step<T, 16>(state, u, delta, z, A_log, B, C, D, y, batch, Dm, N, stream);
    return launch_step<T, 32>(state, u, delta, z, A_log, B, C, D, y, batch, Dm, N, stream);
  });
}

}  // namespace peftfw::kernels::mamba1::cuda
