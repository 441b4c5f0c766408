// See ssd_chunk.hpp. Every kernel runs 8 warps on one (batch*chunk) and one head or a
// few heads of a group; 16-bit tiles live in shared memory with rows padded by 8 elements
// (16 bytes) against bank conflicts, and the tensor-core products accumulate in float32:
// mma.sync tiles of known register layout (mma.cuh) in the v2 kernels, WMMA in the earlier
// chunk-state kernel. The notation follows ssd_fused.cpp.
#include <mma.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "element.cuh"
#include "mma.cuh"
#include "ssd_chunk.hpp"

namespace peftfw::kernels::mamba2::cuda {
namespace {

using namespace nvcuda;
constexpr int Lc = static_cast<int>(kSsdChunk);
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
static_assert(Lc == 16 * kWarps, "one 16-row tile per warp");

template <typename T>
using FragACol = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;
template <typename T>
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

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

// dst[r][0..W) = src[r*stride + 0..W) (times scale[r] when given) for r < valid,
// zero for valid <= r < ROWS. 16-byte vectors; src rows must be 16-byte aligned.
// All of a thread's loads are issued before its first store (latency hiding).
template <typename T, int W, int ROWS = Lc>
__device__ void load_tile(T* dst, const T* src, int64_t stride, int valid, const float* scale) {
  constexpr int V = W / 8, IT = (ROWS * V + kThreads - 1) / kThreads;
  Pack<T, 8> in[IT];
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int i = threadIdx.x + it * kThreads, r = i / V, v = i % V;
    if (i < ROWS * V && r < valid) in[it] = *reinterpret_cast<const Pack<T, 8>*>(src + r * stride + v * 8);
  }
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int i = threadIdx.x + it * kThreads, r = i / V, v = i % V;
    if (i >= ROWS * V) break;
    Pack<T, 8> out;
    if (r < valid) {
      if (scale) {
        const float sc = scale[r];
#pragma unroll
        for (int k = 0; k < 8; ++k) out.v[k] = Num<T>::from_f(Num<T>::to_f(in[it].v[k]) * sc);
      } else {
        out = in[it];
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) out.v[k] = Num<T>::from_f(0.f);
    }
    *reinterpret_cast<Pack<T, 8>*>(dst + r * ld16<W>() + v * 8) = out;
  }
}

// The same without the scale, as asynchronous copies (cp.async, 16 bytes each, zero-filled
// past `valid`): no registers hold the tile on its way, and the copies run while the thread
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

// The same from a float32 source (rounded to T).
template <typename T, int W>
__device__ void load_tile_f32(T* dst, const float* src, int64_t stride, int valid, const float* scale) {
  constexpr int V = W / 4, IT = Lc * V / kThreads;
  float4 in[IT];
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int i = threadIdx.x + it * kThreads, r = i / V, v = i % V;
    in[it] = r < valid ? *reinterpret_cast<const float4*>(src + r * stride + v * 4) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int it = 0; it < IT; ++it) {
    const int i = threadIdx.x + it * kThreads, r = i / V, v = i % V;
    const float sc = scale ? scale[r] : 1.f;
    const float o[4] = {in[it].x * sc, in[it].y * sc, in[it].z * sc, in[it].w * sc};
    store_pack<T, 4>(dst + r * ld16<W>() + v * 4, o);
  }
}

// Asks L2 for [p, p + bytes) ahead of its use (bytes a multiple of 16, p 16-byte aligned): a
// hint, no data reaches the thread. bwd_off issues it for the next head's operands, so that
// the loads at the top of that head find them in L2 rather than in DRAM. (The same in the
// output kernel and the within-chunk backward made them slower: 0.85 -> 0.92 and 1.86 ->
// 2.31 ms at 32x1280 on the H100.)
__device__ __forceinline__ void prefetch_l2(const void* p, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#endif
}
// The same for `rows` rows of `bytes` each, `stride` elements of T apart, one row per thread.
template <typename T>
__device__ __forceinline__ void prefetch_rows_l2(const T* p, int64_t stride, unsigned bytes, int rows) {
  for (int r = threadIdx.x; r < rows; r += kThreads) prefetch_l2(p + r * stride, bytes);
}

// Writes a 16x16 accumulator to a row-major T matrix in global memory through
// the warp's 16x16 float32 staging area.
template <typename T>
__device__ void store_acc(const Acc& acc, float* stage, T* dst, int64_t ld) {
  wmma::store_matrix_sync(stage, acc, 16, wmma::mem_row_major);
  __syncwarp();
  const int lane = threadIdx.x % 32, r = lane / 2, c0 = (lane % 2) * 8;
  float o[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) o[k] = stage[r * 16 + c0 + k];
  store_pack<T, 8>(dst + r * ld + c0, o);
  __syncwarp();
}

// ---------------------------------------------------------------- forward

template <typename T, int P, int N>
struct StatesFwd {
  static constexpr size_t smem() {
    return sizeof(T) * (Lc * ld16<P>() + Lc * ld16<N>()) + sizeof(float) * (kWarps * 256 + Lc);
  }
};

template <typename T, int P, int N>
__global__ void __launch_bounds__(kThreads, 2) states_fwd_kernel(SsdChunkDims d, const T* __restrict__ x,
                                                              const float* __restrict__ dt,
                                                              const float* __restrict__ Ld,
                                                              const T* __restrict__ Bm, T* __restrict__ S) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* stage = reinterpret_cast<float*>(smem);  // [8][256]
  T* us = reinterpret_cast<T*>(stage + kWarps * 256);  // [Lc][P+8]  dt Ld x
  T* bs = us + Lc * ld16<P>();                         // [Lc][N+8]
  float* scale = reinterpret_cast<float*>(bs + Lc * ld16<N>());  // [Lc]
  const Block k = block_of(d, d.H);
  const int64_t h = k.inner, g = h / (d.H / d.G);
  for (int l = threadIdx.x; l < Lc; l += kThreads)
    scale[l] = l < k.valid ? dt[(k.b * d.T + k.t0 + l) * d.H + h] * Ld[(k.bc * d.H + h) * Lc + l] : 0.f;
  __syncthreads();
  load_tile<T, P>(us, x + k.b * d.x_sb + k.t0 * d.x_st + h * P, d.x_st, k.valid, scale);
  load_tile<T, N>(bs, Bm + k.b * d.b_sb + k.t0 * d.b_st + g * N, d.b_st, k.valid, nullptr);
  __syncthreads();
  const int warp = threadIdx.x / 32;
  constexpr int TP = P / 16, TN = N / 16;
  T* out = S + (k.bc * d.H + h) * P * N;
  for (int tile = warp; tile < TP * TN; tile += kWarps) {
    const int i = tile / TN, j = tile % TN;
    Acc acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int kk = 0; kk < Lc / 16; ++kk) {
      FragACol<T> a;  // (p, s) = us[s][p]
      FragBRow<T> bf;
      wmma::load_matrix_sync(a, us + kk * 16 * ld16<P>() + i * 16, ld16<P>());
      wmma::load_matrix_sync(bf, bs + kk * 16 * ld16<N>() + j * 16, ld16<N>());
      wmma::mma_sync(acc, a, bf, acc);
    }
    store_acc(acc, stage + warp * 256, out + i * 16 * N + j * 16, N);
  }
}

template <typename T, int P, int N>
struct ScanFwd {
  static constexpr int kOut = P + 8;  // row length of a warp's float32 output tile (conflict-free float2 stores)
  static constexpr size_t smem() {
    return sizeof(float) * 3 * Lc + sizeof(int32_t) * Lc +
           sizeof(T) * (Lc * ld16<P>() + Lc * ld16<N>() + P * ld16<N>()) + sizeof(float) * kWarps * 16 * kOut;
  }
};

