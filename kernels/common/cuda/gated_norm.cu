// Gated RMSNorm over the last dim: forward and backward.
//
//   g    = float(y) * silu(float(z))          (g = float(y) without z)
//   rstd = rsqrt(mean(g^2) + eps)
//   out  = weight * Y(g * rstd)               (normalised value rounded to y's
//                                              type Y, then multiplied and
//                                              rounded to T)
//
// z's rows may be strided (z_ld elements apart: a view into the mixer's projection);
// y, out, dy and dz are contiguous. y (and dy) is either of the element type T of z, weight and out, or float32
// with T 16-bit (the Mamba mixer's float32 scan output gated by a 16-bit z:
// the norm then writes the 16-bit projection input directly).
//
// One block per row (the backward strides blocks over rows so that the weight
// gradient needs one atomicAdd per block per column). A thread owns NV vectors
// of VEC elements of the row (8/16-byte accesses) and keeps them in registers
// between the reduction and the output pass.
//
// Backward (the rounding of the normalised value is treated as identity):
//   n = g * rstd, dn = dout * weight
//   dg = rstd * (dn - n * mean(dn * n))
//   dy = dg * silu(z), dz = dg * y * silu'(z), dweight = sum_rows dout * Y(n)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "element.cuh"
#include "launch.hpp"

namespace peftfw::kernels::cuda {
namespace {

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_raw(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

constexpr int kMaxThreads = 512;
constexpr int kMaxPerThread = 16;  // NV * VEC elements held per thread
constexpr int kMaxDim = 8192;

// Sum over the block (blockDim.x a multiple of 32). `red` holds 33 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? red[lane] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) red[32] = v;
  }
  __syncthreads();
  return red[32];
}

// ---- forward ----------------------------------------------------------------
template <typename Y, typename T, int VEC, int NV>
__global__ void __launch_bounds__(kMaxThreads)
    rms_fwd_kernel(const Y* __restrict__ y, const T* __restrict__ z, const T* __restrict__ w,
                   T* __restrict__ out, float* __restrict__ rstd, int64_t R, int D, int64_t z_ld, float eps) {
  __shared__ float red[33];
  const int Dv = D / VEC;
  const float inv_d = 1.f / static_cast<float>(D);
  for (int64_t row = blockIdx.x; row < R; row += gridDim.x) {
    const int64_t base = row * D;
    float g[NV][VEC];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int iv = threadIdx.x + k * blockDim.x;
      if (iv < Dv) {
        const auto yp = load_raw<Y, VEC>(y + base + iv * VEC);
#pragma unroll
        for (int i = 0; i < VEC; ++i) g[k][i] = Num<Y>::to_f(yp.v[i]);
        if (z != nullptr) {
          const auto zp = load_raw<T, VEC>(z + row * z_ld + iv * VEC);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float zf = Num<T>::to_f(zp.v[i]);
            g[k][i] = g[k][i] * (zf / (1.f + expf(-zf)));
          }
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) ss = fmaf(g[k][i], g[k][i], ss);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) g[k][i] = 0.f;
      }
    }
    const float total = block_sum(ss, red);
    const float r = rsqrtf(total * inv_d + eps);
    if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int iv = threadIdx.x + k * blockDim.x;
      if (iv < Dv) {
        const auto wp = load_raw<T, VEC>(w + iv * VEC);
        float o[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i)
          o[i] = Num<T>::to_f(wp.v[i]) * round_to<Y>(g[k][i] * r);  // rounded to T by the store
        store_pack<T, VEC>(out + base + iv * VEC, o);
      }
    }
  }
}

