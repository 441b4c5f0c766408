// Element-type helpers shared by the CUDA kernels: float <-> T conversion
// (round to nearest even), rounding through T, and aligned vector packs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace peftfw::kernels::mamba2::cuda {

template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// Rounds a float to T and back (identity for float).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return Num<T>::to_f(Num<T>::from_f(v));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&o)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = Num<T>::from_f(o[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

}  // namespace peftfw::kernels::mamba2::cuda