// Named barriers 1 + i, i < 4 (0 is __syncthreads'): two warps take part, one arriving (it goes
// on at once; its earlier shared-memory writes are then visible to the other) and one waiting.
// The barrier number is an immediate, so that the kernel reserves 5 barriers, not all 16.
template <bool ARRIVE>
__device__ __forceinline__ void pair_barrier(int i) {
#define PEFTFW_PAIR_BAR(ID)                                                  \
  if constexpr (ARRIVE) asm volatile("bar.arrive " #ID ", 64;\n" ::: "memory"); \
  else asm volatile("bar.sync " #ID ", 64;\n" ::: "memory")
  switch (i) {
    case 0: PEFTFW_PAIR_BAR(1); break;
    case 1: PEFTFW_PAIR_BAR(2); break;
    case 2: PEFTFW_PAIR_BAR(3); break;
    default: PEFTFW_PAIR_BAR(4); break;
  }
#undef PEFTFW_PAIR_BAR
}

// Two 16-bit values as one 32-bit mma.sync operand register, a in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  Pack<T, 2> pk;
  pk.v[0] = Num<T>::from_f(a);
  pk.v[1] = Num<T>::from_f(b);
  return *reinterpret_cast<const uint32_t*>(&pk);
}

// The decay-masked C.B of one 16x16 tile (rows l0 + 0..15, columns s0 + 0..15), built in
// registers as an mma.sync A fragment (mma.cuh's layout) instead of through shared memory:
// fetch() reads this lane's CB values (float32, from L2), build() applies
//   M[l][s] = CB[l][s] exp(cum_l - cum_s) col[s]  for s <= l in one segment, else 0
// and rounds to T once, as the within-chunk backward does for its M. The lane's two rows'
// scalars (Rows) stay the same along a row tile, so they are read once per tile, not per step.
struct DecayTile {
  struct Rows {
    float cum[2];
    int32_t seg[2];
    int l[2];
    __device__ __forceinline__ Rows(int l0, const float* s_cum, const int32_t* s_seg) {
      const int r = l0 + (threadIdx.x % 32) / 4;
#pragma unroll
      for (int i = 0; i < 2; ++i) l[i] = r + 8 * i, cum[i] = s_cum[r + 8 * i], seg[i] = s_seg[r + 8 * i];
    }
  };
  float2 cb[4];  // (row g, cols 2t..) (row g + 8, 2t..) (row g, 2t + 8..) (row g + 8, 2t + 8..)
  __device__ __forceinline__ void fetch(const float* cbm, int l0, int s0) {
    const int lane = threadIdx.x % 32, r = l0 + lane / 4, c = s0 + 2 * (lane % 4);
#pragma unroll
    for (int q = 0; q < 4; ++q)
      cb[q] = __ldg(reinterpret_cast<const float2*>(cbm + (r + 8 * (q % 2)) * Lc + c + 8 * (q / 2)));
  }
  template <typename T>
  __device__ __forceinline__ void build(uint32_t (&a)[4], const Rows& rows, int s0, const float* s_cum,
                                        const int32_t* s_seg, const float* col) const {
    const int c = s0 + 2 * (threadIdx.x % 32 % 4);
#pragma unroll
    for (int j = 0; j < 2; ++j) {  // column pair c + 8 j, for both rows
      const int s = c + 8 * j;
      const float2 cs = *reinterpret_cast<const float2*>(s_cum + s);
      const float2 sc = *reinterpret_cast<const float2*>(col + s);
      const int2 sg = *reinterpret_cast<const int2*>(s_seg + s);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int q = 2 * j + i, l = rows.l[i];
        const float m0 = (s <= l && sg.x == rows.seg[i]) ? cb[q].x * __expf(rows.cum[i] - cs.x) * sc.x : 0.f;
        const float m1 = (s + 1 <= l && sg.y == rows.seg[i]) ? cb[q].y * __expf(rows.cum[i] - cs.y) * sc.y : 0.f;
        a[q] = pack2<T>(m0, m1);
      }
    }
  }
};

// grid: (B*nc) x (G * ceil(Hg / hpb)); the block loops over its hpb heads of one group. The
// group's C is copied once per block, unscaled; each head's x and incoming state are copied
// unscaled too (cp.async). The scales go elsewhere: dt into M's columns (M' = M diag(dt), so
// M u = M' x), E onto the rows of the C prev^T accumulators before M' x joins them. M' never
// goes through shared memory: each warp builds its A fragments in registers from C.B (L2),
// one k-step ahead of the products (DecayTile). The products are mma.sync tiles (mma.cuh);
// their accumulators, with D x, go to y through a per-warp float32 tile, as whole rows.
template <typename T, int P, int N>
__global__ void __launch_bounds__(kThreads, 2) scan_fwd_kernel(SsdChunkDims d, const T* __restrict__ x,
                                                            const float* __restrict__ dt,
                                                            const float* __restrict__ cum,
                                                            const int32_t* __restrict__ seg,
                                                            const float* __restrict__ CB,
                                                            const float* __restrict__ E,
                                                            const T* __restrict__ Cm,
                                                            const T* __restrict__ prev,
                                                            const float* __restrict__ D, float* __restrict__ y,
                                                            int hpb) {
  constexpr int NT = P / 8;  // 8-column accumulator tiles of a row tile (all P columns)
  static_assert(NT % 2 == 0, "B tiles are loaded in pairs");
  extern __shared__ __align__(128) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);         // [Lc][P+8]   x
  T* cs = xs + Lc * ld16<P>();                // [Lc][N+8]   C (the group's, all heads)
  T* ps = cs + Lc * ld16<N>();                // [P][N+8]    prev
  float* s_cum = reinterpret_cast<float*>(ps + P * ld16<N>());
  float* s_dt = s_cum + Lc;
  float* s_E = s_dt + Lc;
  int32_t* s_seg = reinterpret_cast<int32_t*>(s_E + Lc);
  constexpr int kOut = ScanFwd<T, P, N>::kOut;
  float* my_out = reinterpret_cast<float*>(s_seg + Lc) + (threadIdx.x / 32) * 16 * kOut;  // [16][P+8]
  const Heads hs = heads_of(d, hpb);
  const Block& k = hs.k;
  const int64_t g = hs.g, h0 = hs.h0, h1 = hs.h1;
  load_tile_async<T, N>(cs, Cm + k.b * d.c_sb + k.t0 * d.c_st + g * N, d.c_st, k.valid);
  for (int l = threadIdx.x; l < Lc; l += kThreads) s_seg[l] = seg[k.bc * Lc + l];
  const float* cb = CB + (k.bc * d.G + g) * Lc * Lc;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;

  for (int64_t h = h0; h < h1; ++h) {
    __syncthreads();  // the previous head is done with xs, ps and the scalars
    const T* xb = x + k.b * d.x_sb + k.t0 * d.x_st + h * P;
    load_tile_async<T, P>(xs, xb, d.x_st, k.valid);
    load_tile_async<T, N, P>(ps, prev + (k.bc * d.H + h) * P * N, N, P);
    for (int l = threadIdx.x; l < Lc; l += kThreads) {
      s_cum[l] = cum[(k.bc * d.H + h) * Lc + l];
      s_E[l] = E[(k.bc * d.H + h) * Lc + l];
      s_dt[l] = l < k.valid ? dt[(k.b * d.T + k.t0 + l) * d.H + h] : 0.f;
    }
    cp_async_wait();
    __syncthreads();

    // M is lower triangular, so row tile i of M' x costs i + 1 k-steps. Row tiles p and 7 - p
    // (p = warp % 4) go to warps p ("low") and p + 4 ("high"), each over all P columns, so that
    // every M' tile is built once: the low warp takes tile p and tile 7 - p's first 4 - p
    // k-steps (a partial sum it hands over through the high warp's output tile), the high warp
    // tile 7 - p's C prev^T and its remaining k-steps. With C prev^T as 8 steps, that is 13 and
    // 12 steps a warp.
    const float Dh = D ? D[h] : 0.f;
    const int pair = warp % 4, split = kWarps / 2 - pair;
    const bool low = warp < kWarps / 2;
    float* pair_out = my_out + (low ? kWarps / 2 : 0) * 16 * kOut;  // the high warp's output tile
    float acc[NT][4];
    // acc += M' x over k-steps [k0, k1) of row tile rt; `cur` holds step k0's C.B already.
    auto decay_x = [&](int rt, int k0, int k1, DecayTile& cur) {
      const DecayTile::Rows rows(rt * 16, s_cum, s_seg);
#pragma unroll 1
      for (int kk = k0; kk < k1; ++kk) {
        DecayTile next;
        if (kk + 1 < k1) next.fetch(cb, rt * 16, (kk + 1) * 16);
        uint32_t a[4];
        cur.build<T>(a, rows, kk * 16, s_cum, s_seg, s_dt);
        mma_strip_kn<T, NT>(acc, a, xs + kk * 16 * ld16<P>(), ld16<P>());  // (s, p) = x[s][p]
        cur = next;
      }
    };
    if (low) {  // tile 7 - p's first k-steps, handed over
      DecayTile cur;
      cur.fetch(cb, (kWarps - 1 - pair) * 16, 0);
      zero_acc(acc);
      decay_x(kWarps - 1 - pair, 0, split, cur);
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n)
          *reinterpret_cast<float2*>(pair_out + (gr + 8 * r) * kOut + n * 8 + 2 * tq) =
              make_float2(acc[n][2 * r], acc[n][2 * r + 1]);
      pair_barrier<true>(pair);
    }
    const int rt = low ? pair : kWarps - 1 - pair, k0 = low ? 0 : split;
    DecayTile cur;
    cur.fetch(cb, rt * 16, k0 * 16);  // in flight during C prev^T
    zero_acc(acc);
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk) {  // C prev^T
      uint32_t a[4];
      load_a(a, cs + rt * 16 * ld16<N>() + kk * 16, ld16<N>());
      mma_strip_nk<T, NT>(acc, a, ps + kk * 16, ld16<N>());  // (n, p) = prev[p][n]
    }
    const int l0 = rt * 16 + gr;
    const float E0 = s_E[l0], E1 = s_E[l0 + 8];
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n][0] *= E0, acc[n][1] *= E0, acc[n][2] *= E1, acc[n][3] *= E1;
    decay_x(rt, k0, rt + 1, cur);
    if (!low) {  // + the low warp's first k-steps
      pair_barrier<false>(pair);
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const float2 v = *reinterpret_cast<const float2*>(my_out + (gr + 8 * r) * kOut + n * 8 + 2 * tq);
          acc[n][2 * r] += v.x, acc[n][2 * r + 1] += v.y;
        }
      __syncwarp();
    }
    // y = acc + D x, through the warp's own tile so that the stores to y are whole rows.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int l = l0 + 8 * r;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int p = n * 8 + 2 * tq;
        const Pack<T, 2> xv = *reinterpret_cast<const Pack<T, 2>*>(xs + l * ld16<P>() + p);
        *reinterpret_cast<float2*>(my_out + (gr + 8 * r) * kOut + p) =
            make_float2(acc[n][2 * r] + Dh * Num<T>::to_f(xv.v[0]), acc[n][2 * r + 1] + Dh * Num<T>::to_f(xv.v[1]));
      }
    }
    __syncwarp();
    constexpr int V = P / 4, RPI = 32 / V;  // float4s per row, rows per warp-wide step
