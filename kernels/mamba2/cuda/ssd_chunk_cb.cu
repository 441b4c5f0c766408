// C.B per chunk and group and its backward, for the fused per-chunk SSD kernels (see
// ssd_chunk.hpp; shared machinery in ssd_chunk_common.cuh): mma.sync tiles (mma.cuh) forward,
// TF32 tensor cores backward.
#include "ssd_chunk_common.cuh"

namespace peftfw::kernels::mamba2::cuda {
namespace {

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

}  // namespace

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

}  // namespace peftfw::kernels::mamba2::cuda
