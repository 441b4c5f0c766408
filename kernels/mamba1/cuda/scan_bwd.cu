// The selective scan's backward (scan.hpp; layout and passes in scan_common.cuh).
//
// With a_t = exp(dt_t A) (0 at a reset), x_t = dt_t u_t B_t, h_t = a_t h_{t-1} + x_t,
// yc_t = sum_n h_t C_t + D u_t, y_t = yc_t silu(z_t) and dyc_t = dy_t silu(z_t), the adjoint
//   gh_t = dL/dh_t = dyc_t C_t + a_{t+1} gh_{t+1}        (gh_{T-1} gets dfinal too)
// gives, per token (sums over n inside a channel, over d across channels):
//   dz_t     = dy_t yc_t silu'(z_t)
//   du_t     = dyc_t D + dt_t sum_n gh_t B_t
//   ddt_t    = sum_n gh_t (A a_t h_{t-1} + u_t B_t);   ddelta = ddt softplus'(delta)
//   dB_t[n]  = sum_d gh_t dt_t u_t;   dC_t[n] = sum_d dyc_t h_t
//   dA_log   = A sum_{b,t} gh_t dt_t a_t h_{t-1};   dD = sum_{b,t} dyc_t u_t
//   dinitial = a_0 gh_0.
// scan_bwd_kernel walks its segment's chunks last to first, carrying the adjoint. For each
// chunk it walks forward from the saved chunk state to keep the state at every tile's start
// (shared memory), then takes the tiles last to first: recomputes the tile's states and decays
// (registers) and steps the adjoint back through them. With segments, scan_bwd_local first
// finds each segment's start adjoint from a zero end adjoint, and scan_bwd_combine turns those
// into the adjoint entering every segment from its right.
// For N <= kFastMaxState, fast_bwd_kernel and fast_bwd_local (below) replace them.
#include "scan_common.cuh"

#include <cstdint>

namespace peftfw::kernels::mamba1::cuda {
namespace scan_detail {
namespace {

constexpr int kBwdTile = 4;  // tokens per recomputed tile (divides kScanChunk)
constexpr int kTilesPerChunk = kScanChunk / kBwdTile;
static_assert(kScanChunk % kBwdTile == 0, "a chunk is whole tiles");

template <typename T, typename Cf>
__global__ void __launch_bounds__(Cf::kThreads) scan_bwd_kernel(Args a) {
  constexpr int NS = Cf::NS, S = Cf::S, L = kBwdTile, NP = NS * S, W = Cf::W;
  constexpr int CW = 32 / S;  // channels per warp
  __shared__ __align__(16) float sB[L][NP];
  __shared__ __align__(16) float sC[L][NP];
  __shared__ float sTS[kTilesPerChunk - 1][NS][Cf::kThreads];  // states at tile starts 1..
  __shared__ float sRed[2][W][L][NP];                           // dB, dC per warp

  const ScanProblem& p = a.p;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32, s = tid % S;
  const int d = blockIdx.x * Cf::CB + tid / S;
  const bool dv = d < a.Dm;
  const int seg = blockIdx.y, b = blockIdx.z;
  const int N = a.N, Dm = a.Dm;
  const int t0 = seg * a.seg_len, t1 = min(a.T, t0 + a.seg_len);
  const int64_t bT = static_cast<int64_t>(b) * a.T;
  const bool need_B = p.dB != nullptr, need_C = p.dC != nullptr;

  float A[NS], A2[NS], g[NS], dA[NS];
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const int n = s * NS + i;
    const bool ok = dv && n < N;
    A[i] = ok ? -__expf(p.A_log[static_cast<int64_t>(d) * N + n]) : 0.f;
    A2[i] = A[i] * kLog2e;
    dA[i] = 0.f;
    g[i] = 0.f;
    if (ok) {
      if (seg < a.P - 1) g[i] = a.ws_h[((static_cast<int64_t>(b) * a.P + seg) * Dm + d) * N + n];
      else if (p.dfinal != nullptr) g[i] = p.dfinal[(static_cast<int64_t>(b) * Dm + d) * N + n];
    }
  }
  const float Dd = (p.D != nullptr && dv) ? p.D[d] : 0.f;
  float dD = 0.f;

  // Stages B (and C) of tokens [t, t+L) in shared memory (zeros past t1 and N).
  auto stage = [&](int t, bool with_c) {
    __syncthreads();
    for (int e = tid; e < L * NP; e += Cf::kThreads) {
      const int j = e / NP, n = e % NP, tt = t + j;
      const bool ok = tt < t1 && n < N;
      sB[j][n] = ok ? ld<T>(p.B, (bT + tt) * N + n) : 0.f;
      if (with_c) sC[j][n] = ok ? ld<T>(p.C, (bT + tt) * N + n) : 0.f;
    }
    __syncthreads();
  };
  // dt, u, dt*u and the reset flag of this channel's tokens [t, t+L) (dt = u = 0 past t1).
  auto tokens = [&](int t, float (&dt)[L], float (&u)[L], float (&dtu)[L], bool (&rst)[L]) {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int tt = t + j;
      const bool ok = dv && tt < t1;
      const int64_t at = (bT + tt) * Dm + d;
      u[j] = ok ? ld<T>(p.u, at) : 0.f;
      dt[j] = ok ? dt_of<T>(ld<T>(p.delta, at)) : 0.f;
      dtu[j] = dt[j] * u[j];
      rst[j] = p.seq_ids != nullptr && tt > 0 && tt < t1 && p.seq_ids[bT + tt] != p.seq_ids[bT + tt - 1];
    }
  };

