// See lora_down.hpp. A block of 4 warps owns 16 rows of x; its warps take turns over the
// width in steps of 64 columns (warp w: steps w, w + 4, ...), so that the grid is M / 16
// blocks whatever K is, and each warp loads its next step before it works on the current
// one. A step: eight-element packs, the mask (one Philox call per pack), the optional copies,
// then the [16, 64] tile times A^T on the tensor cores (A's fragments come straight from
// global memory, where every warp reads the same few KB). The four partial products meet in
// shared memory and are summed in a fixed order.
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "element.cuh"
#include "lora_down.hpp"

namespace peftfw::kernels::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4, kRows = 16, kStep = 64, kLd = kStep + 8, kPacks = kRows * kStep / 8 / 32;
constexpr int kRegion = kRows * 64 * 4;  // bytes per warp: its [16, 64+8] tile, then its [16, R <= 64] float32 partial
static_assert(kRows * kLd * 2 <= kRegion, "a warp's tile fits its region");

// The host-side form of a draw: Philox key, the counter's offset words, keep threshold (on
// 16-bit words: p is applied at a resolution of 2^-16), scale.
struct Mask {
  uint32_t k0, k1, o0, o1, threshold;
  float scale;
  bool on;
};

Mask mask_of(const DropDraw& d) {
  Mask m{};
  m.on = d.p > 0.0;
  m.k0 = static_cast<uint32_t>(d.seed), m.k1 = static_cast<uint32_t>(d.seed >> 32);
  const uint64_t base = d.offset / 4;  // curand's counter for a skip-ahead of `offset` words
  m.o0 = static_cast<uint32_t>(base), m.o1 = static_cast<uint32_t>(base >> 32);
  m.threshold = static_cast<uint32_t>(std::min(65535.0, std::floor(d.p * 65536.0 + 0.5)));
  m.scale = m.on ? static_cast<float>(1.0 / (1.0 - d.p)) : 1.f;  // as at::native_dropout's
  return m;
}

// Philox4x32-10 (Salmon et al., SC'11).
__device__ __forceinline__ uint4 philox(uint32_t k0, uint32_t k1, uint4 c) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// Applies the mask to the 8 elements starting at flat index i (i % 8 == 0): one Philox call,
// a 16-bit word per element.
template <typename T>
__device__ __forceinline__ void apply_mask(const Mask& m, uint64_t i, Pack<T, 8>& p) {
  const uint64_t q = i >> 3;
  const uint4 w = philox(m.k0, m.k1, make_uint4(m.o0, m.o1, static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32)));
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t u = (words[j / 2] >> (16 * (j % 2))) & 0xFFFFu;
    p.v[j] = u >= m.threshold ? Num<T>::from_f(Num<T>::to_f(p.v[j]) * m.scale) : Num<T>::from_f(0.f);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const Pack<T, 8>& p) {
  *reinterpret_cast<Pack<T, 8>*>(dst) = p;
}

// The packs of step `step` of rows row0.. (zeros outside [0, M) x [0, K)).
template <typename T>
__device__ __forceinline__ void load_step(Pack<T, 8> (&v)[kPacks], const T* __restrict__ x, int64_t ld_x,
                                          int64_t M, int64_t K, int64_t row0, int64_t step, int lane) {
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {  // 8 lanes read one 128-byte row piece
    const int e = lane + 32 * i;
    const int64_t row = row0 + e / 8, col = step * kStep + (e % 8) * 8;
    if (row < M && col < K) {
      v[i] = *reinterpret_cast<const Pack<T, 8>*>(x + row * ld_x + col);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[i].v[j] = Num<T>::from_f(0.f);
    }
  }
}

