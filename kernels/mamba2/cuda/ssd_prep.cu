// See ssd_prep.hpp. One block of 8 warps per (batch, chunk) and group of 8 heads; each warp
// takes one head, a lane holding 4 consecutive positions of the 128, and scans them with
// shuffles.
#include <cuda_runtime.h>

#include <algorithm>

#include "../../common/cuda/element.cuh"
#include "ssd_prep.hpp"

namespace peftfw::kernels::mamba2::cuda {
using namespace ::peftfw::kernels::cuda;  // element.cuh
namespace {

constexpr int Lc = static_cast<int>(kSsdPrepChunk), kWarps = 8, kPer = Lc / 32;
constexpr unsigned kFull = 0xffffffffu;

// In-place inclusive scan of the 128 values a warp holds (kPer consecutive ones per lane);
// returns the total to every lane. REVERSE scans from the end (v_l = sum_{k >= l}).
template <bool REVERSE, typename V>
__device__ __forceinline__ V warp_scan(V (&v)[kPer], int lane) {
  if (REVERSE) {
#pragma unroll
    for (int i = kPer - 2; i >= 0; --i) v[i] += v[i + 1];
  } else {
#pragma unroll
    for (int i = 1; i < kPer; ++i) v[i] += v[i - 1];
  }
  const V mine = REVERSE ? v[0] : v[kPer - 1];
  V s = mine;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const V n = REVERSE ? __shfl_down_sync(kFull, s, off) : __shfl_up_sync(kFull, s, off);
    if (REVERSE ? lane + off < 32 : lane >= off) s += n;
  }
  const V before = s - mine;  // the lanes before this one (after it, in reverse)
#pragma unroll
  for (int i = 0; i < kPer; ++i) v[i] += before;
  // The total as stored at the end position, so that e.g. cum_last - cum_127 is exactly 0.
  return REVERSE ? __shfl_sync(kFull, v[0], 0) : __shfl_sync(kFull, v[kPer - 1], 31);
}

__global__ void __launch_bounds__(kWarps * 32) chunk_prep_kernel(const float* __restrict__ dt,
                                                                 const float* __restrict__ A,
                                                                 const int64_t* __restrict__ seq, int64_t T,
                                                                 int64_t H, int64_t nc, int32_t* __restrict__ seg,
                                                                 float* __restrict__ cum, float* __restrict__ Ld,
                                                                 float* __restrict__ E, float* __restrict__ dec) {
  __shared__ int32_t s_seg[Lc];
  const int64_t bc = blockIdx.x, b = bc / nc, t0 = (bc % nc) * Lc;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, l0 = lane * kPer;
  if (warp == 0) {
    int32_t r[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t t = t0 + l0 + i;
      r[i] = (seq != nullptr && t > 0 && t < T && seq[b * T + t] != seq[b * T + t - 1]) ? 1 : 0;
    }
    warp_scan<false>(r, lane);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      s_seg[l0 + i] = r[i];
      if (blockIdx.y == 0) seg[bc * Lc + l0 + i] = r[i];
    }
  }
  __syncthreads();
  const int32_t seg_last = s_seg[Lc - 1];
  for (int64_t h = blockIdx.y * kWarps + warp; h < H; h += static_cast<int64_t>(gridDim.y) * kWarps) {
    const float a = A[h];
    float c[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t t = t0 + l0 + i;
      c[i] = t < T ? a * dt[(b * T + t) * H + h] : 0.f;
    }
    const float last = warp_scan<false>(c, lane);
    const int64_t o = (bc * H + h) * Lc + l0;
    float ld[kPer], e[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int32_t s = s_seg[l0 + i];
      ld[i] = s == seg_last ? __expf(last - c[i]) : 0.f;
      e[i] = s == 0 ? __expf(c[i]) : 0.f;
    }
    *reinterpret_cast<float4*>(cum + o) = make_float4(c[0], c[1], c[2], c[3]);
    *reinterpret_cast<float4*>(Ld + o) = make_float4(ld[0], ld[1], ld[2], ld[3]);
    *reinterpret_cast<float4*>(E + o) = make_float4(e[0], e[1], e[2], e[3]);
    if (lane == 0) dec[bc * H + h] = seg_last == 0 ? __expf(last) : 0.f;
  }
}

