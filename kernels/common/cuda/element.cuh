// Element-type helpers shared by the CUDA kernels: float <-> T conversion
// (round to nearest even), rounding through T, and aligned vector packs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace peftfw::kernels::cuda {

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

// The SSD's dt as ssd_dt computes it on a T tensor: every op rounds to T (softplus with beta 1,
// threshold 20; the clamp bounds converted to T). v = raw + bias and pre = softplus(v), before
// the clamp, are kept for the backward.
struct DtParts {
  float v, pre, dt;
};
template <typename T>
__device__ __forceinline__ DtParts ssd_dt_parts(float raw, float bias, float lo, float hi) {
  DtParts p;
  p.v = round_to<T>(__fadd_rn(raw, round_to<T>(bias)));
  p.pre = round_to<T>(p.v > 20.f ? p.v : log1pf(expf(p.v)));
  p.dt = isnan(p.pre) ? p.pre : fminf(fmaxf(p.pre, round_to<T>(lo)), round_to<T>(hi));  // already a T value
  return p;
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

// Calls f(T{}) for the dtype code (0 float32, 1 float16, 2 bfloat16) and returns its result;
// cudaErrorInvalidValue for any other code.
template <typename F>
inline cudaError_t by_dtype_code(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(__half{});
    case 2: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

// The current device's SM count, for grid-size heuristics (an H100's 132 if it cannot be read).
inline int sm_count() {
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

// The blocks of `kernel` (`threads` per block, no dynamic shared memory) that run at once on the
// current device: one wave, for kernels whose blocks stride over the rest of the work.
template <typename Kernel>
cudaError_t one_wave(Kernel kernel, int threads, int64_t* blocks) {
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  if (err != cudaSuccess) return err;
  *blocks = static_cast<int64_t>(sm_count()) * (per_sm > 0 ? per_sm : 1);
  return cudaSuccess;
}

// Sum over the 32 lanes of a warp (every lane gets the result).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Adds a thread's share acc[r][c] of an [Lc,Lc] matrix (rows warp + r*WARPS, columns
// lane + c*32) into out, lower triangle (l >= s) only; several blocks may add into one out.
template <int WARPS, int R, int S>
__device__ __forceinline__ void atomic_add_lower(float* out, int Lc, const float (&acc)[R][S], int warp, int lane) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < S; ++c) {
      const int l = warp + r * WARPS, s = lane + c * 32;
      if (l >= s) atomicAdd(&out[l * Lc + s], acc[r][c]);
    }
}

}  // namespace peftfw::kernels::cuda