// ---- backward ---------------------------------------------------------------
template <typename Y, typename T, int VEC, int NV>
__global__ void __launch_bounds__(kMaxThreads)
    rms_bwd_kernel(const T* __restrict__ dout, const Y* __restrict__ y, const T* __restrict__ z,
                   const T* __restrict__ w, const float* __restrict__ rstd, Y* __restrict__ dy,
                   T* __restrict__ dz, float* __restrict__ dweight, int64_t R, int D, int64_t z_ld) {
  __shared__ float red[33];
  const int Dv = D / VEC;
  const float inv_d = 1.f / static_cast<float>(D);

  float wv[NV][VEC], dw[NV][VEC];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int iv = threadIdx.x + k * blockDim.x;
    if (iv < Dv) {
      const auto wp = load_raw<T, VEC>(w + iv * VEC);
#pragma unroll
      for (int i = 0; i < VEC; ++i) wv[k][i] = Num<T>::to_f(wp.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) wv[k][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw[k][i] = 0.f;
  }

  for (int64_t row = blockIdx.x; row < R; row += gridDim.x) {
    const int64_t base = row * D;
    const float r = rstd[row];
    Pack<Y, VEC> yk[NV];
    Pack<T, VEC> zk[NV], gk[NV];
    float dot = 0.f;  // sum(dn * g)
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int iv = threadIdx.x + k * blockDim.x;
      if (iv < Dv) {
        yk[k] = load_raw<Y, VEC>(y + base + iv * VEC);
        gk[k] = load_raw<T, VEC>(dout + base + iv * VEC);
        if (z != nullptr) zk[k] = load_raw<T, VEC>(z + row * z_ld + iv * VEC);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          float g = Num<Y>::to_f(yk[k].v[i]);
          if (z != nullptr) {
            const float zf = Num<T>::to_f(zk[k].v[i]);
            g = g * (zf / (1.f + expf(-zf)));
          }
          dot = fmaf(Num<T>::to_f(gk[k].v[i]) * wv[k][i], g, dot);
        }
      }
    }
    const float c = block_sum(dot, red) * r * inv_d;  // mean(dn * n)
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int iv = threadIdx.x + k * blockDim.x;
      if (iv < Dv) {
        float oy[VEC], oz[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float yf = Num<Y>::to_f(yk[k].v[i]);
          const float go = Num<T>::to_f(gk[k].v[i]);
          float sz = 1.f, dsz = 0.f;  // silu(z), silu'(z)
          if (z != nullptr) {
            const float zf = Num<T>::to_f(zk[k].v[i]);
            const float e = expf(-zf);
            const float sig = 1.f / (1.f + e);
            sz = zf / (1.f + e);
            dsz = sig * (1.f + zf * (1.f - sig));
          }
          const float n = (yf * sz) * r;
          const float dg = r * (go * wv[k][i] - n * c);
          dw[k][i] = fmaf(go, round_to<Y>(n), dw[k][i]);
          oy[i] = dg * sz;
          oz[i] = dg * yf * dsz;
        }
        if (dy != nullptr) store_pack<Y, VEC>(dy + base + iv * VEC, oy);
        if (dz != nullptr && z != nullptr) store_pack<T, VEC>(dz + base + iv * VEC, oz);
      }
    }
  }

  if (dweight != nullptr) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int iv = threadIdx.x + k * blockDim.x;
      if (iv < Dv) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) atomicAdd(dweight + iv * VEC + i, dw[k][i]);
      }
    }
  }
}

// ---- launchers ----------------------------------------------------------------
bool aligned(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

struct Shape {
  int threads;
  int nv;  // 1, 2, 4, 8 or 16
};

Shape shape_for(int dv) {
  int threads = ((dv + 1) / 2 + 31) / 32 * 32;  // about two vectors per thread
  if (threads < 32) threads = 32;
  if (threads > kMaxThreads) threads = kMaxThreads;
  const int need = (dv + threads - 1) / threads;
  int nv = 1;
  while (nv < need) nv *= 2;
  return {threads, nv};
}

template <typename Y, typename T, int VEC, int NV>
cudaError_t launch_nv(bool backward, const void* dout, const void* y, const void* z,
                      const void* w, void* out, float* rstd_out, const float* rstd_in, void* dy,
                      void* dz, float* dweight, int64_t R, int D, int64_t z_ld, float eps, int threads,
                      cudaStream_t stream) {
  if constexpr (NV * VEC > kMaxPerThread) {
    return cudaErrorInvalidValue;  // not reachable for D <= kMaxDim
  } else {
    auto* yp = static_cast<const Y*>(y);
    auto* zp = static_cast<const T*>(z);
    auto* wp = static_cast<const T*>(w);
    if (!backward) {
      const int64_t grid = R < (1LL << 30) ? R : (1LL << 30);
      rms_fwd_kernel<Y, T, VEC, NV><<<static_cast<unsigned>(grid), threads, 0, stream>>>(
          yp, zp, wp, static_cast<T*>(out), rstd_out, R, D, z_ld, eps);
      return cudaGetLastError();
    }
    auto kernel = rms_bwd_kernel<Y, T, VEC, NV>;
    int64_t grid = R < (1LL << 30) ? R : (1LL << 30);
    if (dweight != nullptr) {
      // One wave of blocks: each strides over rows, keeping its weight
      // partials in registers, then one atomicAdd per column.
      int64_t wave = 0;
      const cudaError_t err = one_wave(kernel, threads, &wave);
      if (err != cudaSuccess) return err;
      if (wave < grid) grid = wave;
    }
    kernel<<<static_cast<unsigned>(grid), threads, 0, stream>>>(
        static_cast<const T*>(dout), yp, zp, wp, rstd_in, static_cast<Y*>(dy), static_cast<T*>(dz),
        dweight, R, D, z_ld);
    return cudaGetLastError();
  }
}

template <typename Y, typename T, int VEC>
cudaError_t launch_vec(bool backward, const void* dout, const void* y, const void* z,
                       const void* w, void* out, float* rstd_out, const float* rstd_in, void* dy,
                       void* dz, float* dweight, int64_t R, int D, int64_t z_ld, float eps,
                       cudaStream_t stream) {
  const Shape s = shape_for(D / VEC);
#define PEFTFW_RMS_NV(N)                                                                       \
  case N:                                                                                      \
    return launch_nv<Y, T, VEC, N>(backward, dout, y, z, w, out, rstd_out, rstd_in, dy, dz,    \
                                   dweight, R, D, z_ld, eps, s.threads, stream);
  switch (s.nv) {
    PEFTFW_RMS_NV(1)
    PEFTFW_RMS_NV(2)
    PEFTFW_RMS_NV(4)
    PEFTFW_RMS_NV(8)
    PEFTFW_RMS_NV(16)
    default: return cudaErrorInvalidValue;
  }
#undef PEFTFW_RMS_NV
}

template <typename Y, typename T>
cudaError_t launch_typed(bool backward, const void* dout, const void* y, const void* z,
                         const void* w, void* out, float* rstd_out, const float* rstd_in,
                         void* dy, void* dz, float* dweight, int64_t R, int D, int64_t z_ld,
                         float eps, cudaStream_t stream) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  constexpr int bytes = V * static_cast<int>(sizeof(T));
  constexpr int ybytes = V * static_cast<int>(sizeof(Y));
  const bool vec = D % V == 0 && aligned(y, ybytes) && aligned(z, bytes) && aligned(w, bytes) &&
                   aligned(out, bytes) && aligned(dout, bytes) && aligned(dy, ybytes) &&
                   aligned(dz, bytes) && (z == nullptr || (z_ld * static_cast<int64_t>(sizeof(T))) % bytes == 0);
  if (vec)
    return launch_vec<Y, T, V>(backward, dout, y, z, w, out, rstd_out, rstd_in, dy, dz, dweight,
                               R, D, z_ld, eps, stream);
  return launch_vec<Y, T, 1>(backward, dout, y, z, w, out, rstd_out, rstd_in, dy, dz, dweight, R,
                             D, z_ld, eps, stream);
}

