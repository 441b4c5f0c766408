// See row_nll.hpp. One block of 256 threads per row. Forward: an online max / sum of
// exponentials per thread (8 logits per step when rows are 16-byte aligned), merged
// across the block; backward: exp(z - lse) - [v == target], times the scale, rounded once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "element.cuh"
#include "row_nll.hpp"

namespace peftfw::kernels::cuda {
namespace {

constexpr int kThreads = 256, kV = 8;

// (m, s) stands for s * exp(m): merging two keeps the larger exponent.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float M = fmaxf(m, m2);
  if (M == -INFINITY) return;  // both empty
  s = s * __expf(m - M) + s2 * __expf(m2 - M);
  m = M;
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) row_nll_fwd_kernel(const T* __restrict__ logits, int64_t ld,
                                                               const int64_t* __restrict__ targets,
                                                               int64_t vocab, float divisor,
                                                               float* __restrict__ loss,
                                                               float* __restrict__ lse) {
  const int64_t r = blockIdx.x;
  const T* row = logits + r * ld;
  float m = -INFINITY, s = 0.f;
  if (VEC) {
    for (int64_t c = threadIdx.x * kV; c < vocab; c += kThreads * kV) {
      const auto p = *reinterpret_cast<const Pack<T, kV>*>(row + c);
      float z[kV], pm = -INFINITY;
#pragma unroll
      for (int k = 0; k < kV; ++k) {
        z[k] = Num<T>::to_f(p.v[k]) / divisor;
        pm = fmaxf(pm, z[k]);
      }
      float ps = 0.f;
#pragma unroll
      for (int k = 0; k < kV; ++k) ps += __expf(z[k] - pm);
      merge(m, s, pm, ps);
    }
  } else {
    for (int64_t c = threadIdx.x; c < vocab; c += kThreads) merge(m, s, Num<T>::to_f(row[c]) / divisor, 1.f);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    merge(m, s, m2, s2);
  }
  __shared__ float sm[kThreads / 32], ss[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sm[warp] = m, ss[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) merge(m, s, sm[w], ss[w]);
    const float l = m + logf(s);
    const int64_t t = targets[r];
    lse[r] = l;
    loss[r] = t >= 0 && t < vocab ? l - Num<T>::to_f(row[t]) / divisor : NAN;
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) row_nll_bwd_kernel(const T* __restrict__ logits, int64_t ld,
                                                               const int64_t* __restrict__ targets,
                                                               const float* __restrict__ lse,
                                                               const float* __restrict__ scale,
                                                               int64_t vocab, float divisor,
                                                               T* __restrict__ dlogits) {
  const int64_t r = blockIdx.x, t = targets[r];
  const T* row = logits + r * ld;
  T* out = dlogits + r * vocab;
  const float l = lse[r], sc = *scale;
  if (VEC) {
    for (int64_t c = threadIdx.x * kV; c < vocab; c += kThreads * kV) {
      const auto p = *reinterpret_cast<const Pack<T, kV>*>(row + c);
      float o[kV];
#pragma unroll
      for (int k = 0; k < kV; ++k)
        o[k] = (__expf(Num<T>::to_f(p.v[k]) / divisor - l) - (c + k == t ? 1.f : 0.f)) * sc;
      store_pack<T, kV>(out + c, o);
    }
  } else {
    for (int64_t c = threadIdx.x; c < vocab; c += kThreads)
      out[c] = Num<T>::from_f((__expf(Num<T>::to_f(row[c]) / divisor - l) - (c == t ? 1.f : 0.f)) * sc);
  }
}

// Whether rows can be read 8 logits (16 or 32 bytes) at a time.
bool vector_rows(const void* p, int64_t ld, int64_t vocab, int elem) {
  return vocab % kV == 0 && ld % kV == 0 && reinterpret_cast<uintptr_t>(p) % (kV * elem) == 0;
}

}  // namespace

cudaError_t row_nll_fwd(int dtype, const void* logits, int64_t ld, const int64_t* targets, int64_t rows,
                        int64_t vocab, float divisor, float* loss, float* lse, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return by_dtype_code(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(logits);
    if (vector_rows(logits, ld, vocab, sizeof(T)))
      row_nll_fwd_kernel<T, true><<<rows, kThreads, 0, stream>>>(x, ld, targets, vocab, divisor, loss, lse);
    else
      row_nll_fwd_kernel<T, false><<<rows, kThreads, 0, stream>>>(x, ld, targets, vocab, divisor, loss, lse);
    return cudaGetLastError();
  });
}

cudaError_t row_nll_bwd(int dtype, const void* logits, int64_t ld, const int64_t* targets, const float* lse,
                        const float* scale, int64_t rows, int64_t vocab, float divisor, void* dlogits,
                        cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return by_dtype_code(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(logits);
    T* out = static_cast<T*>(dlogits);
    if (vector_rows(logits, ld, vocab, sizeof(T)) && reinterpret_cast<uintptr_t>(dlogits) % (kV * sizeof(T)) == 0)
      row_nll_bwd_kernel<T, true><<<rows, kThreads, 0, stream>>>(x, ld, targets, lse, scale, vocab, divisor, out);
    else
      row_nll_bwd_kernel<T, false><<<rows, kThreads, 0, stream>>>(x, ld, targets, lse, scale, vocab, divisor, out);
    return cudaGetLastError();
  });
}

}  // namespace peftfw::kernels::cuda