#pragma unroll
    for (int i = 0; i < 16 / RPI; ++i) {
      const int r = i * RPI + lane / V, v = lane % V, l = rt * 16 + r;
      if (l < k.valid)
        *reinterpret_cast<float4*>(y + ((k.b * d.T + k.t0 + l) * d.H + h) * P + v * 4) =
            *reinterpret_cast<const float4*>(my_out + r * kOut + v * 4);
    }
  }
}

// The chunk states and their recurrence in one pass (a v2 kernel, peftfw/kernels/v2.hpp): a block owns
// head h of batch b and PS of its P rows of the state, walks the chunks in order and keeps
// the running state H in registers (float32, the mma.sync accumulators of mma.cuh; each warp
// owns 16 rows and N / WR columns of it):
//   prev[b,c,h] = H (rounded to T);  H = dec[b,c,h] H + (dt Ld x)_c^T B_c;  final[b,h] = H.
// S_c never reaches global memory, nor is it rounded to T before it is added. The next chunk's
// x, dt and Ld are on their way (cp.async, two buffers) while the block works on this one; x
// arrives unscaled and is scaled by dt Ld in shared memory. B (the group's, shared by all
// heads and read from L2) is copied at the top of its own step and waited for only after the
// scaling pass and the store of H_c.
template <typename T, int P, int N, int PS>
struct StatesPass {
  static constexpr int WR = kWarps / (PS / 16);  // warps per 16-row tile of the state
  static constexpr int NO = N / WR / 8;          // 8-column tiles per warp
  static constexpr size_t smem() {
    return sizeof(float) * 2 * 2 * Lc + sizeof(T) * (2 * Lc * ld16<PS>() + Lc * ld16<N>());
  }
};

template <typename T, int P, int N, int PS>
__global__ void __launch_bounds__(kThreads, 3) states_pass_kernel(SsdChunkDims d, const T* __restrict__ x,
                                                                  const float* __restrict__ dt,
                                                                  const float* __restrict__ Ld,
                                                                  const T* __restrict__ Bm,
                                                                  const float* __restrict__ dec,
                                                                  const float* __restrict__ init,
                                                                  T* __restrict__ prev,
                                                                  float* __restrict__ final_state) {
  using K = StatesPass<T, P, N, PS>;
  constexpr int NO = K::NO;
  static_assert(NO % 2 == 0, "B tiles are loaded in pairs");
  extern __shared__ __align__(128) unsigned char smem[];
  float* s_dt = reinterpret_cast<float*>(smem);     // [2][Lc]
  float* s_Ld = s_dt + 2 * Lc;                      // [2][Lc]
  T* stages = reinterpret_cast<T*>(s_Ld + 2 * Lc);  // 2 x [Lc][PS+8]  x, then dt Ld x
  T* bs = stages + 2 * Lc * ld16<PS>();             // [Lc][N+8]
  const int64_t b = blockIdx.x / d.H, h = blockIdx.x % d.H, g = h / (d.H / d.G), p0 = blockIdx.y * PS;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
  const int pt = warp / K::WR, n0 = (warp % K::WR) * NO * 8;  // this warp's rows pt*16.. and columns n0..
  // Offset of this lane's element pair (row gr + 8 r, columns of tile n) in a [P, N] state,
  // and in the [B, H, P, N] initial and final states.
  const int64_t lane0 = (p0 + pt * 16 + gr) * N + n0 + 2 * tq, state0 = (b * d.H + h) * P * N + lane0;

  auto valid_of = [&](int64_t c) { return static_cast<int>(min(static_cast<int64_t>(Lc), d.T - c * Lc)); };
  // Chunk c's x rows, dt and Ld into stage `buf`, zero past T, as one commit group.
  auto fetch = [&](int64_t c, int buf) {
    const int64_t t0 = c * Lc;
    const int valid = valid_of(c);
    load_tile_async<T, PS>(stages + buf * Lc * ld16<PS>(), x + b * d.x_sb + t0 * d.x_st + h * P + p0, d.x_st, valid);
    for (int l = threadIdx.x; l < Lc; l += kThreads) {
      const bool live = l < valid;
      cp_async<4>(s_dt + buf * Lc + l, live ? dt + (b * d.T + t0 + l) * d.H + h : dt, live);
      cp_async<4>(s_Ld + buf * Lc + l, live ? Ld + ((b * d.nc + c) * d.H + h) * Lc + l : Ld, live);
    }
    cp_async_commit();
  };

  float H[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float2 v = init ? *reinterpret_cast<const float2*>(init + state0 + 8 * r * N + n * 8) : make_float2(0.f, 0.f);
      H[n][2 * r] = v.x, H[n][2 * r + 1] = v.y;
    }
  fetch(0, 0);
  for (int64_t c = 0; c < d.nc; ++c) {
    const int buf = static_cast<int>(c & 1);
    const int64_t bc = b * d.nc + c;
    T* us = stages + buf * Lc * ld16<PS>();  // dt Ld x, once scaled below
    // bs and stage buf ^ 1 were last read by chunk c - 1's products, which every warp finished
    // before the barrier at the end of that step.
    load_tile_async<T, N>(bs, Bm + b * d.b_sb + c * Lc * d.b_st + g * N, d.b_st, valid_of(c));
    cp_async_commit();
    const bool more = c + 1 < d.nc;
    if (more) {
      fetch(c + 1, buf ^ 1);
      cp_async_wait_group<2>();  // chunk c's x has landed; B and c + 1's x may still be on their way
    } else {
      cp_async_wait_group<1>();
    }
    __syncthreads();
    {  // x -> dt Ld x in place, 8 elements per step
      constexpr int W = PS / 8;
      for (int i = threadIdx.x; i < Lc * W; i += kThreads) {
        const int l = i / W, v = i % W;
        const float sc = s_dt[buf * Lc + l] * s_Ld[buf * Lc + l];
        const Pack<T, 8> in = *reinterpret_cast<const Pack<T, 8>*>(us + l * ld16<PS>() + v * 8);
        float o[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) o[k] = Num<T>::to_f(in.v[k]) * sc;
        store_pack<T, 8>(us + l * ld16<PS>() + v * 8, o);
      }
    }
    T* out = prev + (bc * d.H + h) * P * N + lane0 - 2 * tq;  // H_c, the state entering chunk c
    const float dc = dec[bc * d.H + h];
    uint32_t o0[NO], o1[NO];
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      o0[n] = pack2<T>(H[n][0], H[n][1]), o1[n] = pack2<T>(H[n][2], H[n][3]);
#pragma unroll
      for (int e = 0; e < 4; ++e) H[n][e] *= dc;
    }
    store_row_pairs<T, NO>(out, o0, true);
    store_row_pairs<T, NO>(out + 8 * N, o1, true);
    if (more) cp_async_wait_group<1>();  // B has landed too (its wait hidden behind the pass above)
    else cp_async_wait_group<0>();
    __syncthreads();  // the scaled tile and B are in place
#pragma unroll 2
    for (int kk = 0; kk < Lc / 16; ++kk) {
      uint32_t a[4];  // (p, s) = us[s][p]
      load_a_t(a, us + kk * 16 * ld16<PS>() + pt * 16, ld16<PS>());
      mma_strip_kn<T, NO>(H, a, bs + kk * 16 * ld16<N>() + n0, ld16<N>());  // (s, n) = B[s][n]
    }
    __syncthreads();  // bs and stage buf are free
  }
#pragma unroll
  for (int n = 0; n < NO; ++n)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<float2*>(final_state + state0 + 8 * r * N + n * 8) = make_float2(H[n][2 * r], H[n][2 * r + 1]);
}