cudaError_t dispatch(DType dtype, bool y_f32, bool backward, const void* dout, const void* y,
                     const void* z, const void* w, void* out, float* rstd_out,
                     const float* rstd_in, void* dy, void* dz, float* dweight, int64_t R, int D,
                     int64_t z_ld, float eps, cudaStream_t stream) {
  switch (dtype) {
    case DType::f32:
      return launch_typed<float, float>(backward, dout, y, z, w, out, rstd_out, rstd_in, dy, dz,
                                        dweight, R, D, z_ld, eps, stream);
    case DType::f16:
      if (y_f32)
        return launch_typed<float, __half>(backward, dout, y, z, w, out, rstd_out, rstd_in, dy,
                                           dz, dweight, R, D, z_ld, eps, stream);
      return launch_typed<__half, __half>(backward, dout, y, z, w, out, rstd_out, rstd_in, dy, dz,
                                          dweight, R, D, z_ld, eps, stream);
    case DType::bf16:
      if (y_f32)
        return launch_typed<float, __nv_bfloat16>(backward, dout, y, z, w, out, rstd_out,
                                                  rstd_in, dy, dz, dweight, R, D, z_ld, eps, stream);
      return launch_typed<__nv_bfloat16, __nv_bfloat16>(backward, dout, y, z, w, out, rstd_out,
                                                        rstd_in, dy, dz, dweight, R, D, z_ld, eps,
                                                        stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t gated_rms_norm_fwd(DType dtype, bool y_f32, const void* y, const void* z,
                               int64_t z_ld, const void* weight, void* out, float* rstd,
                               int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  if (rows < 0 || dim < 1 || dim > kMaxDim || (z != nullptr && z_ld < dim)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (y == nullptr || weight == nullptr || out == nullptr || rstd == nullptr)
    return cudaErrorInvalidValue;
  return dispatch(dtype, y_f32, false, nullptr, y, z, weight, out, rstd, nullptr, nullptr, nullptr,
                  nullptr, rows, static_cast<int>(dim), z_ld, eps, stream);
}

cudaError_t gated_rms_norm_bwd(DType dtype, bool y_f32, const void* dout, const void* y,
                               const void* z, int64_t z_ld, const void* weight, const float* rstd,
                               void* dy, void* dz, float* dweight, int64_t rows, int64_t dim,
                               cudaStream_t stream) {
  if (rows < 0 || dim < 1 || dim > kMaxDim || (z != nullptr && z_ld < dim)) return cudaErrorInvalidValue;
  if (z == nullptr) dz = nullptr;
  if (rows == 0 || (dy == nullptr && dz == nullptr && dweight == nullptr)) return cudaSuccess;
  if (dout == nullptr || y == nullptr || weight == nullptr || rstd == nullptr)
    return cudaErrorInvalidValue;
  return dispatch(dtype, y_f32, true, dout, y, z, weight, nullptr, nullptr, rstd, dy, dz, dweight, rows,
                  static_cast<int>(dim), z_ld, 0.f, stream);
}

}  // namespace peftfw::kernels::cuda