  const int k_first = t0 / kScanChunk, k_last = (t1 - 1) / kScanChunk;
  for (int k = k_last; k >= k_first; --k) {
    const int tk = k * kScanChunk;
    const int ntiles = (min(t1, tk + kScanChunk) - tk + L - 1) / L;
    float h0[NS];
    {
      const float* cs = p.chunk_states + ((static_cast<int64_t>(b) * a.nc + k) * Dm + d) * N;
#pragma unroll
      for (int i = 0; i < NS; ++i) h0[i] = (dv && s * NS + i < N) ? cs[s * NS + i] : 0.f;
    }
    // Forward through the chunk: the state at the start of tiles 1 .. ntiles-1.
    {
      float h[NS];
#pragma unroll
      for (int i = 0; i < NS; ++i) h[i] = h0[i];
      for (int j = 0; j + 1 < ntiles; ++j) {
        const int t = tk + j * L;
        stage(t, false);
        float dt[L], u[L], dtu[L];
        bool rst[L];
        tokens(t, dt, u, dtu, rst);
#pragma unroll
        for (int jj = 0; jj < L; ++jj)
#pragma unroll
          for (int i = 0; i < NS; ++i) {
            const float dAv = rst[jj] ? 0.f : fast_exp2(dt[jj] * A2[i]);
            h[i] = fmaf(dAv, h[i], dtu[jj] * sB[jj][s * NS + i]);
          }
#pragma unroll
        for (int i = 0; i < NS; ++i) sTS[j][i][tid] = h[i];
      }
    }
    // The tiles last to first.
    for (int j = ntiles - 1; j >= 0; --j) {
      const int t = tk + j * L;
      float hs[NS];
#pragma unroll
      for (int i = 0; i < NS; ++i) hs[i] = j == 0 ? h0[i] : sTS[j - 1][i][tid];
      stage(t, true);
      float dt[L], u[L], dtu[L], dyc[L], zfac[L], spg[L];
      bool rst[L];
      tokens(t, dt, u, dtu, rst);
#pragma unroll
      for (int jj = 0; jj < L; ++jj) {
        const int tt = t + jj;
        const bool ok = dv && tt < t1;
        const int64_t at = (bT + tt) * Dm + d;
        const float dy = ok ? p.dy[at] : 0.f;
        spg[jj] = ok ? softplus_grad(ld<T>(p.delta, at)) : 0.f;
        if (p.z != nullptr && ok) {
          const float zv = ld<T>(p.z, at), sg = sigmoid_f(zv);
          dyc[jj] = dy * zv * sg;
          zfac[jj] = dy * sg * (1.f + zv * (1.f - sg));  // dy silu'(z)
        } else {
          dyc[jj] = dy;
          zfac[jj] = 0.f;
        }
      }
      // Recompute the tile's decays and states.
      float aa[L][NS], hh[L][NS], yc[L];
#pragma unroll
      for (int jj = 0; jj < L; ++jj) {
        yc[jj] = 0.f;
#pragma unroll
        for (int i = 0; i < NS; ++i) {
          const int n = s * NS + i;
          aa[jj][i] = rst[jj] ? 0.f : fast_exp2(dt[jj] * A2[i]);
          hh[jj][i] = fmaf(aa[jj][i], jj == 0 ? hs[i] : hh[jj - 1][i], dtu[jj] * sB[jj][n]);
          yc[jj] = fmaf(hh[jj][i], sC[jj][n], yc[jj]);
        }
      }
      // The adjoint, back through the tile.
      float ddt[L], dus[L], vB[L * NS], vC[L * NS];
#pragma unroll
      for (int jj = L - 1; jj >= 0; --jj) {
        ddt[jj] = 0.f;
        dus[jj] = 0.f;
#pragma unroll
        for (int i = 0; i < NS; ++i) {
          const int n = s * NS + i;
          const float Bn = sB[jj][n];
          const float gh = fmaf(dyc[jj], sC[jj][n], g[i]);
          const float ah = aa[jj][i] * (jj == 0 ? hs[i] : hh[jj - 1][i]);
          ddt[jj] = fmaf(gh, fmaf(A[i], ah, Bn * u[jj]), ddt[jj]);
          dA[i] = fmaf(gh * dt[jj], ah, dA[i]);
          dus[jj] = fmaf(gh, Bn, dus[jj]);
          vB[jj * NS + i] = gh * dtu[jj];
          vC[jj * NS + i] = dyc[jj] * hh[jj][i];
          g[i] = aa[jj][i] * gh;
        }
      }
      // Per-token gradients, premultiplied so that the sum over the channel's lanes is final.
      float gz[L], gd[L], gu[L];
#pragma unroll
      for (int jj = 0; jj < L; ++jj) {
        const float skip = s == 0 ? Dd * u[jj] : 0.f;
        gz[jj] = (yc[jj] + skip) * zfac[jj];
        gd[jj] = ddt[jj] * spg[jj];
        gu[jj] = dus[jj] * dt[jj] + (s == 0 ? dyc[jj] * Dd : 0.f);
        if (s == 0) dD = fmaf(dyc[jj], u[jj], dD);
      }
      sum_over_states<L, S>(gz, lane);
      sum_over_states<L, S>(gd, lane);
      sum_over_states<L, S>(gu, lane);
      if (dv && writes_tokens<L, S>(s)) {
        const int ft = t + first_token<L, S>(s);
#pragma unroll
        for (int jj = 0; jj < kept<L, S>(); ++jj) {
          if (ft + jj >= t1) continue;
          const int64_t at = (bT + ft + jj) * Dm + d;
          if (p.dz != nullptr) static_cast<T*>(p.dz)[at] = Num<T>::from_f(gz[jj]);
          if (p.ddelta != nullptr) static_cast<T*>(p.ddelta)[at] = Num<T>::from_f(gd[jj]);
          if (p.du != nullptr) static_cast<T*>(p.du)[at] = Num<T>::from_f(gu[jj]);
        }
      }
      // dB, dC: sums over the warp's channels, then over the block's warps, then atomics.
      if (need_B || need_C) {
        constexpr int K = kept<L * NS, CW>();
        const int grp = lane / S;
        if (need_B) {
          if constexpr (CW > 1) Butterfly<L * NS, 16, S>::run(vB, lane);
#pragma unroll
          for (int q = 0; q < K; ++q) {
            const int f = grp * K + q;
            sRed[0][warp][f / NS][s * NS + f % NS] = vB[q];
          }
        }
        if (need_C) {
          if constexpr (CW > 1) Butterfly<L * NS, 16, S>::run(vC, lane);
#pragma unroll
          for (int q = 0; q < K; ++q) {
            const int f = grp * K + q;
            sRed[1][warp][f / NS][s * NS + f % NS] = vC[q];
          }
        }
        __syncthreads();
        for (int e = tid; e < 2 * L * NP; e += Cf::kThreads) {
          const int which = e / (L * NP), jj = (e / NP) % L, n = e % NP, tt = t + jj;
          float* out = which == 0 ? p.dB : p.dC;
          if (out == nullptr || n >= N || tt >= t1) continue;
          float sum = 0.f;
#pragma unroll
          for (int w = 0; w < W; ++w) sum += sRed[which][w][jj][n];
          atomicAdd(out + (bT + tt) * N + n, sum);
        }
      }
    }
  }