// --------------------------------------------------------------- backward

template <typename T, int P, int N>
struct BwdOff {
  static constexpr size_t smem() {
    return sizeof(float) * Lc + sizeof(T) * (Lc * ld16<P>() + Lc * ld16<N>() + P * ld16<N>());
  }
};

// A 16-bit pair operand register times s, rounded to T once (as a scaled tile in memory is).
template <typename T>
__device__ __forceinline__ uint32_t scale2(uint32_t v, float s) {
  Pack<T, 2> pk;
  *reinterpret_cast<uint32_t*>(&pk) = v;
  return pack2<T>(Num<T>::to_f(pk.v[0]) * s, Num<T>::to_f(pk.v[1]) * s);
}

// The cross-head products of the backward (dC's incoming-state part, dB's chunk-state part):
// acc, this warp's 16 rows of an [Lc, N] float32 matrix summed over a block's heads, += diag(s) A Bk
// with A the rows warp*16.. of the [Lc][K] tile a_s (row length lda), Bk the [K][N] tile b_s
// (k-major, row length ldb), and s the lane's two row scales (s0 for row gr, s1 for gr + 8),
// applied to A's registers when SCALED.
template <typename T, int K, int N, bool SCALED>
__device__ __forceinline__ void cross_rows(float (&acc)[N / 8][4], const T* a_s, int lda, const T* b_s, int ldb,
                                           float s0, float s1) {
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];  // (row gr, k 0-7) (row gr + 8, k 0-7) (row gr, k 8-15) (row gr + 8, k 8-15)
    load_a(a, a_s + warp * 16 * lda + kk * 16, lda);
    if constexpr (SCALED) {
      a[0] = scale2<T>(a[0], s0), a[1] = scale2<T>(a[1], s1);
      a[2] = scale2<T>(a[2], s0), a[3] = scale2<T>(a[3], s1);
    }
    mma_strip_kn<T, N / 8>(acc, a, b_s + kk * 16 * ldb, ldb);
  }
}

// Adds acc (as above) into out [Lc][N], rows below `valid`: several blocks (the head splits of
// a group) add into one matrix.
template <int N>
__device__ __forceinline__ void atomic_add_rows(float* out, const float (&acc)[N / 8][4], int valid) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int l = warp * 16 + gr + 8 * r;
    if (l >= valid) continue;
#pragma unroll
    for (int n = 0; n < N / 8; ++n) {
      float* dst = out + l * N + n * 8 + 2 * tq;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      atomicAdd(reinterpret_cast<float2*>(dst), make_float2(acc[n][2 * r], acc[n][2 * r + 1]));
#else
      atomicAdd(dst, acc[n][2 * r]);
      atomicAdd(dst + 1, acc[n][2 * r + 1]);
#endif
    }
  }
}

// Per (batch*chunk, hpb heads of a group), each head in turn: dyE = dy E (in shared memory
// only), dH_off = dyE^T C, the E part of the log-decay gradient dcum_E[l] = dyE_l . (C prev^T)_l,
// and dC's incoming-state part, dC[l] += dyE_l prev (summed over the heads in registers, then
// added to dC with atomics), on mma.sync tiles (mma.cuh).
template <typename T, int P, int N>
__global__ void __launch_bounds__(kThreads, 2) bwd_off_kernel(SsdChunkDims d, const float* __restrict__ dy,
                                                           const float* __restrict__ E,
                                                           const T* __restrict__ Cm,
                                                           const T* __restrict__ prev, T* __restrict__ dH_off,
                                                           float* __restrict__ dcum_E, float* __restrict__ dC,
                                                           int hpb) {
  constexpr int WP = kWarps / (P / 16);  // warps per 16-row tile of dH_off
  constexpr int NO = N / WP / 8;         // 8-column tiles of dH_off per warp
  constexpr int NT = P / 8;              // 8-column tiles of C prev^T per warp (all P)
  constexpr int PA = NO % 4 == 0 ? 2 : 1;  // passes over dH_off's columns
  constexpr int NOP = NO / PA;             // 8-column tiles per pass
  static_assert(NOP % 2 == 0 && NT % 4 == 0, "B tiles are loaded in pairs");
  extern __shared__ __align__(128) unsigned char smem[];
  T* dys = reinterpret_cast<T*>(smem);  // [Lc][P+8]  dy E
  T* cs = dys + Lc * ld16<P>();         // [Lc][N+8]
  T* ps = cs + Lc * ld16<N>();          // [P][N+8]
  float* s_E = reinterpret_cast<float*>(ps + P * ld16<N>());
  const Heads hs = heads_of(d, hpb);
  const Block& k = hs.k;
  const int64_t g = hs.g;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
  load_tile_async<T, N>(cs, Cm + k.b * d.c_sb + k.t0 * d.c_st + g * N, d.c_st, k.valid);
  float acc_c[N / 8][4];  // dC's rows warp*16.., summed over the heads
  zero_acc(acc_c);

  for (int64_t h = hs.h0; h < hs.h1; ++h) {
    __syncthreads();  // the previous head is done with dys, ps and s_E
    load_tile_async<T, N, P>(ps, prev + (k.bc * d.H + h) * P * N, N, P);
    for (int l = threadIdx.x; l < Lc; l += kThreads) s_E[l] = E[(k.bc * d.H + h) * Lc + l];
    const float* dyb = dy + ((k.b * d.T + k.t0) * d.H + h) * P;
    if (h + 1 < hs.h1) {
      prefetch_rows_l2(dyb + P, d.H * P, P * sizeof(float), k.valid);
      if (threadIdx.x == kThreads - 1) prefetch_l2(prev + (k.bc * d.H + h + 1) * P * N, P * N * sizeof(T));
    }
    __syncthreads();
    load_tile_f32<T, P>(dys, dyb, d.H * P, k.valid, s_E);
    cp_async_wait();
    __syncthreads();
    // dH_off = dyE^T C: rows p of tile warp / WP, columns n0 .. n0 + 8 NO, in PA passes of NOP
    // tiles (registers: dC's accumulators stay live throughout).
#pragma unroll 1
    for (int pass = 0; pass < PA; ++pass) {
      const int pt = warp / WP, n0 = (warp % WP) * NO * 8 + pass * NOP * 8;
      float acc[NOP][4];
      zero_acc(acc);
#pragma unroll 2
      for (int kk = 0; kk < Lc / 16; ++kk) {
        uint32_t a[4];  // (p, l) = dyE[l][p]
        load_a_t(a, dys + kk * 16 * ld16<P>() + pt * 16, ld16<P>());
        mma_strip_kn<T, NOP>(acc, a, cs + kk * 16 * ld16<N>() + n0, ld16<N>());  // (l, n) = C[l][n]
      }
      T* out = dH_off + (k.bc * d.H + h) * P * N + (pt * 16 + gr) * N + n0;
      uint32_t o0[NOP], o1[NOP];
#pragma unroll
      for (int n = 0; n < NOP; ++n) o0[n] = pack2<T>(acc[n][0], acc[n][1]), o1[n] = pack2<T>(acc[n][2], acc[n][3]);
      store_row_pairs<T, NOP>(out, o0, true);
      store_row_pairs<T, NOP>(out + 8 * N, o1, true);
    }
    {  // C prev^T on this warp's 16 rows, dotted with dyE's rows, in two passes of P / 2 columns
      const int l0 = warp * 16 + gr;
      float part[2] = {0.f, 0.f};
#pragma unroll 1
      for (int pass = 0; pass < 2; ++pass) {
        const int j0 = pass * (P / 2);
        float acc[NT / 2][4];
        zero_acc(acc);
#pragma unroll 2
        for (int kk = 0; kk < N / 16; ++kk) {
          uint32_t a[4];
          load_a(a, cs + warp * 16 * ld16<N>() + kk * 16, ld16<N>());
          mma_strip_nk<T, NT / 2>(acc, a, ps + j0 * ld16<N>() + kk * 16, ld16<N>());  // (n, p) = prev[p][n]
        }
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int n = 0; n < NT / 2; ++n) {
            const Pack<T, 2> v =
                *reinterpret_cast<const Pack<T, 2>*>(dys + (l0 + 8 * r) * ld16<P>() + j0 + n * 8 + 2 * tq);
            part[r] += Num<T>::to_f(v.v[0]) * acc[n][2 * r] + Num<T>::to_f(v.v[1]) * acc[n][2 * r + 1];
          }
      }
      part[0] = row_quad_sum(part[0]), part[1] = row_quad_sum(part[1]);
      if (tq == 0) {
        dcum_E[(k.bc * d.H + h) * Lc + l0] = part[0];
        dcum_E[(k.bc * d.H + h) * Lc + l0 + 8] = part[1];
      }
    }
    cross_rows<T, P, N, false>(acc_c, dys, ld16<P>(), ps, ld16<N>(), 1.f, 1.f);  // dC += dyE prev
  }
  atomic_add_rows<N>(dC + (k.bc * d.G + g) * Lc * N, acc_c, k.valid);
}