template <typename T, int R>
__global__ void __launch_bounds__(kWarps * 32, 6) lora_down_kernel(const T* __restrict__ x, int64_t ld_x,
                                                                const T* __restrict__ A, int64_t M, int64_t K,
                                                                Mask mask, T* __restrict__ h, int64_t ld_h,
                                                                T* __restrict__ x_copy, int64_t ld_c,
                                                                T* __restrict__ x_dropped) {
  static_assert(kRows * R * 4 <= kRegion, "a warp's partial fits its region");
  __shared__ __align__(128) unsigned char regions[kWarps][kRegion];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows, steps = (K + kStep - 1) / kStep;
  T* tile = reinterpret_cast<T*>(regions[warp]);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[R / 16];
#pragma unroll
  for (int j = 0; j < R / 16; ++j) wmma::fill_fragment(acc[j], 0.f);

  Pack<T, 8> v[kPacks];
  if (warp < steps) load_step(v, x, ld_x, M, K, row0, warp, lane);
  for (int64_t step = warp; step < steps; step += kWarps) {
    Pack<T, 8> next[kPacks];
    if (step + kWarps < steps) load_step(next, x, ld_x, M, K, row0, step + kWarps, lane);
    const int64_t k0 = step * kStep;
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int e = lane + 32 * i, r = e / 8, c = (e % 8) * 8;
      const int64_t row = row0 + r, col = k0 + c;
      const bool inside = row < M && col < K;
      if (inside && x_copy) store8(x_copy + row * ld_c + col, v[i]);
      if (mask.on) apply_mask(mask, static_cast<uint64_t>(row * K + col), v[i]);
      if (inside && x_dropped) store8(x_dropped + row * K + col, v[i]);
      store8(tile + r * kLd + c, v[i]);
    }
    __syncwarp();
    for (int kk = 0; kk < kStep && k0 + kk < K; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, tile + kk, kLd);
#pragma unroll
      for (int j = 0; j < R / 16; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // (k, n) = A[n, k]
        wmma::load_matrix_sync(b, A + static_cast<int64_t>(j) * 16 * K + k0 + kk, static_cast<unsigned>(K));
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < kPacks; ++i) v[i] = next[i];
  }

  float* part = reinterpret_cast<float*>(regions[warp]);  // [16, R] float32
#pragma unroll
  for (int j = 0; j < R / 16; ++j) wmma::store_matrix_sync(part + j * 16, acc[j], R, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < kRows * R; e += kWarps * 32) {
    const int64_t row = row0 + e / R;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += reinterpret_cast<const float*>(regions[w])[e];
    if (row < M) h[row * ld_h + e % R] = Num<T>::from_f(sum);
  }
}

template <typename T>
__global__ void dropout_scale_kernel(T* __restrict__ g, int64_t packs, Mask mask) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    auto v = reinterpret_cast<Pack<T, 8>*>(g)[p];
    apply_mask(mask, static_cast<uint64_t>(p) * 8, v);
    reinterpret_cast<Pack<T, 8>*>(g)[p] = v;
  }
}

template <typename T, int R>
cudaError_t launch_down(const void* x, int64_t ld_x, const void* A, int64_t M, int64_t K, const Mask& m, void* h,
                        int64_t ld_h, void* x_copy, int64_t ld_c, void* x_dropped, cudaStream_t stream) {
  const int64_t blocks = (M + kRows - 1) / kRows;
  lora_down_kernel<T, R><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
      static_cast<const T*>(x), ld_x, static_cast<const T*>(A), M, K, m, static_cast<T*>(h), ld_h,
      static_cast<T*>(x_copy), ld_c, static_cast<T*>(x_dropped));
  return cudaGetLastError();
}

}  // namespace

bool lora_down_supported(int dtype, int64_t r, int64_t K) {
  return (dtype == 1 || dtype == 2) && (r == 16 || r == 32 || r == 48 || r == 64) && K % 16 == 0 && K > 0;
}

cudaError_t lora_down(int dtype, const void* x, int64_t ld_x, const void* A, int64_t r, int64_t M, int64_t K,
                      const DropDraw& drop, void* h, int64_t ld_h, void* x_copy, int64_t ld_c, void* x_dropped,
                      cudaStream_t stream) {
  if (!lora_down_supported(dtype, r, K)) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const Mask m = mask_of(drop);
  return by_dtype_code(dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;
    } else {
      switch (r) {
        case 16: return launch_down<T, 16>(x, ld_x, A, M, K, m, h, ld_h, x_copy, ld_c, x_dropped, stream);
        case 32: return launch_down<T, 32>(x, ld_x, A, M, K, m, h, ld_h, x_copy, ld_c, x_dropped, stream);
        case 48: return launch_down<T, 48>(x, ld_x, A, M, K, m, h, ld_h, x_copy, ld_c, x_dropped, stream);
        default: return launch_down<T, 64>(x, ld_x, A, M, K, m, h, ld_h, x_copy, ld_c, x_dropped, stream);
      }
    }
  });
}

cudaError_t dropout_scale(int dtype, void* g, int64_t M, int64_t K, const DropDraw& drop, cudaStream_t stream) {
  if ((dtype != 1 && dtype != 2) || K % 8 != 0) return cudaErrorInvalidValue;
  const Mask m = mask_of(drop);
  const int64_t packs = M * K / 8;
  if (packs == 0 || !m.on) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((packs + threads - 1) / threads, int64_t{16} * sm_count());
  return by_dtype_code(dtype, [&](auto t) -> cudaError_t {
    using T = decltype(t);
    dropout_scale_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(static_cast<T*>(g), packs, m);
    return cudaGetLastError();
  });
}

}  // namespace peftfw::kernels::cuda