  if (!dv) return;
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const int n = s * NS + i;
    if (n >= N) continue;
    if (p.dA_log != nullptr) atomicAdd(p.dA_log + static_cast<int64_t>(d) * N + n, dA[i] * A[i]);
    if (seg == 0 && p.dinitial_state != nullptr)
      p.dinitial_state[(static_cast<int64_t>(b) * Dm + d) * N + n] = g[i];
  }
  if (s == 0 && p.dD != nullptr) atomicAdd(p.dD + d, dD);
}

// Per segment: the adjoint at its start (dL/dh before its first token) from a zero adjoint at
// its end, and its sum of dt (-1 where the state resets inside it).
template <typename T, typename Cf>
__global__ void __launch_bounds__(Cf::kThreads) scan_bwd_local(Args a) {
  constexpr int NS = Cf::NS, S = Cf::S, L = kBwdTile, NP = NS * S;
  __shared__ __align__(16) float sC[L][NP];
  const ScanProblem& p = a.p;
  const int tid = threadIdx.x, s = tid % S;
  const int d = blockIdx.x * Cf::CB + tid / S;
  const bool dv = d < a.Dm;
  const int seg = blockIdx.y, b = blockIdx.z;
  const int N = a.N, Dm = a.Dm;
  const int t0 = seg * a.seg_len, t1 = min(a.T, t0 + a.seg_len);
  const int64_t bT = static_cast<int64_t>(b) * a.T;

  float A2[NS], g[NS];
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const int n = s * NS + i;
    A2[i] = (dv && n < N) ? -__expf(p.A_log[static_cast<int64_t>(d) * N + n]) * kLog2e : 0.f;
    g[i] = 0.f;
  }
  float dsum = 0.f;
  bool resets = false;
  const int last = t0 + ((t1 - t0 - 1) / L) * L;
  for (int t = last; t >= t0; t -= L) {
    __syncthreads();
    for (int e = tid; e < L * NP; e += Cf::kThreads) {
      const int j = e / NP, n = e % NP, tt = t + j;
      sC[j][n] = (tt < t1 && n < N) ? ld<T>(p.C, (bT + tt) * N + n) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int jj = L - 1; jj >= 0; --jj) {
      const int tt = t + jj;
      const bool ok = dv && tt < t1;
      const int64_t at = (bT + tt) * Dm + d;
      const float dt = ok ? dt_of<T>(ld<T>(p.delta, at)) : 0.f;
      float dyc = ok ? p.dy[at] : 0.f;
      if (p.z != nullptr && ok) {
        const float zv = ld<T>(p.z, at);
        dyc *= zv * sigmoid_f(zv);
      }
      const bool rst = p.seq_ids != nullptr && tt > 0 && tt < t1 && p.seq_ids[bT + tt] != p.seq_ids[bT + tt - 1];
      dsum += dt;
      resets = resets || rst;
#pragma unroll
      for (int i = 0; i < NS; ++i) {
        const float gh = fmaf(dyc, sC[jj][s * NS + i], g[i]);
        g[i] = rst ? 0.f : fast_exp2(dt * A2[i]) * gh;
      }
    }
  }
  if (!dv) return;
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const int n = s * NS + i;
    if (n < N) a.ws_h[((static_cast<int64_t>(b) * a.P + seg) * Dm + d) * N + n] = g[i];
  }
  if (s == 0) a.ws_sum[(static_cast<int64_t>(b) * a.P + seg) * Dm + d] = resets ? -1.f : dsum;
}