template <typename T, int P, int N>
struct BwdDb {
  static constexpr size_t smem() { return 2 * (sizeof(float) * 2 * Lc + sizeof(T) * (Lc * ld16<P>() + P * ld16<N>())); }
};

// dB's chunk-state part: per (batch*chunk, hpb heads of a group), dB[l] += dt_l Ld_l x_l dS
// summed over the heads (the backward of S = (dt Ld x)^T B), in registers and then added to dB
// with atomics. The next head's x, dS, dt and Ld are on their way (cp.async, two buffers) while
// the block works on this one.
template <typename T, int P, int N>
__global__ void __launch_bounds__(kThreads, 2) bwd_db_kernel(SsdChunkDims d, const T* __restrict__ x,
                                                          const float* __restrict__ dt,
                                                          const float* __restrict__ Ld,
                                                          const T* __restrict__ dS, float* __restrict__ dB,
                                                          int hpb) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* s_dt = reinterpret_cast<float*>(smem);     // [2][Lc]
  float* s_Ld = s_dt + 2 * Lc;                      // [2][Lc]
  T* xs = reinterpret_cast<T*>(s_Ld + 2 * Lc);      // 2 x [Lc][P+8]
  T* ds = xs + 2 * Lc * ld16<P>();                  // 2 x [P][N+8]
  const Heads hs = heads_of(d, hpb);
  const Block& k = hs.k;
  const int row = (threadIdx.x / 32) * 16 + (threadIdx.x % 32) / 4;  // this lane's rows: row, row + 8
  auto fetch = [&](int64_t h, int buf) {
    load_tile_async<T, P>(xs + buf * Lc * ld16<P>(), x + k.b * d.x_sb + k.t0 * d.x_st + h * P, d.x_st, k.valid);
    load_tile_async<T, N, P>(ds + buf * P * ld16<N>(), dS + (k.bc * d.H + h) * P * N, N, P);
    for (int l = threadIdx.x; l < Lc; l += kThreads) {
      const bool live = l < k.valid;
      cp_async<4>(s_dt + buf * Lc + l, live ? dt + (k.b * d.T + k.t0 + l) * d.H + h : dt, live);
      cp_async<4>(s_Ld + buf * Lc + l, Ld + (k.bc * d.H + h) * Lc + l, true);
    }
    cp_async_commit();
  };
  float acc[N / 8][4];
  zero_acc(acc);
  fetch(hs.h0, 0);
  for (int64_t h = hs.h0; h < hs.h1; ++h) {
    const int buf = static_cast<int>((h - hs.h0) & 1);
    if (h + 1 < hs.h1) {
      fetch(h + 1, buf ^ 1);  // buffer buf ^ 1 was freed by the barrier at the end of the last head
      cp_async_wait_group<1>();
    } else {
      cp_async_wait_group<0>();
    }
    __syncthreads();
    const float* sd = s_dt + buf * Lc;
    const float* sl = s_Ld + buf * Lc;
    cross_rows<T, P, N, true>(acc, xs + buf * Lc * ld16<P>(), ld16<P>(), ds + buf * P * ld16<N>(), ld16<N>(),
                              sd[row] * sl[row], sd[row + 8] * sl[row + 8]);
    __syncthreads();  // buffer buf is free
  }
  atomic_add_rows<N>(dB + (k.bc * d.G + hs.g) * Lc * N, acc, k.valid);
}

// The within-chunk backward on mma.sync tiles whose register layout is known (mma.cuh), so the
// dM element pass, the row and column sums of W, u . (Ld Q) and the epilogue all run on the
// accumulators in registers: no 16x16 staging through shared memory.
//   dM: warp w takes rows tiles p = w % 4 and 7 - p (9 lower-triangle tiles between them) and
//       column half w / 4 (8 of each tile's 16 columns);
//   du: warp w takes row tiles 7 - w % 4 and w % 4, half of the P columns each ("jobs").
template <typename T, int P, int N>
struct BwdDiag {
  static constexpr int NH = N / 2;  // the state is read in two halves for Q
  static constexpr int kTri = (Lc / 16) * (Lc / 16 + 1) / 2;
  static constexpr int kOwn = kTri / 4;  // half tiles per warp
  static constexpr size_t smem() {
    return sizeof(T) * (Lc * ld16<Lc>() + 2 * Lc * ld16<P>() + Lc * ld16<NH>() + P * ld16<NH>()) +
           sizeof(float) * (3 * Lc + 3 * kTri * 16 + 4 * Lc) + sizeof(int32_t) * Lc;
  }
};