__global__ void __launch_bounds__(kWarps * 32) decay_grad_kernel(
    const float* __restrict__ dcum_E, const float* __restrict__ dcum_diag, const float* __restrict__ dLd,
    const float* __restrict__ ddec, const float* __restrict__ dec, const float* __restrict__ ddt_u,
    const float* __restrict__ dt, const float* __restrict__ A, int64_t T, int64_t H, int64_t nc,
    float* __restrict__ ddt, float* __restrict__ dA_part) {
  const int64_t bc = blockIdx.x, b = bc / nc, t0 = (bc % nc) * Lc;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, l0 = lane * kPer;
  for (int64_t h = blockIdx.y * kWarps + warp; h < H; h += static_cast<int64_t>(gridDim.y) * kWarps) {
    const int64_t o = (bc * H + h) * Lc + l0;
    const float4 ge = *reinterpret_cast<const float4*>(dcum_E + o);
    const float4 gd = *reinterpret_cast<const float4*>(dcum_diag + o);
    const float4 ll = *reinterpret_cast<const float4*>(dLd + o);
    float g[kPer] = {ge.x + gd.x, ge.y + gd.y, ge.z + gd.z, ge.w + gd.w};
    float sum_ld = ll.x + ll.y + ll.z + ll.w;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum_ld += __shfl_xor_sync(kFull, sum_ld, off);
    if (lane == 31) g[kPer - 1] += ddec[bc * H + h] * dec[bc * H + h] + sum_ld;
    warp_scan<true>(g, lane);
    const float a = A[h];
    const float4 du = *reinterpret_cast<const float4*>(ddt_u + o);
    const float dus[kPer] = {du.x, du.y, du.z, du.w};
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t t = t0 + l0 + i;
      if (t < T) {
        const int64_t at = (b * T + t) * H + h;
        ddt[at] = dus[i] + g[i] * a;
        part += g[i] * dt[at];
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) part += __shfl_xor_sync(kFull, part, off);
    if (lane == 0) dA_part[bc * H + h] = part;
  }
}

template <typename T>
__global__ void __launch_bounds__(256) dt_fwd_kernel(const T* __restrict__ raw, const float* __restrict__ bias,
                                                     const float* __restrict__ A_log, int64_t n, int64_t H,
                                                     float lo, float hi, float* __restrict__ dt,
                                                     float* __restrict__ A) {
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i0 < H) A[i0] = -__expf(A_log[i0]);
  for (int64_t i = i0; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dt[i] = ssd_dt_parts<T>(Num<T>::to_f(raw[i]), bias[i % H], lo, hi).dt;
  }
}

// Rows of [n / H, H] per block of the backward; each warp takes every 8th row and keeps its
// column sums in shared memory, summed over the warps in a fixed order at the end.
constexpr int kDtRows = 16;

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) dt_bwd_kernel(const float* __restrict__ g, const T* __restrict__ raw,
                                                             const float* __restrict__ bias,
                                                             const float* __restrict__ A_log,
                                                             const float* __restrict__ dA, int64_t n, int64_t H,
                                                             float lo, float hi, T* __restrict__ draw,
                                                             float* __restrict__ bias_part, float* __restrict__ dA_log) {
  extern __shared__ float s_part[];  // [kWarps][H]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows = n / H, r0 = static_cast<int64_t>(blockIdx.x) * kDtRows;
  const float lo_t = round_to<T>(lo), hi_t = round_to<T>(hi);  // the bounds as the clamp saw them
  for (int64_t h = lane; h < H; h += 32) s_part[warp * H + h] = 0.f;
  for (int64_t r = r0 + warp; r < min(r0 + kDtRows, rows); r += kWarps)
    for (int64_t h = lane; h < H; h += 32) {
      const int64_t i = r * H + h;
      const DtParts p = ssd_dt_parts<T>(Num<T>::to_f(raw[i]), bias[h], lo, hi);
      const float sig = p.v > 20.f ? 1.f : 1.f / (1.f + __expf(-p.v));
      const float d = (p.pre >= lo_t && p.pre <= hi_t) ? g[i] * sig : 0.f;  // clamp's backward
      draw[i] = Num<T>::from_f(d);
      s_part[warp * H + h] += d;
    }
  __syncthreads();
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += s_part[w * H + h];
    bias_part[blockIdx.x * H + h] = s;
    if (blockIdx.x == 0 && dA) dA_log[h] = -dA[h] * __expf(A_log[h]);
  }
}