// Per (b, d, n): the adjoint entering each segment from its right (dfinal for the last), in place
// of the segments' local start adjoints.
__global__ void scan_bwd_combine(Args a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t DN = static_cast<int64_t>(a.Dm) * a.N;
  if (idx >= a.Bsz * DN) return;
  const int64_t b = idx / DN, dn = idx % DN, d = dn / a.N;
  const float A2 = -__expf(a.p.A_log[dn]) * kLog2e;
  float g = a.p.dfinal != nullptr ? a.p.dfinal[idx] : 0.f;
  for (int q = a.P - 1; q >= 0; --q) {
    const int64_t at = (b * a.P + q) * DN + dn;
    const float sum = a.ws_sum[(b * a.P + q) * a.Dm + d];
    const float local = a.ws_h[at];
    a.ws_h[at] = g;
    g = fmaf(sum < 0.f ? 0.f : fast_exp2(sum * A2), g, local);
  }
}

// ---- fast path (N <= kFastMaxState) -----------------------------------------------------
// fast_bwd_kernel: two threads per channel (s = tid & 1 takes states s*8 .. s*8+7), 64 channels
// per block. The register i of a thread holds state s*8 + (i ^ 4q), q = lane bit 4: the first
// round of the dB, dC butterfly (lanes 16 apart) then needs no selects (see warp_sum8).
// Per chunk (kScanChunk tokens, last to first):
//   F: the tiles first to last: "prep" turns the prefetched u, delta, B, C, seq_ids into
//      (-dt, dt*u), B, C, reset flags in shared memory (whole chunk); a walk from the chunk's
//      saved state stores the state at every tile start but the first (sTS).
//   R: the tiles last to first: prep computes dy*silu(z), u, softplus'(delta) and
//      dy*silu'(z) of the tile; the tile's decays a and states h_{t-1} are recomputed into registers
//      (with dC's sums), the adjoint walks back through them (with dB's sums and the per-token
//      sums over n), and then every (token, channel) of the tile gets du, ddelta, dz.
// The prefetch of each step's inputs into registers is issued right after the previous step's
// prep consumed them.
constexpr int kBL = 8;                       // tokens per tile
constexpr int kBTiles = kScanChunk / kBL;    // tiles per chunk
constexpr int kBThreads = 2 * kFastCh;       // threads per block
constexpr int kBW = kBThreads / 32;          // warps per block
constexpr int kBNS = kFastMaxState / 2;      // states per thread
constexpr int kBPairs = kBL * kFastCh / kBThreads;  // (token, channel) pairs per thread per tile
static_assert(kScanChunk % kBL == 0, "a chunk is whole tiles");
static_assert(kBL * kFastMaxState == kBThreads, "one B (and C) value per thread per tile");

struct BwdSmem {
  float B[kScanChunk][kFastMaxState];
  float C[kScanChunk][kFastMaxState];
  float2 dt[kScanChunk][kFastCh];               // (-dt, dt*u) per token and channel
  float ts[kBTiles - 1][kBNS][kBThreads];        // state at the start of tiles 1 ..
  float h0[2][kBNS][kBThreads];                  // the chunk's saved state (by chunk parity)
  float tile[4][kBL][kFastCh];                   // dy*silu(z), u, softplus'(delta), dy*silu'(z)
  float part[3][kBL][kBThreads];                 // per thread: sum nA2*w, sum gh*B, sum h*C
  float red[2][kBW][kBL][kFastMaxState];         // dB, dC sums over each warp's channels
  int rst[kScanChunk];
};

// Sum over the 16 channels of a warp (lane bits 4..1) of a thread's 8 values scale * x[i]
// (register order as above). Returns, in every lane, the sum for the thread's state
// s*8 + ((lane >> 2) & 7).
__device__ __forceinline__ float warp_sum8(float scale, const float (&x)[kBNS], int lane) {
  // Lanes 16 apart hold the two halves swapped: keep registers 0..3, send 4..7.
  float v[kBNS / 2];
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = fmaf(scale, x[j], __shfl_xor_sync(0xffffffffu, scale * x[j + 4], 16));
  const bool up8 = (lane & 8) != 0;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const float send = up8 ? v[j] : v[j + 2];
    const float keep = up8 ? v[j + 2] : v[j];
    v[j] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
  }
  const bool up4 = (lane & 4) != 0;
  {
    const float send = up4 ? v[0] : v[1];
    const float keep = up4 ? v[1] : v[0];
    v[0] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
  }
  return v[0] + __shfl_xor_sync(0xffffffffu, v[0], 2);
}

// Loads the 8 values of a [16] shared row that the thread's registers stand for.
__device__ __forceinline__ void load_row8(const float* row, int s, int q, float (&v)[kBNS]) {
  const float4* r4 = reinterpret_cast<const float4*>(row);
  const float4 lo = r4[2 * s + q], hi = r4[2 * s + (q ^ 1)];
  v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
  v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
}

