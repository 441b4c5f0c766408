// The machinery the fused per-chunk SSD kernels share (ssd_chunk_fwd.cu, ssd_chunk_bwd.cu,
// ssd_chunk_cb.cu; private to them): the block shape and the chunk / head split of the grid,
// the 16-bit shared tiles and their asynchronous copies, and the launch helpers. Every kernel
// runs 8 warps on one (batch*chunk) and one head or a few heads of a group; 16-bit tiles live
// in shared memory with rows padded by 8 elements (16 bytes) against bank conflicts, and the
// tensor-core products accumulate in float32. The notation follows ssd_fused.cpp.
#pragma once

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../../common/cuda/element.cuh"
#include "../../common/cuda/mma.cuh"
#include "ssd_chunk.hpp"

namespace peftfw::kernels::mamba2::cuda {
using namespace ::peftfw::kernels::cuda;  // element.cuh, mma.cuh
namespace {

constexpr int Lc = static_cast<int>(kSsdChunk);
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
static_assert(Lc == 16 * kWarps, "one 16-row tile per warp");

// Row length of a shared 16-bit tile W wide.
template <int W>
__host__ __device__ constexpr int ld16() { return W + 8; }

// The per-chunk kernels run a 1-D grid of (batch*chunk) x `inner` blocks with the inner index
// (a head, or a group's head split) fastest: the blocks resident together then work on the
// same few chunks, and the per-chunk operands every head reads (CB, B, C) stay in L2. (With the
// chunk fastest, a chunk's heads came a whole wave apart and CB was read from DRAM per head;
// bwd_diag with one head per block keeps that order, see there.)
struct Block {
  int64_t bc, b, c, t0;
  int64_t inner;  // the head (or head split) of this block
  int valid;      // positions of this chunk inside [0, T)
};
__device__ __forceinline__ Block block_of(const SsdChunkDims& d, int64_t inner, bool chunk_fastest = false) {
  Block k;
  const int64_t n_bc = d.B * d.nc;
  k.bc = chunk_fastest ? blockIdx.x % n_bc : blockIdx.x / inner;
  k.inner = chunk_fastest ? blockIdx.x / n_bc : blockIdx.x % inner;
  k.b = k.bc / d.nc;
  k.c = k.bc % d.nc;
  k.t0 = k.c * Lc;
  k.valid = static_cast<int>(min(static_cast<int64_t>(Lc), d.T - k.t0));
  return k;
}

// The heads [h0, h1) of one group that a block loops over, for a grid of (batch*chunk) x
// (G * ceil(Hg / hpb)) blocks.
struct Heads {
  Block k;
  int64_t g, h0, h1;
};
__device__ __forceinline__ Heads heads_of(const SsdChunkDims& d, int hpb, bool chunk_fastest = false) {
  const int64_t Hg = d.H / d.G, splits = (Hg + hpb - 1) / hpb;
  Heads r;
  r.k = block_of(d, d.G * splits, chunk_fastest);
  r.g = r.k.inner / splits;
  r.h0 = r.g * Hg + (r.k.inner % splits) * hpb;
  r.h1 = min(r.h0 + hpb, (r.g + 1) * Hg);
  return r;
}

// Tiles as asynchronous copies (cp.async, 16 bytes each; load_tile_async: dst[r][0..W) =
// src[r*stride + 0..W) for r < valid, zero-filled for valid <= r < ROWS, src rows 16-byte
// aligned): no registers hold the tile on its way, and the copies run while the thread
// goes on. They have landed after cp_async_wait(); a __syncthreads() after that makes the
// tile visible to the block.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool copy) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(copy ? 16 : 0));
}
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Smaller copies (4 or 8 bytes, through L1), and commit groups for copies that are waited for
// in stages: cp_async_wait_group<K>() returns once all but the K newest groups have landed.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool copy) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(BYTES), "r"(copy ? BYTES : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory"); }

template <typename T, int W, int ROWS = Lc>
__device__ void load_tile_async(T* dst, const T* src, int64_t stride, int valid) {
  constexpr int V = W / 8;
  for (int i = threadIdx.x; i < ROWS * V; i += kThreads) {
    const int r = i / V, v = i % V;
    cp_async16(dst + r * ld16<W>() + v * 8, r < valid ? src + r * stride + v * 8 : src, r < valid);
  }
}

// Two 16-bit values as one 32-bit mma.sync operand register, a in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  Pack<T, 2> pk;
  pk.v[0] = Num<T>::from_f(a);
  pk.v[1] = Num<T>::from_f(b);
  return *reinterpret_cast<const uint32_t*>(&pk);
}

// ---------------------------------------------------------------- launch

// Calls f(T{}, P, N) with P and N as std::integral_constant.
template <typename F>
cudaError_t by_shape(int dtype, int64_t P, int64_t N, F&& f) {
  auto with_type = [&](auto tag) -> cudaError_t {
    using I32 = std::integral_constant<int, 32>;
    using I64 = std::integral_constant<int, 64>;
    using I128 = std::integral_constant<int, 128>;
    if (P == 32 && N == 64) return f(tag, I32{}, I64{});
    if (P == 32 && N == 128) return f(tag, I32{}, I128{});
    if (P == 64 && N == 64) return f(tag, I64{}, I64{});
    if (P == 64 && N == 128) return f(tag, I64{}, I128{});
    return cudaErrorInvalidValue;
  };
  switch (dtype) {
    case 1: return with_type(__half{});
    case 2: return with_type(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

// A 1-D grid; past 2^31 - 1 blocks an empty one, whose launch fails (launch() reports it)
// instead of running a truncated grid.
inline dim3 grid_1d(int64_t blocks) {
  return dim3(blocks > std::numeric_limits<int32_t>::max() ? 0u : static_cast<unsigned>(blocks));
}

// Blocks of a grid over (batch*chunk) x (G * ceil(Hg / hpb)), for the kernels that loop over
// hpb heads of a group (heads_of on the device side).
inline int64_t head_blocks(const SsdChunkDims& d, int hpb) { return d.B * d.nc * d.G * ((d.H / d.G + hpb - 1) / hpb); }

// Heads per block for those kernels: the most of 8, 4, 2 (the per-group operands are read once
// for all of them) that gives at least one wave of 2 blocks per SM with its last wave at least
// 90% full on average (waves / ceil(waves) >= 0.9); else 1.
inline int heads_per_block(const SsdChunkDims& d) {
  const int64_t wave = 2 * sm_count();
  for (int hpb = 8; hpb > 1; hpb /= 2) {
    const int64_t blocks = head_blocks(d, hpb), waves = (blocks + wave - 1) / wave;
    if (blocks >= wave && 10 * blocks >= 9 * waves * wave) return hpb;
  }
  return 1;
}

// Every 16-bit tile is a multiple of 32 bytes long, so the float32 areas that
// follow them stay 32-byte aligned (their vector accesses need 16).
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, Args... args) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace
}  // namespace peftfw::kernels::mamba2::cuda
