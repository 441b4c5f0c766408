// See ssd_masks.hpp. Thread layout for one [Lc,Lc] tile: 8 warps; warp w owns
// rows w, w+8, ...; lane j owns columns j, j+32, ... so each row is read
// coalesced and each row sum is one warp reduction.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../../common/cuda/element.cuh"
#include "ssd_masks.hpp"

namespace peftfw::kernels::mamba2::cuda {
using namespace ::peftfw::kernels::cuda;  // element.cuh
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kHeadsPerBlock = 8;  // backward: heads of one group handled by one block

// grid: (BC, H)
template <typename T, int Lc>
__global__ void build_kernel(const float* __restrict__ CB, const float* __restrict__ cum,
                             const int32_t* __restrict__ seg, T* __restrict__ M, int64_t G,
                             int64_t Hg) {
  __shared__ float s_cum[Lc];
  __shared__ int32_t s_seg[Lc];
  const int64_t bc = blockIdx.x, h = blockIdx.y, H = G * Hg, g = h / Hg;
  for (int i = threadIdx.x; i < Lc; i += kThreads) {
    s_cum[i] = cum[(bc * H + h) * Lc + i];
    s_seg[i] = seg[bc * Lc + i];
  }
  __syncthreads();
  const float* cb = CB + (bc * G + g) * Lc * Lc;
  T* out = M + (bc * H + h) * Lc * Lc;
  for (int i = threadIdx.x; i < Lc * Lc; i += kThreads) {
    const int l = i / Lc, s = i % Lc;
    float v = 0.f;
    if (l >= s && s_seg[l] == s_seg[s]) v = cb[i] * __expf(s_cum[l] - s_cum[s]);
    out[i] = Num<T>::from_f(v);
  }
}

// grid: (BC, G * ceil(Hg / kHeadsPerBlock))
template <typename T, int Lc>
__global__ void backward_kernel(const T* __restrict__ dM, const float* __restrict__ CB,
                                const float* __restrict__ cum, const int32_t* __restrict__ seg,
                                float* __restrict__ dCB, float* __restrict__ dcum, int64_t G,
                                int64_t Hg) {
  constexpr int R = Lc / kWarps;  // rows per warp
  constexpr int S = Lc / 32;      // columns per lane
  __shared__ float s_cum[Lc];
  __shared__ int32_t s_seg[Lc];
  __shared__ float s_col[kWarps][Lc];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bc = blockIdx.x, H = G * Hg;
  const int64_t splits = (Hg + kHeadsPerBlock - 1) / kHeadsPerBlock;
  const int64_t g = blockIdx.y / splits;
  const int64_t h0 = g * Hg + (blockIdx.y % splits) * kHeadsPerBlock;
  const int64_t h1 = min(h0 + kHeadsPerBlock, (g + 1) * Hg);
  const float* cb = CB + (bc * G + g) * Lc * Lc;
  for (int i = threadIdx.x; i < Lc; i += kThreads) s_seg[i] = seg[bc * Lc + i];

  float acc[R][S];
  float cbv[R][S];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < S; ++c) {
      acc[r][c] = 0.f;
      cbv[r][c] = cb[(warp + r * kWarps) * Lc + lane + c * 32];
    }

  for (int64_t h = h0; h < h1; ++h) {
    __syncthreads();  // s_cum / s_col reuse
    for (int i = threadIdx.x; i < Lc; i += kThreads) s_cum[i] = cum[(bc * H + h) * Lc + i];
    __syncthreads();
    const T* dm = dM + (bc * H + h) * Lc * Lc;
    float col[S];
#pragma unroll
    for (int c = 0; c < S; ++c) col[c] = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int l = warp + r * kWarps;
      float row = 0.f;
#pragma unroll
      for (int c = 0; c < S; ++c) {
        const int s = lane + c * 32;
        if (l >= s && s_seg[l] == s_seg[s]) {
          const float dl = Num<T>::to_f(dm[l * Lc + s]) * __expf(s_cum[l] - s_cum[s]);
          acc[r][c] += dl;
          const float w = dl * cbv[r][c];
          row += w;
          col[c] += w;
        }
      }
      row = warp_sum(row);
      if (lane == 0) dcum[(bc * H + h) * Lc + l] = row;  // row sums first, column sums below
    }
#pragma unroll
    for (int c = 0; c < S; ++c) s_col[warp][lane + c * 32] = col[c];
    __syncthreads();
    for (int s = threadIdx.x; s < Lc; s += kThreads) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += s_col[w][s];
      dcum[(bc * H + h) * Lc + s] -= sum;  // the row sum of s was written above by warp s % 8
    }
  }
  atomic_add_lower<kWarps>(dCB + (bc * G + g) * Lc * Lc, static_cast<int>(Lc), acc, warp, lane);
}