template <typename T>
__global__ void __launch_bounds__(kBThreads, 2) fast_bwd_kernel(Args a) {
  using R = typename Raw<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  BwdSmem& S = *reinterpret_cast<BwdSmem*>(smem_raw);

  const ScanProblem& p = a.p;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int s = tid & 1, q = (lane >> 4) & 1;
  const int c = tid >> 1;  // the channel this thread walks
  const int d = blockIdx.x * kFastCh + c;
  const bool dv = d < a.Dm;
  const int pc = tid & (kFastCh - 1), pj = tid / kFastCh;  // prep / output: channel, first token
  const int dp = blockIdx.x * kFastCh + pc;
  const bool dvp = dp < a.Dm;
  const int seg = blockIdx.y, b = blockIdx.z;
  const int N = a.N, Dm = a.Dm;
  const int t0 = seg * a.seg_len, t1 = min(a.T, t0 + a.seg_len);
  const int64_t bT = static_cast<int64_t>(b) * a.T;
  const R* __restrict__ gu = raw_ptr<T>(p.u);
  const R* __restrict__ gdl = raw_ptr<T>(p.delta);
  const R* __restrict__ gz = raw_ptr<T>(p.z);
  const R* __restrict__ gB = raw_ptr<T>(p.B);
  const R* __restrict__ gC = raw_ptr<T>(p.C);
  const float* __restrict__ gdy = p.dy;
  const int32_t* __restrict__ seq = p.seq_ids;
  const bool need_B = p.dB != nullptr, need_C = p.dC != nullptr;

  // The state of register i.
  auto st = [&](int i) { return s * kBNS + (i ^ (q << 2)); };

  float nA2[kBNS], g[kBNS], dAc[kBNS];
#pragma unroll
  for (int i = 0; i < kBNS; ++i) {
    const int n = st(i);
    const bool ok = dv && n < N;
    nA2[i] = ok ? neg_a2(p.A_log[static_cast<int64_t>(d) * N + n]) : 1.f;
    dAc[i] = 0.f;
    g[i] = 0.f;
    if (ok) {
      if (seg < a.P - 1) g[i] = a.ws_h[((static_cast<int64_t>(b) * a.P + seg) * Dm + d) * N + n];
      else if (p.dfinal != nullptr) g[i] = p.dfinal[(static_cast<int64_t>(b) * Dm + d) * N + n];
    }
  }
  const float Dd = (p.D != nullptr && dvp) ? p.D[dp] : 0.f;
  float dDc = 0.f;

  // ---- prefetch registers and the two preps ----
  R ru[kBPairs], rd[kBPairs], rz[kBPairs], rb, rc;
  float rdy[kBPairs];
  int rs0 = 0, rs1 = 0;
  // Loads the inputs of the tile starting at t: for F (u, delta, B, C, seq_ids) or R (u, delta, z, dy).
  auto issue = [&](bool fwd_step, int t) {
#pragma unroll
    for (int m = 0; m < kBPairs; ++m) {
      const int tt = t + pj + 2 * m;
      const bool ok = dvp && tt < t1;
      const int64_t at = (bT + tt) * Dm + dp;
      ru[m] = ok ? gu[at] : R(0);
      rd[m] = ok ? gdl[at] : R(0);
      if (!fwd_step) {
        rz[m] = (ok && gz != nullptr) ? gz[at] : R(0);
        rdy[m] = ok ? gdy[at] : 0.f;
      }
    }
    if (fwd_step) {
      const int j = tid / kFastMaxState, n = tid % kFastMaxState, tt = t + j;
      const bool ok = tt < t1 && n < N;
      const int64_t src = (bT + tt) * N + n;
      rb = ok ? gB[src] : R(0);
      rc = ok ? gC[src] : R(0);
      rs0 = rs1 = 0;
      if (tid < kBL && seq != nullptr) {
        const int tr = t + tid;
        if (tr > 0 && tr < t1) {
          rs1 = seq[bT + tr];
          rs0 = seq[bT + tr - 1];
        }
      }
    }
  };
  // Prep of F tile jt (chunk-local rows jt*kBL ..).
  auto prep_f = [&](int t, int row0) {
#pragma unroll
    for (int m = 0; m < kBPairs; ++m) {
      const int j = pj + 2 * m;
      const bool ok = dvp && t + j < t1;
      const float dt = ok ? dt_of<T>(Raw<T>::f(rd[m])) : 0.f;
      S.dt[row0 + j][pc] = make_float2(-dt, dt * Raw<T>::f(ru[m]));
    }
    S.B[row0 + tid / kFastMaxState][tid % kFastMaxState] = Raw<T>::f(rb);
    S.C[row0 + tid / kFastMaxState][tid % kFastMaxState] = Raw<T>::f(rc);
    if (tid < kBL) S.rst[row0 + tid] = rs1 != rs0;
  };
  auto prep_r = [&](int t) {
#pragma unroll
    for (int m = 0; m < kBPairs; ++m) {
      const int j = pj + 2 * m;
      const bool ok = dvp && t + j < t1;
      const float u = Raw<T>::f(ru[m]), dl = Raw<T>::f(rd[m]), dy = rdy[m];
      float dyc = dy, zf = 0.f;
      if (gz != nullptr && ok) {
        const float zv = Raw<T>::f(rz[m]), sg = sigmoid_f(zv);
        dyc = dy * zv * sg;
        zf = dy * sg * (1.f + zv * (1.f - sg));
      }
      S.tile[0][j][pc] = dyc;
      S.tile[1][j][pc] = u;
      S.tile[2][j][pc] = ok ? softplus_grad(dl) : 0.f;
      S.tile[3][j][pc] = zf;
    }
  };
  // Starts copying chunk k's saved state into S.h0[par] (cp.async; zeros where none).
  auto load_h0 = [&](int k, int par) {
#pragma unroll
    for (int i = 0; i < kBNS; ++i) {
      const int n = st(i);
      float* dst = &S.h0[par][i][tid];
      if (dv && n < N) cp_async4(dst, p.chunk_states + ((static_cast<int64_t>(b) * a.nc + k) * Dm + d) * N + n);
      else *dst = 0.f;
    }
    cp_async_commit();
  };

  const int k_first = t0 / kScanChunk, k_last = (t1 - 1) / kScanChunk;
  issue(true, k_last * kScanChunk);
  load_h0(k_last, k_last & 1);

  for (int k = k_last; k >= k_first; --k) {
    const int tk = k * kScanChunk, par = k & 1;
    const int ntiles = (min(t1, tk + kScanChunk) - tk + kBL - 1) / kBL;

    // ---- F: the chunk's tiles first to last ----
    float h[kBNS];
    for (int jt = 0; jt < ntiles; ++jt) {
      __syncthreads();
      prep_f(tk + jt * kBL, jt * kBL);
      if (jt + 1 < ntiles) issue(true, tk + (jt + 1) * kBL);
      else issue(false, tk + (ntiles - 1) * kBL);
      __syncthreads();
      if (jt == 0) {
        cp_async_wait_all();
#pragma unroll
        for (int i = 0; i < kBNS; ++i) h[i] = S.h0[par][i][tid];
      }
      if (jt + 1 < ntiles) {
#pragma unroll
        for (int j = 0; j < kBL; ++j) {
          const int row = jt * kBL + j;
          const float2 v = S.dt[row][c];
          const float xn = S.rst[row] ? kResetX : v.x;
          float Bv[kBNS];
          load_row8(S.B[row], s, q, Bv);
#pragma unroll
          for (int i = 0; i < kBNS; ++i) h[i] = fmaf(fast_exp2(xn * nA2[i]), h[i], v.y * Bv[i]);
        }
#pragma unroll
        for (int i = 0; i < kBNS; ++i) S.ts[jt][i][tid] = h[i];
      }
    }

    // ---- R: the chunk's tiles last to first ----
    for (int jt = ntiles - 1; jt >= 0; --jt) {
      const int t = tk + jt * kBL;
      __syncthreads();
      prep_r(t);
      if (jt > 0) {
        issue(false, t - kBL);
      } else if (k > k_first) {
        issue(true, tk - kScanChunk);
        load_h0(k - 1, par ^ 1);
      }
      __syncthreads();

      // Recompute the tile's decays and states (dC and sum_n h C on the way).
      float aa[kBL][kBNS], hp[kBL][kBNS];  // decays and the states before each token
      {
        float hh[kBNS];
#pragma unroll
        for (int i = 0; i < kBNS; ++i) hh[i] = jt == 0 ? S.h0[par][i][tid] : S.ts[jt - 1][i][tid];
#pragma unroll
        for (int j = 0; j < kBL; ++j) {
          const int row = jt * kBL + j;
          const float2 v = S.dt[row][c];
          const float xn = S.rst[row] ? kResetX : v.x;
          const float dyc = S.tile[0][j][c];
          float Bv[kBNS], Cv[kBNS];
          load_row8(S.B[row], s, q, Bv);
          load_row8(S.C[row], s, q, Cv);
          float yc = 0.f;
#pragma unroll
          for (int i = 0; i < kBNS; ++i) {
            aa[j][i] = fast_exp2(xn * nA2[i]);
            hp[j][i] = hh[i];
            hh[i] = fmaf(aa[j][i], hh[i], v.y * Bv[i]);
            yc = fmaf(hh[i], Cv[i], yc);
          }
          S.part[2][j][tid] = yc;
          if (need_C) {
            const float sum = warp_sum8(dyc, hh, lane);  // dC: sum_d dyc h
            if ((lane & 2) == 0) S.red[1][warp][j][s * kBNS + ((lane >> 2) & 7)] = sum;
          }
        }
      }
      // The adjoint back through the tile (dB, dA_log and the sums over n on the way).
#pragma unroll
      for (int j = kBL - 1; j >= 0; --j) {
        const int row = jt * kBL + j;
        const float2 v = S.dt[row][c];
        const float dyc = S.tile[0][j][c];
        float Bv[kBNS], Cv[kBNS], ghv[kBNS];
        load_row8(S.B[row], s, q, Bv);
        load_row8(S.C[row], s, q, Cv);
        float sa = 0.f, sb = 0.f;
#pragma unroll
        for (int i = 0; i < kBNS; ++i) {
          const float gh = fmaf(dyc, Cv[i], g[i]);
          g[i] = aa[j][i] * gh;
          const float w = g[i] * hp[j][i];  // gh a h_{t-1}
          sa = fmaf(nA2[i], w, sa);
          dAc[i] = fmaf(v.x, w, dAc[i]);
          sb = fmaf(gh, Bv[i], sb);
          ghv[i] = gh;
        }
        S.part[0][j][tid] = sa;
        S.part[1][j][tid] = sb;
        if (need_B) {
          const float sum = warp_sum8(v.y, ghv, lane);  // dB: sum_d gh dt u
          if ((lane & 2) == 0) S.red[0][warp][j][s * kBNS + ((lane >> 2) & 7)] = sum;
        }
      }
      __syncthreads();

      // Per (token, channel): du, ddelta, dz (and dD).
#pragma unroll
      for (int m = 0; m < kBPairs; ++m) {
        const int j = pj + 2 * m, tt = t + j;
        if (!dvp || tt >= t1) continue;
        const float sa = S.part[0][j][2 * pc] + S.part[0][j][2 * pc + 1];
        const float sb = S.part[1][j][2 * pc] + S.part[1][j][2 * pc + 1];
        const float yc = S.part[2][j][2 * pc] + S.part[2][j][2 * pc + 1];
        const float dyc = S.tile[0][j][pc], u = S.tile[1][j][pc], spg = S.tile[2][j][pc], zf = S.tile[3][j][pc];
        const float dt = -S.dt[jt * kBL + j][pc].x;
        const int64_t at = (bT + tt) * Dm + dp;
        // ddt = sum_n gh (A a h_{t-1} + u B) with A = -nA2 ln2.
        if (p.ddelta != nullptr) static_cast<T*>(p.ddelta)[at] = Num<T>::from_f(fmaf(u, sb, -kLn2 * sa) * spg);
        if (p.du != nullptr) static_cast<T*>(p.du)[at] = Num<T>::from_f(fmaf(sb, dt, dyc * Dd));
        if (p.dz != nullptr) static_cast<T*>(p.dz)[at] = Num<T>::from_f((yc + Dd * u) * zf);
        dDc = fmaf(dyc, u, dDc);
      }
      // dB, dC: the block's sums, one atomic per (token, state) (four at once where aligned).
      if (need_B || need_C) {
        const bool vec = (N % 4) == 0 && ((reinterpret_cast<uintptr_t>(p.dB) | reinterpret_cast<uintptr_t>(p.dC)) & 15) == 0;
        if (vec) {
          if (tid < 2 * kBL * kFastMaxState / 4) {
            const int which = tid / (kBL * kFastMaxState / 4), e = tid % (kBL * kFastMaxState / 4);
            const int j = e / (kFastMaxState / 4), n = (e % (kFastMaxState / 4)) * 4, tt = t + j;
            float* out = which == 0 ? p.dB : p.dC;
            if (out != nullptr && n < N && tt < t1) {
              float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
              for (int w = 0; w < kBW; ++w) {
                const float4 v = *reinterpret_cast<const float4*>(&S.red[which][w][j][n]);
                sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
              }
              atomicAdd(reinterpret_cast<float4*>(out + (bT + tt) * N + n), sum);
            }
          }
        } else {
          for (int e = tid; e < 2 * kBL * kFastMaxState; e += kBThreads) {
            const int which = e / (kBL * kFastMaxState), j = (e / kFastMaxState) % kBL, n = e % kFastMaxState;
            const int tt = t + j;
            float* out = which == 0 ? p.dB : p.dC;
            if (out == nullptr || n >= N || tt >= t1) continue;
            float sum = 0.f;
#pragma unroll
            for (int w = 0; w < kBW; ++w) sum += S.red[which][w][j][n];
            atomicAdd(out + (bT + tt) * N + n, sum);
          }
        }
      }
    }
  }

  if (dvp && p.dD != nullptr) atomicAdd(p.dD + dp, dDc);
  if (!dv) return;
#pragma unroll
  for (int i = 0; i < kBNS; ++i) {
    const int n = st(i);
    if (n >= N) continue;
    // dA_log = A sum_t dt w = (-nA2 ln2) * (-dAc).
    if (p.dA_log != nullptr) atomicAdd(p.dA_log + static_cast<int64_t>(d) * N + n, nA2[i] * kLn2 * dAc[i]);
    if (seg == 0 && p.dinitial_state != nullptr) p.dinitial_state[(static_cast<int64_t>(b) * Dm + d) * N + n] = g[i];
  }
}

