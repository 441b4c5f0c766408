// The backward of the fused per-chunk SSD kernels (see ssd_chunk.hpp; shared machinery in
// ssd_chunk_common.cuh): the incoming-state term (bwd_off), dB's chunk-state part (bwd_db)
// and the within-chunk term with the chunk states (bwd_diag), on mma.sync tiles (mma.cuh).
#include "ssd_chunk_common.cuh"

namespace peftfw::kernels::mamba2::cuda {
namespace {

// dst[r][0..W) = T(src[r*stride + 0..W) (times scale[r] when given)) for r < valid, zero for
// valid <= r < Lc: a 16-bit tile from a float32 source.
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

}  // namespace

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