// grid: (ceil(PN / kThreads), B * H); one thread per state element, looping over chunks.
template <typename T>
__global__ void state_passing_kernel(const T* __restrict__ S, const float* __restrict__ dec,
                                     const float* __restrict__ init, T* __restrict__ prev,
                                     float* __restrict__ final_state, int64_t nc, int64_t H, int64_t PN) {
  const int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (i >= PN) return;
  const int64_t bh = blockIdx.y, b = bh / H, h = bh % H;
  float state = init ? init[bh * PN + i] : 0.f;
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t at = ((b * nc + c) * H + h) * PN + i;
    prev[at] = Num<T>::from_f(state);
    state = dec[(b * nc + c) * H + h] * state + Num<T>::to_f(S[at]);
  }
  final_state[bh * PN + i] = state;
}

// grid: (ceil(PN / (kThreads * VEC)), B * H); VEC state elements per thread (PN a multiple of
// VEC; dH_off, prev and dS aligned to VEC elements). The reads of the next chunk (going
// backward) are in flight while this one's gradient is formed, and each warp adds its share of
// ddec by itself: no block-wide barrier in the loop.
template <typename T, int VEC>
__global__ void state_passing_backward_kernel(const T* __restrict__ dH_off, const float* __restrict__ dec,
                                              const float* __restrict__ dfinal, const T* __restrict__ prev,
                                              T* __restrict__ dS, float* __restrict__ ddec,
                                              float* __restrict__ dinit, int64_t nc, int64_t H, int64_t PN) {
  const int64_t i = (blockIdx.x * int64_t{kThreads} + threadIdx.x) * VEC;
  const bool live = i < PN;
  const int64_t bh = blockIdx.y, b = bh / H, h = bh % H;
  const int lane = threadIdx.x % 32;
  float g[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) g[v] = (live && dfinal) ? dfinal[bh * PN + i + v] : 0.f;
  auto at_of = [&](int64_t c) { return ((b * nc + c) * H + h) * PN + i; };
  Pack<T, VEC> pv, dv;
  if (live) {
    pv = *reinterpret_cast<const Pack<T, VEC>*>(prev + at_of(nc - 1));
    dv = *reinterpret_cast<const Pack<T, VEC>*>(dH_off + at_of(nc - 1));
  }
  for (int64_t c = nc - 1; c >= 0; --c) {
    const int64_t at = at_of(c);
    const float dc = dec[(b * nc + c) * H + h];
    Pack<T, VEC> pn, dn;  // chunk c - 1's
    if (live && c > 0) {
      pn = *reinterpret_cast<const Pack<T, VEC>*>(prev + at_of(c - 1));
      dn = *reinterpret_cast<const Pack<T, VEC>*>(dH_off + at_of(c - 1));
    }
    float part = 0.f;
    if (live) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) part += g[v] * Num<T>::to_f(pv.v[v]);
      store_pack<T, VEC>(dS + at, g);
#pragma unroll
      for (int v = 0; v < VEC; ++v) g[v] = Num<T>::to_f(dv.v[v]) + dc * g[v];
    }
    part = warp_sum(part);
    if (lane == 0) atomicAdd(&ddec[(b * nc + c) * H + h], part);
    pv = pn, dv = dn;
  }
  if (live && dinit) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) dinit[bh * PN + i + v] = g[v];
  }
}