template <typename T, int P, int N>
__global__ void __launch_bounds__(kThreads, 2)
    bwd_diag_kernel(SsdChunkDims d, const T* __restrict__ x, const float* __restrict__ dt,
                        const float* __restrict__ cum, const int32_t* __restrict__ seg,
                        const float* __restrict__ CB, const float* __restrict__ Ld, const T* __restrict__ Bm,
                        const float* __restrict__ dy, const T* __restrict__ dS, const float* __restrict__ D,
                        T* __restrict__ dx, float* __restrict__ ddt_u,
                        float* __restrict__ dcum, float* __restrict__ dLd, float* __restrict__ dCB,
                        float* __restrict__ dD, int hpb) {
  using K = BwdDiag<T, P, N>;
  constexpr int NH = K::NH, kOwn = K::kOwn;
  constexpr int NT = P / 16;  // 8-column accumulator tiles per du job (P / 2 columns)
  static_assert(Lc / 16 == kWarps && K::kTri % 4 == 0, "row-tile pairs (p, 7 - p) for 8 warps");
  static_assert(NT % 2 == 0, "B tiles are loaded in pairs");
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ms = reinterpret_cast<T*>(smem);  // [Lc][Lc+8]
  T* xs = Ms + Lc * ld16<Lc>();        // [Lc][P+8]  x (u = dt x: dt joins in the element passes)
  T* dys = xs + Lc * ld16<P>();        // [Lc][P+8]
  T* bq = dys + Lc * ld16<P>();        // [Lc][NH+8]  B, one half of the state (Ld joins on Q's rows)
  T* dq = bq + Lc * ld16<NH>();        // [P][NH+8]   dS, the same half
  float* s_cum = reinterpret_cast<float*>(dq + P * ld16<NH>());
  float* s_dt = s_cum + Lc;
  float* s_Ld = s_dt + Lc;
  float* s_rows = s_Ld + Lc;                  // [kTri][2][16] row sums of W per half tile
  float* s_cols = s_rows + 2 * K::kTri * 16;  // [kTri][16] column sums
  float* s_ddt = s_cols + K::kTri * 16;       // [2][Lc] du . x, per column half
  float* s_uq = s_ddt + 2 * Lc;               // [2][Lc] u . (Ld Q), per column half
  int32_t* s_seg = reinterpret_cast<int32_t*>(s_uq + 2 * Lc);

  const Heads hs = heads_of(d, hpb, hpb == 1);
  const Block& k = hs.k;
  const int64_t g = hs.g, h0 = hs.h0, h1 = hs.h1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gr = lane / 4, tq = lane % 4;  // accumulator row and column pair of this lane
  const int pair = warp % 4, nh = warp / 4;
  const float* cb = CB + (k.bc * d.G + g) * Lc * Lc;
  const T* bsrc = Bm + k.b * d.b_sb + k.t0 * d.b_st + g * N;

  // Half tile o of this warp: row tile `pair` has pair + 1 tiles, row tile 7 - pair the rest.
  auto tile_of = [&](int o, int& ti, int& tj) {
    if (o <= pair) ti = pair, tj = o;
    else ti = kWarps - 1 - pair, tj = o - pair - 1;
  };

  for (int l = threadIdx.x; l < Lc; l += kThreads) s_seg[l] = seg[k.bc * Lc + l];

  float acc_cb[kOwn][4];  // this lane's share of dCB on its half tiles, summed over the heads
  zero_acc(acc_cb);

  for (int64_t h = h0; h < h1; ++h) {
    const int64_t row = (k.bc * d.H + h) * Lc;
    __syncthreads();  // the previous head is done with every shared buffer
    const T* xb = x + k.b * d.x_sb + k.t0 * d.x_st + h * P;
    const float* dyb = dy + ((k.b * d.T + k.t0) * d.H + h) * P;
    load_tile_async<T, P>(xs, xb, d.x_st, k.valid);
    for (int l = threadIdx.x; l < Lc; l += kThreads) {
      const bool live = l < k.valid;
      cp_async<4>(s_cum + l, cum + row + l, true);
      cp_async<4>(s_Ld + l, Ld + row + l, true);
      cp_async<4>(s_dt + l, live ? dt + (k.b * d.T + k.t0 + l) * d.H + h : dt, live);
    }
    cp_async_commit();
    // The first half of B and dS for Q travel while dy is converted and M built.
    load_tile_async<T, NH, P>(dq, dS + (k.bc * d.H + h) * P * N, N, P);
    load_tile_async<T, NH>(bq, bsrc, d.b_st, k.valid);
    cp_async_commit();
    load_tile_f32<T, P>(dys, dyb, d.H * P, k.valid, nullptr);
    cp_async_wait_group<1>();
    __syncthreads();

    // dM = dy u^T on the lower-triangle half tiles; per element dML = dM * L goes into dCB and
    // W = dML * CB into the row and column sums (the log-decay gradient is rowsum - colsum).
    // The same decay factors give M = CB L itself, written here for M^T dy below: the half
    // tiles cover every tile that product reads (the lower triangle), zero above the diagonal.
#pragma unroll
    for (int o = 0; o < kOwn; ++o) {
      int ti, tj;
      tile_of(o, ti, tj);
      const int l0 = ti * 16 + gr, s0 = tj * 16 + nh * 8 + 2 * tq;
      const float2 cb0 = *reinterpret_cast<const float2*>(cb + l0 * Lc + s0);
      const float2 cb1 = *reinterpret_cast<const float2*>(cb + (l0 + 8) * Lc + s0);
      float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kk = 0; kk < P / 16; kk += 2) {
        uint32_t bx[4];  // (p, s) = x[s][p], k-steps kk and kk + 1
        load_b_nk32(bx, xs + (tj * 16 + nh * 8) * ld16<P>() + kk * 16, ld16<P>());
        uint32_t a0[4], a1[4];
        load_a(a0, dys + ti * 16 * ld16<P>() + kk * 16, ld16<P>());
        load_a(a1, dys + ti * 16 * ld16<P>() + (kk + 1) * 16, ld16<P>());
        mma16816<T>(c, a0, bx[0], bx[1]);
        mma16816<T>(c, a1, bx[2], bx[3]);
      }
      const float2 ct = *reinterpret_cast<const float2*>(s_cum + s0);
      const float2 dts = *reinterpret_cast<const float2*>(s_dt + s0);
      const int2 sg = *reinterpret_cast<const int2*>(s_seg + s0);
      const float cbv[4] = {cb0.x, cb0.y, cb1.x, cb1.y};
      float w[4], m[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int l = l0 + 8 * (e / 2), s = s0 + e % 2;
        const float cs = e % 2 ? ct.y : ct.x, dtv = e % 2 ? dts.y : dts.x;
        const int32_t ss = e % 2 ? sg.y : sg.x;
        const float L = (s <= l && ss == s_seg[l]) ? __expf(s_cum[l] - cs) : 0.f;
        const float dl = c[e] * dtv * L;
        acc_cb[o][e] += dl;
        w[e] = dl * cbv[e];
        m[e] = cbv[e] * L;
      }
      *reinterpret_cast<uint32_t*>(Ms + l0 * ld16<Lc>() + s0) = pack2<T>(m[0], m[1]);
      *reinterpret_cast<uint32_t*>(Ms + (l0 + 8) * ld16<Lc>() + s0) = pack2<T>(m[2], m[3]);
      const int t = ti * (ti + 1) / 2 + tj;
      const float r0 = row_quad_sum(w[0] + w[1]), r1 = row_quad_sum(w[2] + w[3]);
      const float q0 = col_sum8(w[0] + w[2]), q1 = col_sum8(w[1] + w[3]);
      if (tq == 0) {
        s_rows[(t * 2 + nh) * 16 + gr] = r0;
        s_rows[(t * 2 + nh) * 16 + gr + 8] = r1;
      }
      if (gr == 0) *reinterpret_cast<float2*>(s_cols + t * 16 + nh * 8 + 2 * tq) = make_float2(q0, q1);
    }

    // du = M^T dy + Ld Q with Q = B dS^T, one job (row tile rt, columns j0 .. j0 + P/2) after the
    // other, so that only one job's accumulators are live beside dCB's. The Q part goes first,
    // through B in two halves of the state (each job reads both), so that u . (Ld Q) (for dLd)
    // is read off the accumulators before M^T dy joins them. Then per element: dx = dt du + D dy,
    // and the row sums du . x (for ddt) and dy . x (dD).
    const float Dh = D ? D[h] : 0.f;
    float dD_part = 0.f;
#pragma unroll 1
    for (int job = 0; job < 2; ++job) {
      // The short job first: row tile 7 - pair (pair + 1 steps of M^T dy), then row tile pair
      // (8 - pair steps), each on one column half, the other warp of the pair on the other. The
      // barrier between the jobs then waits for at most 4 steps, not 8.
      const int rt = job == 0 ? kWarps - 1 - pair : pair, ch = job == 0 ? nh : 1 - nh, j0 = ch * (P / 2);
      const int s0 = rt * 16 + gr;
      float2 dyv[2][NT];  // the epilogue's dy (float32, from L2), on its way through the products
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float* src = dyb + (s0 + 8 * r) * d.H * P + j0 + 2 * tq;
#pragma unroll
        for (int n = 0; n < NT; ++n)
          dyv[r][n] = s0 + 8 * r < k.valid ? *reinterpret_cast<const float2*>(src + n * 8) : make_float2(0.f, 0.f);
      }
      float acc[NT][4];
      zero_acc(acc);
#pragma unroll 1
      for (int half = 0; half < 2; ++half) {
        if (job + half > 0) {  // the first half of the first job was fetched with x
          __syncthreads();     // every warp is done with the previous half
          load_tile_async<T, NH, P>(dq, dS + (k.bc * d.H + h) * P * N + half * NH, N, P);
          load_tile_async<T, NH>(bq, bsrc + half * NH, d.b_st, k.valid);
          cp_async_commit();
        }
        cp_async_wait_group<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < NH / 16; ++kk) {
          uint32_t a[4];
          load_a(a, bq + rt * 16 * ld16<NH>() + kk * 16, ld16<NH>());
          mma_strip_nk<T, NT>(acc, a, dq + j0 * ld16<NH>() + kk * 16, ld16<NH>());  // (n, p) = dS[p][n]
        }
      }
      {
        const float Ld0 = s_Ld[s0], Ld1 = s_Ld[s0 + 8];
        float uq0 = 0.f, uq1 = 0.f;
#pragma unroll
        for (int n = 0; n < NT; ++n) {  // Q's rows times Ld (B went in unscaled), and u . (Ld Q)
          const int p = j0 + n * 8 + 2 * tq;
          acc[n][0] *= Ld0, acc[n][1] *= Ld0, acc[n][2] *= Ld1, acc[n][3] *= Ld1;
          const Pack<T, 2> x0 = *reinterpret_cast<const Pack<T, 2>*>(xs + s0 * ld16<P>() + p);
          const Pack<T, 2> x1 = *reinterpret_cast<const Pack<T, 2>*>(xs + (s0 + 8) * ld16<P>() + p);
          uq0 += Num<T>::to_f(x0.v[0]) * acc[n][0] + Num<T>::to_f(x0.v[1]) * acc[n][1];
          uq1 += Num<T>::to_f(x1.v[0]) * acc[n][2] + Num<T>::to_f(x1.v[1]) * acc[n][3];
        }
        uq0 = row_quad_sum(uq0), uq1 = row_quad_sum(uq1);
        if (tq == 0) {
          s_uq[ch * Lc + s0] = uq0 * s_dt[s0];
          s_uq[ch * Lc + s0 + 8] = uq1 * s_dt[s0 + 8];
        }
      }
      for (int kk = rt; kk < Lc / 16; ++kk) {
        uint32_t a[4];  // (s, l) = M[l][s]
        load_a_t(a, Ms + kk * 16 * ld16<Lc>() + rt * 16, ld16<Lc>());
        mma_strip_kn<T, NT>(acc, a, dys + kk * 16 * ld16<P>() + j0, ld16<P>());  // (l, p) = dy[l][p]
      }
      float ddt[2] = {0.f, 0.f};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int s = s0 + 8 * r;
        const bool live = s < k.valid;
        const float dts = s_dt[s];
        uint32_t o[NT];
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const int p = j0 + n * 8 + 2 * tq;
          const Pack<T, 2> xv = *reinterpret_cast<const Pack<T, 2>*>(xs + s * ld16<P>() + p);  // zero past T
          const float2 dv = dyv[r][n];
          const float du0 = acc[n][2 * r], du1 = acc[n][2 * r + 1];
          const float x0 = Num<T>::to_f(xv.v[0]), x1 = Num<T>::to_f(xv.v[1]);
          ddt[r] += du0 * x0 + du1 * x1;
          dD_part += dv.x * x0 + dv.y * x1;
          o[n] = pack2<T>(dts * du0 + Dh * dv.x, dts * du1 + Dh * dv.y);
        }
        store_row_pairs<T, NT>(dx + ((k.b * d.T + k.t0 + s) * d.H + h) * P + j0, o, live);
      }
      ddt[0] = row_quad_sum(ddt[0]), ddt[1] = row_quad_sum(ddt[1]);
      if (tq == 0) {
        s_ddt[ch * Lc + s0] = ddt[0];
        s_ddt[ch * Lc + s0 + 8] = ddt[1];
      }
    }
    if (dD) {
      dD_part = warp_sum(dD_part);
      if (lane == 0) atomicAdd(&dD[h], dD_part);
    }
    __syncthreads();  // every partial sum is in place

    // Per position: the sums in a fixed order. Row sums of W come from the half tiles
    // (l/16, j <= l/16), column sums from (i >= s/16, s/16).
    for (int l = threadIdx.x; l < Lc; l += kThreads) {
      const int ti = l / 16, r = l % 16;
      float w = 0.f;
      for (int j = 0; j <= ti; ++j) {
        const int t = ti * (ti + 1) / 2 + j;
        w += s_rows[(t * 2) * 16 + r] + s_rows[(t * 2 + 1) * 16 + r];
      }
      for (int i = ti; i < Lc / 16; ++i) w -= s_cols[(i * (i + 1) / 2 + ti) * 16 + r];
      const float dld = s_uq[l] + s_uq[Lc + l];
      ddt_u[row + l] = s_ddt[l] + s_ddt[Lc + l];
      dLd[row + l] = dld;
      dcum[row + l] = w - dld;
    }
  }

  // dCB += this block's dML on its half tiles, lower triangle only.
  float* out = dCB + (k.bc * d.G + g) * Lc * Lc;