// Per segment (fast path): the adjoint at its start from a zero adjoint at its end, and its sum
// of dt (-1 where the state resets inside it). One thread per channel, all 16 states.
constexpr int kLL = 8;  // tokens per tile
template <typename T>
__global__ void __launch_bounds__(kFastCh, 8) fast_bwd_local(Args a) {
  using R = typename Raw<T>::type;
  constexpr int L = kLL, NS = kFastMaxState, PER = L * NS / kFastCh;
  static_assert(L * NS % kFastCh == 0, "C of a tile split evenly over the threads");
  __shared__ __align__(16) float sC[2][L][NS];
  __shared__ int sR[2][L];
  __shared__ float2 sTok[L][kFastCh];  // per token: -dt (kResetX at a reset), dy*silu(z)

  const ScanProblem& p = a.p;
  const int tid = threadIdx.x;
  const int d = blockIdx.x * kFastCh + tid;
  const bool dv = d < a.Dm;
  const int seg = blockIdx.y, b = blockIdx.z;
  const int N = a.N, Dm = a.Dm;
  const int t0 = seg * a.seg_len, t1 = min(a.T, t0 + a.seg_len);
  const int64_t bT = static_cast<int64_t>(b) * a.T;
  const R* __restrict__ gdl = raw_ptr<T>(p.delta);
  const R* __restrict__ gz = raw_ptr<T>(p.z);
  const R* __restrict__ gC = raw_ptr<T>(p.C);
  const int32_t* __restrict__ seq = p.seq_ids;

  float nA2[NS], g[NS];
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    nA2[i] = (dv && i < N) ? neg_a2(p.A_log[static_cast<int64_t>(d) * N + i]) : 1.f;
    g[i] = 0.f;
  }
  float dsum = 0.f;
  bool resets = false;

  R rd[L], rz[L], rc[PER];
  float rdy[L];
  int rs0 = 0, rs1 = 0;
  auto issue = [&](int t) {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int tt = t + j;
      const bool ok = dv && tt < t1;
      const int64_t at = (bT + tt) * Dm + d;
      rd[j] = ok ? gdl[at] : R(0);
      rz[j] = (ok && gz != nullptr) ? gz[at] : R(0);
      rdy[j] = ok ? p.dy[at] : 0.f;
    }
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int e = tid + kFastCh * k, j = e / NS, n = e % NS;
      rc[k] = (t + j < t1 && n < N) ? gC[(bT + t + j) * N + n] : R(0);
    }
    rs0 = rs1 = 0;
    if (tid < L && seq != nullptr) {
      const int tt = t + tid;
      if (tt > 0 && tt < t1) {
        rs1 = seq[bT + tt];
        rs0 = seq[bT + tt - 1];
      }
    }
  };
  auto stage = [&](int buf) {
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int e = tid + kFastCh * k;
      sC[buf][e / NS][e % NS] = Raw<T>::f(rc[k]);
    }
    if (tid < L) sR[buf][tid] = rs1 != rs0;
  };

  const int last = t0 + ((t1 - t0 - 1) / L) * L;
  issue(last);
  stage(0);
  __syncthreads();
  int buf = 0;
  for (int t = last; t >= t0; t -= L, buf ^= 1) {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const bool ok = dv && t + j < t1;
      const float dt = ok ? dt_of<T>(Raw<T>::f(rd[j])) : 0.f;
      float dyc = rdy[j];
      if (gz != nullptr && ok) {
        const float zv = Raw<T>::f(rz[j]);
        dyc *= zv * sigmoid_f(zv);
      }
      const bool rst = sR[buf][j] != 0;
      dsum += dt;
      resets = resets || rst;
      sTok[j][tid] = make_float2(rst ? kResetX : -dt, dyc);
    }
    const bool more = t - L >= t0;
    if (more) issue(t - L);