template <template <typename, int> class Launch, typename... Args>
cudaError_t by_type_and_size(int dtype, int64_t Lc, Args&&... args) {
  auto go = [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    switch (Lc) {
      case 32: return Launch<T, 32>::run(args...);
      case 64: return Launch<T, 64>::run(args...);
      case 128: return Launch<T, 128>::run(args...);
      default: return cudaErrorInvalidValue;
    }
  };
  switch (dtype) {
    case 0: return go(float{});
    case 1: return go(__half{});
    case 2: return go(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, int Lc>
struct BuildLaunch {
  static cudaError_t run(const float* CB, const float* cum, const int32_t* seg, void* M, int64_t BC,
                         int64_t G, int64_t Hg, cudaStream_t stream) {
    build_kernel<T, Lc><<<dim3(BC, G * Hg), kThreads, 0, stream>>>(CB, cum, seg, static_cast<T*>(M), G, Hg);
    return cudaGetLastError();
  }
};

template <typename T, int Lc>
struct BackwardLaunch {
  static cudaError_t run(const void* dM, const float* CB, const float* cum, const int32_t* seg,
                         float* dCB, float* dcum, int64_t BC, int64_t G, int64_t Hg,
                         cudaStream_t stream) {
    const int64_t splits = (Hg + kHeadsPerBlock - 1) / kHeadsPerBlock;
    backward_kernel<T, Lc><<<dim3(BC, G * splits), kThreads, 0, stream>>>(
        static_cast<const T*>(dM), CB, cum, seg, dCB, dcum, G, Hg);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t ssd_state_passing(int dtype, const void* S, const float* dec, const float* init, void* prev,
                              float* final_state, int64_t B, int64_t nc, int64_t H, int64_t PN,
                              cudaStream_t stream) {
  const dim3 grid((PN + kThreads - 1) / kThreads, B * H);
  return by_dtype_code(dtype, [&](auto tag) {
    using T = decltype(tag);
    state_passing_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(S), dec, init,
                                                           static_cast<T*>(prev), final_state, nc, H, PN);
    return cudaGetLastError();
  });
}

cudaError_t ssd_state_passing_backward(int dtype, const void* dH_off, const float* dec,
                                       const float* dfinal, const void* prev, void* dS, float* ddec,
                                       float* dinit, int64_t B, int64_t nc, int64_t H, int64_t PN,
                                       cudaStream_t stream) {
  return by_dtype_code(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 8;
    auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % (kVec * sizeof(T)) == 0; };
    const bool vec = PN % kVec == 0 && aligned(dH_off) && aligned(prev) && aligned(dS);
    auto go = [&](auto kernel, int64_t per_thread) {
      const dim3 grid((PN / per_thread + kThreads - 1) / kThreads, B * H);
      kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(dH_off), dec, dfinal, static_cast<const T*>(prev),
                                            static_cast<T*>(dS), ddec, dinit, nc, H, PN);
      return cudaGetLastError();
    };
    return vec ? go(state_passing_backward_kernel<T, kVec>, kVec) : go(state_passing_backward_kernel<T, 1>, 1);
  });
}

cudaError_t ssd_build_decay_cb(int out_dtype, const float* CB, const float* cum, const int32_t* seg,
                               void* M, int64_t BC, int64_t G, int64_t Hg, int64_t Lc,
                               cudaStream_t stream) {
  return by_type_and_size<BuildLaunch>(out_dtype, Lc, CB, cum, seg, M, BC, G, Hg, stream);
}

cudaError_t ssd_build_decay_cb_backward(int in_dtype, const void* dM, const float* CB,
                                        const float* cum, const int32_t* seg, float* dCB,
                                        float* dcum, int64_t BC, int64_t G, int64_t Hg, int64_t Lc,
                                        cudaStream_t stream) {
  return by_type_and_size<BackwardLaunch>(in_dtype, Lc, dM, CB, cum, seg, dCB, dcum, BC, G, Hg,
                                          stream);
}

}  // namespace peftfw::kernels::mamba2::cuda
