// The forward of the fused per-chunk SSD kernels (see ssd_chunk.hpp; shared machinery in
// ssd_chunk_common.cuh): the chunk states with their recurrence over chunks (states_pass) and
// the output (scan_fwd). The products run on mma.sync tiles of known register layout (mma.cuh).
#include "ssd_chunk_common.cuh"

namespace peftfw::kernels::mamba2::cuda {
namespace {

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

// The chunk states and their recurrence in one pass: a block owns head h of batch b and PS of its P rows of the state, walks the chunks in order and keeps
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

}  // namespace

bool ssd_chunk_supported(int64_t P, int64_t N, int dtype) {
  return (dtype == 1 || dtype == 2) && (P == 32 || P == 64) && (N == 64 || N == 128);
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

}  // namespace peftfw::kernels::mamba2::cuda
