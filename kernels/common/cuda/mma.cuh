// Tensor-core tiles with their register layout known: ldmatrix loads from shared memory and
// mma.sync.m16n8k16 (16-bit inputs, float32 accumulation), with the fragment layouts of the
// PTX ISA ("Matrix Fragments for mma.m16n8k16"). With g = lane / 4 and t = lane % 4:
//   accumulator (16x8): c[0], c[1] at (row g, cols 2t, 2t + 1); c[2], c[3] at row g + 8;
//   A (16x16): four 32-bit registers, the 8x8 quarters (rows 0-7 | 8-15) x (cols 0-7 | 8-15)
//              in the order (0,0), (1,0), (0,1), (1,1);
//   B (16x8, k x n): two registers, k 0-7 and k 8-15.
// Unlike WMMA's opaque fragments, element-wise work, row and column sums can then run on the
// accumulators in registers, with no round trip through shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace peftfw::kernels::cuda {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices; lanes 8q..8q+7 give the row addresses of matrix q.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// The same, each matrix transposed on its way.
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// A tile (16 rows x 16 k) of a row-major shared matrix, `a` at its first element.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&r)[4], const T* a, int ld) {
  const int lane = threadIdx.x % 32;
  ldsm_x4(r, a + (lane % 16) * ld + (lane / 16) * 8);
}
// A tile whose source is stored transposed: rows are k, columns m (A(m, k) = at[k * ld + m]).
template <typename T>
__device__ __forceinline__ void load_a_t(uint32_t (&r)[4], const T* at, int ld) {
  const int lane = threadIdx.x % 32, q = lane / 8;
  ldsm_x4_t(r, at + (lane % 8 + 8 * (q / 2)) * ld + 8 * (q % 2));
}
// Two B tiles (16 k x 8 n each, n 0-7 in r[0..1] and n 8-15 in r[2..3]) from a shared matrix
// stored n-major (B(k, n) = bt[n * ld + k], k contiguous).
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&r)[4], const T* bt, int ld) {
  const int lane = threadIdx.x % 32, q = lane / 8;
  ldsm_x4(r, bt + (lane % 8 + 8 * (q / 2)) * ld + 8 * (q % 2));
}
// One B tile's k 0-31 (two k-steps: r[0..1] for k 0-15, r[2..3] for k 16-31) of 8 columns n
// from the same n-major storage.
template <typename T>
__device__ __forceinline__ void load_b_nk32(uint32_t (&r)[4], const T* bt, int ld) {
  const int lane = threadIdx.x % 32;
  ldsm_x4(r, bt + (lane % 8) * ld + 8 * (lane / 8));
}
// Two B tiles (n 0-7, n 8-15) from a shared matrix stored k-major (B(k, n) = b[k * ld + n]).
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&r)[4], const T* b, int ld) {
  const int lane = threadIdx.x % 32, q = lane / 8;
  ldsm_x4_t(r, b + (lane % 8 + 8 * (q % 2)) * ld + 8 * (q / 2));
}

// d += A B for one 16x8 accumulator; AB names the 16-bit input type in PTX ("bf16" or "f16").
#define PEFTFW_MMA_M16N8K16(AB)                                                                          \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
               "{%8,%9}, {%0,%1,%2,%3};\n"                                                              \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "16-bit inputs only");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    PEFTFW_MMA_M16N8K16("bf16");
  } else {
    PEFTFW_MMA_M16N8K16("f16");
  }
}
#undef PEFTFW_MMA_M16N8K16

// One k-step of a 16-row accumulator strip: acc[n] += A B_n for its NT 8-column tiles, B
// k-major at b (tile n's columns start at b + 8 n) or n-major at bt (tile n's rows at bt + 8 n ldb).
template <typename T, int NT, bool K_MAJOR>
__device__ __forceinline__ void mma_strip(float (&acc)[NT][4], const uint32_t (&a)[4], const T* b, int ldb) {
  static_assert(NT % 2 == 0, "B tiles are loaded in pairs");
#pragma unroll
  for (int n = 0; n < NT; n += 2) {
    uint32_t bf[4];
    if constexpr (K_MAJOR) load_b_kn(bf, b + n * 8, ldb);
    else load_b_nk(bf, b + n * 8 * ldb, ldb);
    mma16816<T>(acc[n], a, bf[0], bf[1]);
    mma16816<T>(acc[n + 1], a, bf[2], bf[3]);
  }
}
template <typename T, int NT>
__device__ __forceinline__ void mma_strip_kn(float (&acc)[NT][4], const uint32_t (&a)[4], const T* b, int ldb) {
  mma_strip<T, NT, true>(acc, a, b, ldb);
}
template <typename T, int NT>
__device__ __forceinline__ void mma_strip_nk(float (&acc)[NT][4], const uint32_t (&a)[4], const T* bt, int ldb) {
  mma_strip<T, NT, false>(acc, a, bt, ldb);
}

// Zeroes NT accumulator tiles.
template <int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
}

// Sum over the 4 lanes of an accumulator row (lanes 4g .. 4g + 3), and over the 8 lanes of a
// column (lanes t, t + 4, .., t + 28); every lane of the set gets the sum.
__device__ __forceinline__ float row_quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float col_sum8(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  return v + __shfl_xor_sync(0xffffffffu, v, 16);
}

// Within each quad (the 4 lanes of an accumulator row): lane t holds v[n], its 32-bit column
// pair of 8-column tile n (n < 4); afterwards it holds tile t's pairs from lanes 0..3 in order,
// i.e. 8 consecutive 16-bit values of the row, for one 16-byte store in place of four 4-byte
// ones. Every lane of the warp must take part.
__device__ __forceinline__ uint32_t pick4(const uint32_t (&v)[4], int i) {
  return i == 0 ? v[0] : i == 1 ? v[1] : i == 2 ? v[2] : v[3];
}
__device__ __forceinline__ void quad_transpose(uint32_t (&v)[4]) {
  const int t = threadIdx.x % 4;
  uint32_t got[4];  // got[j]: lane t ^ j's pair of tile t
  got[0] = pick4(v, t);
#pragma unroll
  for (int j = 1; j < 4; ++j) got[j] = __shfl_xor_sync(0xffffffffu, pick4(v, t ^ j), j);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = pick4(got, i ^ t);
}

// Stores one accumulator row's NT column pairs (o[n]: the pair of tile n, as 16-bit values)
// to row, whose tile n starts at row + 8 n: as 16-byte vectors through quad_transpose when NT
// is a multiple of 4 (row 16-byte aligned), else pair by pair. `live` may differ between the
// quads of a warp; every lane must call this.
template <typename T, int NT>
__device__ __forceinline__ void store_row_pairs(T* row, const uint32_t (&o)[NT], bool live) {
  const int t = threadIdx.x % 4;
  if constexpr (NT % 4 == 0) {
#pragma unroll
    for (int n0 = 0; n0 < NT; n0 += 4) {
      uint32_t v[4] = {o[n0], o[n0 + 1], o[n0 + 2], o[n0 + 3]};
      quad_transpose(v);
      if (live) *reinterpret_cast<uint4*>(row + (n0 + t) * 8) = make_uint4(v[0], v[1], v[2], v[3]);
    }
  } else {
#pragma unroll
    for (int n = 0; n < NT; ++n)
      if (live) *reinterpret_cast<uint32_t*>(row + n * 8 + 2 * t) = o[n];
  }
}

}  // namespace peftfw::kernels::cuda