#pragma unroll
  for (int o = 0; o < kOwn; ++o) {
    int ti, tj;
    tile_of(o, ti, tj);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int l = ti * 16 + gr + 8 * (e / 2), s = tj * 16 + nh * 8 + 2 * tq + e % 2;
      if (s <= l) atomicAdd(&out[l * Lc + s], acc_cb[o][e]);
    }
  }
}

// ------------------------------------------------------------ C.B and its backward

template <typename T, int N>
struct CbFwd {
  static constexpr size_t smem() { return sizeof(T) * 2 * Lc * ld16<N>(); }
};

// CB[b,c,g] = C B^T over the chunk's positions, float32 (zero past T): per (batch*chunk,
// group), on mma.sync tiles; warp w owns rows 16 w .. 16 w + 15.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads, 2) cb_fwd_kernel(SsdChunkDims d, const T* __restrict__ Bm,
                                                          const T* __restrict__ Cm, float* __restrict__ CB) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* cs = reinterpret_cast<T*>(smem);  // [Lc][N+8]
  T* bs = cs + Lc * ld16<N>();         // [Lc][N+8]
  const Block k = block_of(d, d.G);
  const int64_t g = k.inner;
  load_tile_async<T, N>(cs, Cm + k.b * d.c_sb + k.t0 * d.c_st + g * N, d.c_st, k.valid);
  load_tile_async<T, N>(bs, Bm + k.b * d.b_sb + k.t0 * d.b_st + g * N, d.b_st, k.valid);
  cp_async_wait();
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
  float acc[Lc / 8][4];
  zero_acc(acc);
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    uint32_t a[4];
    load_a(a, cs + warp * 16 * ld16<N>() + kk * 16, ld16<N>());
    mma_strip_nk<T, Lc / 8>(acc, a, bs + kk * 16, ld16<N>());  // (n, s) = B[s][n]
  }
  float* out = CB + (k.bc * d.G + g) * Lc * Lc;
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int n = 0; n < Lc / 8; ++n)
      *reinterpret_cast<float2*>(out + (warp * 16 + gr + 8 * r) * Lc + n * 8 + 2 * tq) =
          make_float2(acc[n][2 * r], acc[n][2 * r + 1]);
}

// d += A B for one 16x8 tile on TF32 inputs (float32 registers, of which the tensor cores read
// the TF32 part): mma.m16n8k8, with g = lane / 4, t = lane % 4,
//   A: a[0] (row g, k t), a[1] (g + 8, t), a[2] (g, t + 4), a[3] (g + 8, t + 4);
//   B: b0 (k t, col g), b1 (k t + 4, col g); d as for m16n8k16.
__device__ __forceinline__ void mma1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// v as TF32 (round to nearest) and the TF32 part of the remainder: v ~ hi + lo to about 22 bits.
__device__ __forceinline__ void split_tf32(float v, uint32_t& hi, uint32_t& lo) {
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(hi) : "f"(v));
  const float rest = v - __uint_as_float(hi);
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(lo) : "f"(rest));
}

template <typename T, int N>
struct CbBwd {
  static constexpr int kLd = Lc + 8;  // float32 row length of the dCB tile (conflict-free both ways)
  static constexpr size_t smem() { return sizeof(float) * Lc * kLd + sizeof(T) * Lc * ld16<N>(); }
};

// The backward of CB = C B^T, with the kernels' cross-head parts added and the result written
// in the inputs' layout [B,T,G,N] (T, rows past T skipped): grid (batch*chunk*group) x 2,
//   y = 0: dC = dC_off + dCB B,     y = 1: dB = dB_S + dCB^T C.
// dCB is float32 and lower triangular (s <= l); the products run on TF32 tensor cores with dCB
// split into two TF32 terms (about 22 bits; B and C, 16-bit, are exact in TF32). Warp w takes
// row tiles w and 7 - w (the triangle gives them w + 1 and 8 - w k-tiles, or the reverse),
// each on half of the N columns.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads, 2) cb_bwd_kernel(SsdChunkDims d, const T* __restrict__ Bm,
                                                          const T* __restrict__ Cm, const float* __restrict__ dCB,
                                                          const float* __restrict__ dC_off,
                                                          const float* __restrict__ dB_S, T* __restrict__ dC,
                                                          T* __restrict__ dB) {
  using K = CbBwd<T, N>;
  constexpr int ld = K::kLd, NJ = N / 16;  // 8-column tiles per job (half of N)
  static_assert(NJ % 4 == 0, "16-byte stores of the rows");
  extern __shared__ __align__(128) unsigned char smem[];
  float* ds = reinterpret_cast<float*>(smem);    // [Lc][Lc+8]  dCB
  T* ms = reinterpret_cast<T*>(ds + Lc * ld);    // [Lc][N+8]   B (y = 0) or C (y = 1)
  const Block k = block_of(d, d.G);
  const int64_t g = k.inner, base = k.bc * d.G + g;
  const bool want_dC = blockIdx.y == 0;
  if (want_dC) load_tile_async<T, N>(ms, Bm + k.b * d.b_sb + k.t0 * d.b_st + g * N, d.b_st, k.valid);
  else load_tile_async<T, N>(ms, Cm + k.b * d.c_sb + k.t0 * d.c_st + g * N, d.c_st, k.valid);
  for (int i = threadIdx.x; i < Lc * Lc / 4; i += kThreads) {
    const int l = i / (Lc / 4), v = i % (Lc / 4);
    cp_async16(ds + l * ld + v * 4, dCB + base * Lc * Lc + l * Lc + v * 4, true);
  }
  cp_async_wait();
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
  const float* add = (want_dC ? dC_off : dB_S) + base * Lc * N;
  T* out = want_dC ? dC : dB;
#pragma unroll 1
  for (int job = 0; job < 2; ++job) {
    const int rt = job == 0 ? warp : kWarps - 1 - warp, j0 = job * (N / 2);
    // dC: rows l of tile rt, k = s <= l (tiles 0 .. rt); dB: rows s of tile rt, k = l >= s.
    const int k0 = want_dC ? 0 : rt * 16, k1 = want_dC ? rt * 16 + 16 : Lc;
    float acc[NJ][4];
    zero_acc(acc);
#pragma unroll 1
    for (int kb = k0; kb < k1; kb += 8) {
      float av[4];  // A(m, k) = dCB[m][k] for dC, dCB[k][m] for dB
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int m = rt * 16 + gr + 8 * (q % 2), kq = kb + tq + 4 * (q / 2);
        av[q] = want_dC ? ds[m * ld + kq] : ds[kq * ld + m];
      }
      uint32_t hi[4], lo[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) split_tf32(av[q], hi[q], lo[q]);
#pragma unroll
      for (int n = 0; n < NJ; ++n) {
        const int col = j0 + n * 8 + gr;  // B(k, col) = ms[k][col]
        const uint32_t b0 = __float_as_uint(Num<T>::to_f(ms[(kb + tq) * ld16<N>() + col]));
        const uint32_t b1 = __float_as_uint(Num<T>::to_f(ms[(kb + tq + 4) * ld16<N>() + col]));
        mma1688_tf32(acc[n], hi, b0, b1);
        mma1688_tf32(acc[n], lo, b0, b1);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int l = rt * 16 + gr + 8 * r;
      uint32_t o[NJ];
#pragma unroll
      for (int n = 0; n < NJ; ++n) {
        const float2 a2 = *reinterpret_cast<const float2*>(add + l * N + j0 + n * 8 + 2 * tq);
        o[n] = pack2<T>(acc[n][2 * r] + a2.x, acc[n][2 * r + 1] + a2.y);
      }
      store_row_pairs<T, NJ>(out + ((k.b * d.T + k.t0 + l) * d.G + g) * N + j0, o, l < k.valid);
    }
  }
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
dim3 grid_1d(int64_t blocks) {
  return dim3(blocks > std::numeric_limits<int32_t>::max() ? 0u : static_cast<unsigned>(blocks));
}

// Blocks of a grid over (batch*chunk) x (G * ceil(Hg / hpb)), for the kernels that loop over
// hpb heads of a group (heads_of on the device side).
int64_t head_blocks(const SsdChunkDims& d, int hpb) { return d.B * d.nc * d.G * ((d.H / d.G + hpb - 1) / hpb); }

// Heads per block for those kernels: the most of 8, 4, 2 (the per-group operands are read once
// for all of them) that gives at least one wave of 2 blocks per SM with its last wave at least
// 90% full on average (waves / ceil(waves) >= 0.9); else 1.
int heads_per_block(const SsdChunkDims& d) {
  const int64_t wave = 2 * sm_count();
  for (int hpb = 8; hpb > 1; hpb /= 2) {
    const int64_t blocks = head_blocks(d, hpb), waves = (blocks + wave - 1) / wave;
    if (blocks >= wave && 10 * blocks >= 9 * waves * wave) return hpb;
  }
  return 1;
}

// Every 16-bit tile is a multiple of 32 bytes long, so the float32 areas that
// follow them keep the 256-bit alignment WMMA needs.
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, Args... args) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace

