// The gated MLP activation: out = silu(a) * b, where a and b are the two halves of the
// last dim of gu [R, 2I] (a = gu[:, :I], b = gu[:, I:]). Forward and backward, one pass
// each over memory; the backward writes both halves of dgu, so no gradient buffer is
// zero-filled and no split backward concatenates.
//
// Rounding follows the LibTorch composition silu(a) * b in T exactly:
//   s = T(silu(a)), out = T(s * b);
//   backward: ds = T(dout * b), da = T(ds * silu'(a)), db = T(dout * s).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "element.cuh"
#include "launch.hpp"

namespace peftfw::kernels::cuda {
namespace {

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

// Vector i of the [R, I] output: its row r and first column c.
template <int V>
__device__ __forceinline__ void locate(int64_t i, int64_t per_row, int64_t& r, int64_t& c) {
  r = i / per_row;
  c = (i - r * per_row) * V;
}

__device__ __forceinline__ float sigmoid_f(float a) { return 1.f / (1.f + expf(-a)); }

// One thread per V consecutive columns of one row; grid-strided.
template <typename T, int V>
__global__ void silu_mul_fwd_kernel(const T* __restrict__ gu, T* __restrict__ out, int64_t R,
                                    int64_t I) {
  const int64_t per_row = I / V, total = R * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r, c;
    locate<V>(i, per_row, r, c);
    const T* row = gu + r * 2 * I;
    const auto a = load_pack<T, V>(row + c), b = load_pack<T, V>(row + I + c);
    float o[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float af = Num<T>::to_f(a.v[k]);
      const float s = round_to<T>(af * sigmoid_f(af));
      o[k] = s * Num<T>::to_f(b.v[k]);
    }
    store_pack<T, V>(out + r * I + c, o);
  }
}

template <typename T, int V>
__global__ void silu_mul_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ gu,
                                    T* __restrict__ dgu, int64_t R, int64_t I) {
  const int64_t per_row = I / V, total = R * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r, c;
    locate<V>(i, per_row, r, c);
    const T* row = gu + r * 2 * I;
    const auto a = load_pack<T, V>(row + c), b = load_pack<T, V>(row + I + c);
    const auto g = load_pack<T, V>(dout + r * I + c);
    float da[V], db[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float af = Num<T>::to_f(a.v[k]), bf = Num<T>::to_f(b.v[k]);
      const float gf = Num<T>::to_f(g.v[k]);
      const float sig = sigmoid_f(af);
      const float s = round_to<T>(af * sig);
      const float ds = round_to<T>(gf * bf);
      da[k] = ds * (sig * (1.f + af * (1.f - sig)));
      db[k] = gf * s;
    }
    store_pack<T, V>(dgu + r * 2 * I + c, da);
    store_pack<T, V>(dgu + r * 2 * I + I + c, db);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned grid_for(int64_t total, int threads) {
  int64_t blocks = (total + threads - 1) / threads;
  const int64_t cap = 65535LL * 32;  // grid-stride beyond this
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

template <typename T>
cudaError_t launch(bool backward, const void* dout, const void* gu, void* out, int64_t R,
                   int64_t I, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const bool vec = I % V == 0 && aligned16(gu) && aligned16(out) && (dout == nullptr || aligned16(dout));
  auto run = [&](auto v_const) {
    constexpr int VV = decltype(v_const)::value;
    const unsigned grid = grid_for(R * (I / VV), kThreads);
    if (backward)
      silu_mul_bwd_kernel<T, VV><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(dout), static_cast<const T*>(gu), static_cast<T*>(out), R, I);
    else
      silu_mul_fwd_kernel<T, VV><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(gu),
                                                                static_cast<T*>(out), R, I);
    return cudaGetLastError();
  };
  if (vec) return run(std::integral_constant<int, V>{});
  return run(std::integral_constant<int, 1>{});
}

cudaError_t dispatch(DType dtype, bool backward, const void* dout, const void* gu, void* out,
                     int64_t R, int64_t I, cudaStream_t stream) {
  if (R < 0 || I < 1 || gu == nullptr || out == nullptr || (backward && dout == nullptr))
    return cudaErrorInvalidValue;
  if (R == 0) return cudaSuccess;
  switch (dtype) {
    case DType::f32: return launch<float>(backward, dout, gu, out, R, I, stream);
    case DType::f16: return launch<__half>(backward, dout, gu, out, R, I, stream);
    case DType::bf16: return launch<__nv_bfloat16>(backward, dout, gu, out, R, I, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t silu_mul_fwd(DType dtype, const void* gu, void* out, int64_t rows, int64_t inner,
                         cudaStream_t stream) {
  return dispatch(dtype, false, nullptr, gu, out, rows, inner, stream);
}

cudaError_t silu_mul_bwd(DType dtype, const void* dout, const void* gu, void* dgu, int64_t rows,
                         int64_t inner, cudaStream_t stream) {
  return dispatch(dtype, true, dout, gu, dgu, rows, inner, stream);
}

}  // namespace peftfw::kernels::cuda