// (batch*chunk) x (groups of kWarps heads, a warp each; at most 65535, the warps then stride).
dim3 head_grid(int64_t bc, int64_t H) {
  return dim3(static_cast<unsigned>(bc), static_cast<unsigned>(std::clamp<int64_t>((H + kWarps - 1) / kWarps, 1, 65535)));
}

}  // namespace

cudaError_t ssd_dt_fwd(int dtype, const void* raw, const float* bias, const float* A_log, int64_t n, int64_t H,
                       float lo, float hi, float* dt, float* A, cudaStream_t stream) {
  if (H == 0) return cudaSuccess;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((std::max(n, H) + 255) / 256, 8 * sm_count()));
  return by_dtype_code(dtype, [&](auto tag) {
    using T = decltype(tag);
    dt_fwd_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(static_cast<const T*>(raw), bias, A_log, n, H,
                                                                        lo, hi, dt, A);
    return cudaGetLastError();
  });
}

int64_t ssd_dt_blocks(int64_t n, int64_t H) { return std::max<int64_t>(1, (n / std::max<int64_t>(H, 1) + kDtRows - 1) / kDtRows); }

cudaError_t ssd_dt_bwd(int dtype, const float* g, const void* raw, const float* bias, const float* A_log,
                       const float* dA, int64_t n, int64_t H, float lo, float hi, void* draw, float* bias_part,
                       float* dA_log, cudaStream_t stream) {
  if (H == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * kWarps * H;
  return by_dtype_code(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = dt_bwd_kernel<T>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(ssd_dt_blocks(n, H)), kWarps * 32, smem, stream>>>(
        g, static_cast<const T*>(raw), bias, A_log, dA, n, H, lo, hi, static_cast<T*>(draw), bias_part, dA_log);
    return cudaGetLastError();
  });
}

cudaError_t ssd_chunk_prep(const float* dt, const float* A, const int64_t* seq, int64_t B, int64_t T, int64_t H,
                           int64_t nc, int32_t* seg, float* cum, float* Ld, float* E, float* dec,
                           cudaStream_t stream) {
  if (B * nc == 0) return cudaSuccess;
  chunk_prep_kernel<<<head_grid(B * nc, H), kWarps * 32, 0, stream>>>(dt, A, seq, T, H, nc, seg, cum, Ld, E,
                                                                             dec);
  return cudaGetLastError();
}

cudaError_t ssd_chunk_decay_grad(const float* dcum_E, const float* dcum_diag, const float* dLd, const float* ddec,
                                 const float* dec, const float* ddt_u, const float* dt, const float* A, int64_t B,
                                 int64_t T, int64_t H, int64_t nc, float* ddt, float* dA_part, cudaStream_t stream) {
  if (B * nc == 0) return cudaSuccess;
  decay_grad_kernel<<<head_grid(B * nc, H), kWarps * 32, 0, stream>>>(dcum_E, dcum_diag, dLd, ddec, dec,
                                                                             ddt_u, dt, A, T, H, nc, ddt, dA_part);
  return cudaGetLastError();
}

}  // namespace peftfw::kernels::mamba2::cuda