bool ssd_chunk_supported(int64_t P, int64_t N, int dtype) {
  return (dtype == 1 || dtype == 2) && (P == 32 || P == 64) && (N == 64 || N == 128);
}

cudaError_t ssd_chunk_states_fwd(int dtype, const SsdChunkDims& d, const void* x, const float* dt,
                                 const float* Ld, const void* B, void* S, cudaStream_t stream) {
  return by_shape(dtype, d.P, d.N, [&](auto tag, auto p, auto n) {
    using T = decltype(tag);
    constexpr int P = decltype(p)::value, N = decltype(n)::value;
    return launch(states_fwd_kernel<T, P, N>, grid_1d(d.B * d.nc * d.H), StatesFwd<T, P, N>::smem(), stream, d,
                  static_cast<const T*>(x), dt, Ld, static_cast<const T*>(B), static_cast<T*>(S));
  });
}

cudaError_t ssd_chunk_states_pass(int dtype, const SsdChunkDims& d, const void* x, const float* dt,
                                  const float* Ld, const void* B, const float* dec, const float* init, void* prev,
                                  float* final_state, cudaStream_t stream) {
  // Rows of the state per block: all P unless that leaves under 2 blocks per SM.
  const int sms = sm_count();
  // At least two 8-column tiles of the state per warp: PS N >= 2048.
  int64_t ps = d.P;
  const int64_t min_ps = std::max<int64_t>(16, 2048 / d.N);
  while (ps > min_ps && d.B * d.H * (d.P / ps) < 2 * sms) ps /= 2;
  return by_shape(dtype, d.P, d.N, [&](auto tag, auto p, auto n) -> cudaError_t {
    using T = decltype(tag);
    constexpr int P = decltype(p)::value, N = decltype(n)::value;
    auto go = [&](auto rows) {
      constexpr int PS = decltype(rows)::value;
      return launch(states_pass_kernel<T, P, N, PS>, dim3(d.B * d.H, P / PS), StatesPass<T, P, N, PS>::smem(),
                    stream, d, static_cast<const T*>(x), dt, Ld, static_cast<const T*>(B), dec, init,
                    static_cast<T*>(prev), final_state);
    };
    if constexpr (N * 16 >= 2048) {
      if (ps == 16) return go(std::integral_constant<int, 16>{});
    }
    if constexpr (P >= 64) {
      if (ps == 32) return go(std::integral_constant<int, 32>{});
    }
    return go(std::integral_constant<int, P>{});
  });
}

cudaError_t ssd_chunk_scan_fwd(int dtype, const SsdChunkDims& d, const void* x, const float* dt,
                               const float* cum, const int32_t* seg, const float* CB, const float* E,
                               const void* C, const void* prev, const float* D, float* y,
                               cudaStream_t stream) {
  const int hpb = heads_per_block(d);
  return by_shape(dtype, d.P, d.N, [&](auto tag, auto p, auto n) {
    using T = decltype(tag);
    constexpr int P = decltype(p)::value, N = decltype(n)::value;
    return launch(scan_fwd_kernel<T, P, N>, grid_1d(head_blocks(d, hpb)), ScanFwd<T, P, N>::smem(), stream,
                  d, static_cast<const T*>(x), dt, cum, seg, CB, E, static_cast<const T*>(C),
                  static_cast<const T*>(prev), D, y, hpb);
  });
}

cudaError_t ssd_chunk_bwd_off(int dtype, const SsdChunkDims& d, const float* dy, const float* E,
                              const void* C, const void* prev, void* dH_off, float* dcum_E, float* dC,
                              cudaStream_t stream) {
  const int hpb = heads_per_block(d);
  return by_shape(dtype, d.P, d.N, [&](auto tag, auto p, auto n) {
    using T = decltype(tag);
    constexpr int P = decltype(p)::value, N = decltype(n)::value;
    return launch(bwd_off_kernel<T, P, N>, grid_1d(head_blocks(d, hpb)), BwdOff<T, P, N>::smem(), stream, d, dy, E,
                  static_cast<const T*>(C), static_cast<const T*>(prev), static_cast<T*>(dH_off), dcum_E, dC, hpb);
  });
}

cudaError_t ssd_chunk_cb(int dtype, const SsdChunkDims& d, const void* B, const void* C, float* CB,
                         cudaStream_t stream) {
  return by_shape(dtype, d.P, d.N, [&](auto tag, auto, auto n) {
    using T = decltype(tag);
    constexpr int N = decltype(n)::value;
    return launch(cb_fwd_kernel<T, N>, grid_1d(d.B * d.nc * d.G), CbFwd<T, N>::smem(), stream, d,
                  static_cast<const T*>(B), static_cast<const T*>(C), CB);
  });
}

cudaError_t ssd_chunk_cb_bwd(int dtype, const SsdChunkDims& d, const void* B, const void* C, const float* dCB,
                             const float* dC_off, const float* dB_S, void* dC, void* dB, cudaStream_t stream) {
  return by_shape(dtype, d.P, d.N, [&](auto tag, auto, auto n) {
    using T = decltype(tag);
    constexpr int N = decltype(n)::value;
    dim3 grid = grid_1d(d.B * d.nc * d.G);
    grid.y = 2;
    return launch(cb_bwd_kernel<T, N>, grid, CbBwd<T, N>::smem(), stream, d, static_cast<const T*>(B),
                  static_cast<const T*>(C), dCB, dC_off, dB_S, static_cast<T*>(dC), static_cast<T*>(dB));
  });
}

cudaError_t ssd_chunk_bwd_db(int dtype, const SsdChunkDims& d, const void* x, const float* dt, const float* Ld,
                             const void* dS, float* dB, cudaStream_t stream) {
  const int hpb = heads_per_block(d);
  return by_shape(dtype, d.P, d.N, [&](auto tag, auto p, auto n) {
    using T = decltype(tag);
    constexpr int P = decltype(p)::value, N = decltype(n)::value;
    return launch(bwd_db_kernel<T, P, N>, grid_1d(head_blocks(d, hpb)), BwdDb<T, P, N>::smem(), stream, d,
                  static_cast<const T*>(x), dt, Ld, static_cast<const T*>(dS), dB, hpb);
  });
}

cudaError_t ssd_chunk_bwd_diag(int dtype, const SsdChunkDims& d, const void* x, const float* dt,
                               const float* cum, const int32_t* seg, const float* CB, const float* Ld,
                               const void* B, const float* dy, const void* dS, const float* D, void* dx,
                               float* ddt_u, float* dcum, float* dLd, float* dCB, float* dD,
                               cudaStream_t stream) {
  // The block's heads share one dCB accumulation (fewer atomics).
  const int hpb = heads_per_block(d);
  return by_shape(dtype, d.P, d.N, [&](auto tag, auto p, auto n) {
    using T = decltype(tag);
    constexpr int P = decltype(p)::value, N = decltype(n)::value;
    return launch(bwd_diag_kernel<T, P, N>, grid_1d(head_blocks(d, hpb)), BwdDiag<T, P, N>::smem(), stream, d,
                  static_cast<const T*>(x), dt, cum, seg, CB, Ld, static_cast<const T*>(B), dy,
                  static_cast<const T*>(dS), D, static_cast<T*>(dx), ddt_u, dcum, dLd, dCB,
                  dD, hpb);
  });
}

}  // namespace peftfw::kernels::mamba2::cuda