#pragma unroll 1
    for (int j = L - 1; j >= 0; --j) {
      const float2 tok = sTok[j][tid];
      const float4* c4 = reinterpret_cast<const float4*>(sC[buf][j]);
#pragma unroll
      for (int g4 = 0; g4 < NS / 4; ++g4) {
        const float4 cv = c4[g4];
        const float cc[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 4 * g4 + e;
          g[i] = fast_exp2(tok.x * nA2[i]) * fmaf(tok.y, cc[e], g[i]);
        }
      }
    }
    if (more) {
      stage(buf ^ 1);
      __syncthreads();
    }
  }
  if (!dv) return;
#pragma unroll
  for (int i = 0; i < NS; ++i)
    if (i < N) a.ws_h[((static_cast<int64_t>(b) * a.P + seg) * Dm + d) * N + i] = g[i];
  a.ws_sum[(static_cast<int64_t>(b) * a.P + seg) * Dm + d] = resets ? -1.f : dsum;
}

template <typename T>
cudaError_t launch_fast_bwd(const Args& a, cudaStream_t stream) {
  const dim3 grid((a.Dm + kFastCh - 1) / kFastCh, a.P, a.Bsz);
  if (a.P > 1) {
    fast_bwd_local<T><<<grid, kFastCh, 0, stream>>>(a);
    const int64_t n = static_cast<int64_t>(a.Bsz) * a.Dm * a.N;
    scan_bwd_combine<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(a);
  }
  // Over 48 KiB of dynamic shared memory (two blocks per SM): set on every launch (per device).
  constexpr int smem = static_cast<int>(sizeof(BwdSmem));
  cudaError_t e = cudaFuncSetAttribute(fast_bwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  e = cudaFuncSetAttribute(fast_bwd_kernel<T>, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
  if (e != cudaSuccess) return e;
  fast_bwd_kernel<T><<<grid, kBThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename Cf>
cudaError_t launch_bwd(const Args& a, cudaStream_t stream) {
  const dim3 grid((a.Dm + Cf::CB - 1) / Cf::CB, a.P, a.Bsz);
  if (a.P > 1) {
    scan_bwd_local<T, Cf><<<grid, Cf::kThreads, 0, stream>>>(a);
    const int64_t n = static_cast<int64_t>(a.Bsz) * a.Dm * a.N;
    scan_bwd_combine<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(a);
  }
  scan_bwd_kernel<T, Cf><<<grid, Cf::kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace
}  // namespace scan_detail

cudaError_t selective_scan_bwd(DType dtype, const ScanProblem& p, cudaStream_t stream) {
  scan_detail::Args a;
  if (!scan_detail::make_args(p, &a, true)) return cudaErrorInvalidValue;
  if (p.u == nullptr || p.delta == nullptr || p.B == nullptr || p.C == nullptr || p.A_log == nullptr ||
      p.dy == nullptr || p.chunk_states == nullptr || (a.P > 1 && p.workspace == nullptr))
    return cudaErrorInvalidValue;
  return scan_detail::by_dtype_code(static_cast<int>(dtype), [&](auto t) {
    using T = decltype(t);
    if (scan_detail::fast_path(p.state)) return scan_detail::launch_fast_bwd<T>(a, stream);
    return scan_detail::by_state_dim(p.state, [&](auto cf) { return scan_detail::launch_bwd<T, decltype(cf)>(a, stream); });
  });
}

}  // namespace peftfw::kernels::mamba1::cuda
