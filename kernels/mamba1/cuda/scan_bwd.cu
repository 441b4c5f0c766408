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
#include "scan_common.cuh"

namespace peftfw::kernels::mamba1::cuda {
namespace scan_detail {
namespace {

constexpr int kBwdTile = 4;  // tokens per recomputed tile (divides kScanChunk)
constexpr int kTilesPerChunk = kScanChunk / kBwdTile;
static_assert(kScanChunk % kBwdTile == 0, "a chunk is whole tiles");

template <typename T, typename Cf>
__global__ void __launch_bounds__(Cf::kThreads) scan_bwd_kernel(Args a) {
  constexpr int NS = Cf::NS, S = Cf::S, L = kBwdTile, NP = NS * S, W = Cf::W, KT = kept<L, S>();
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
  const int own = first_token<L, S>(s);  // this lane's tokens: own .. own+KT-1 of each tile

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
  // dt and dt*u of this lane's tokens of [t, t+L) (0 past t1).
  auto owned = [&](int t, float (&dto)[KT], float (&dtuo)[KT], float (&uo)[KT]) {
#pragma unroll
    for (int q = 0; q < KT; ++q) {
      const int tt = t + own + q;
      const bool ok = dv && tt < t1;
      const int64_t at = (bT + tt) * Dm + d;
      uo[q] = ok ? ld<T>(p.u, at) : 0.f;
      dto[q] = ok ? dt_of<T>(ld<T>(p.delta, at)) : 0.f;
      dtuo[q] = dto[q] * uo[q];
    }
  };
  auto reset_at = [&](int tt) {
    return p.seq_ids != nullptr && tt > 0 && tt < t1 && p.seq_ids[bT + tt] != p.seq_ids[bT + tt - 1];
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
        float dto[KT], dtuo[KT], uo[KT];
        owned(t, dto, dtuo, uo);
        stage(t, false);
#pragma unroll
        for (int jj = 0; jj < L; ++jj) {
          const bool rst = reset_at(t + jj);
          const float dt = bcast_token<L, S>(dto, jj, lane), dtu = bcast_token<L, S>(dtuo, jj, lane);
#pragma unroll
          for (int i = 0; i < NS; ++i) {
            const float dAv = rst ? 0.f : fast_exp2(dt * A2[i]);
            h[i] = fmaf(dAv, h[i], dtu * sB[jj][s * NS + i]);
          }
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
      // This lane's tokens: dt, dt*u, u, dy*silu(z), dy*silu'(z) and softplus'(delta).
      float dto[KT], dtuo[KT], uo[KT], dyco[KT], zfo[KT], spgo[KT];
      owned(t, dto, dtuo, uo);
#pragma unroll
      for (int q = 0; q < KT; ++q) {
        const int tt = t + own + q;
        const bool ok = dv && tt < t1;
        const int64_t at = (bT + tt) * Dm + d;
        const float dy = ok ? p.dy[at] : 0.f;
        spgo[q] = ok ? softplus_grad(ld<T>(p.delta, at)) : 0.f;
        if (p.z != nullptr && ok) {
          const float zv = ld<T>(p.z, at), sg = sigmoid_f(zv);
          dyco[q] = dy * zv * sg;
          zfo[q] = dy * sg * (1.f + zv * (1.f - sg));  // dy silu'(z)
        } else {
          dyco[q] = dy;
          zfo[q] = 0.f;
        }
      }
      stage(t, true);
      float dt[L], dtu[L], dyc[L];
      bool rst[L];
#pragma unroll
      for (int jj = 0; jj < L; ++jj) {
        rst[jj] = reset_at(t + jj);
        dt[jj] = bcast_token<L, S>(dto, jj, lane);
        dtu[jj] = bcast_token<L, S>(dtuo, jj, lane);
        dyc[jj] = bcast_token<L, S>(dyco, jj, lane);
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
      // The adjoint, back through the tile. ddt = sum_n gh A a h_{t-1} + u sum_n gh B.
      float ddtA[L], dus[L], vB[L * NS], vC[L * NS];
#pragma unroll
      for (int jj = L - 1; jj >= 0; --jj) {
        ddtA[jj] = 0.f;
        dus[jj] = 0.f;
#pragma unroll
        for (int i = 0; i < NS; ++i) {
          const int n = s * NS + i;
          const float gh = fmaf(dyc[jj], sC[jj][n], g[i]);
          const float ah = aa[jj][i] * (jj == 0 ? hs[i] : hh[jj - 1][i]);
          ddtA[jj] = fmaf(gh * A[i], ah, ddtA[jj]);
          dA[i] = fmaf(gh * dt[jj], ah, dA[i]);
          dus[jj] = fmaf(gh, sB[jj][n], dus[jj]);
          vB[jj * NS + i] = gh * dtu[jj];
          vC[jj * NS + i] = dyc[jj] * hh[jj][i];
          g[i] = aa[jj][i] * gh;
        }
      }
      // Sums over the channel's lanes; each token's owner finishes its gradients.
      sum_over_states<L, S>(yc, lane);
      sum_over_states<L, S>(ddtA, lane);
      sum_over_states<L, S>(dus, lane);
      if (dv && writes_tokens<L, S>(s)) {
#pragma unroll
        for (int q = 0; q < KT; ++q) {
          const int tt = t + own + q;
          if (tt >= t1) continue;
          const int64_t at = (bT + tt) * Dm + d;
          dD = fmaf(dyco[q], uo[q], dD);
          if (p.dz != nullptr) static_cast<T*>(p.dz)[at] = Num<T>::from_f((yc[q] + Dd * uo[q]) * zfo[q]);
          if (p.ddelta != nullptr)
            static_cast<T*>(p.ddelta)[at] = Num<T>::from_f(fmaf(uo[q], dus[q], ddtA[q]) * spgo[q]);
          if (p.du != nullptr) static_cast<T*>(p.du)[at] = Num<T>::from_f(fmaf(dus[q], dto[q], dyco[q] * Dd));
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

  dD = channel_sum<S>(dD);  // the channel's tokens were split over its lanes (all lanes shuffle)
  if (!dv) return;
  if (s == 0 && p.dD != nullptr) atomicAdd(p.dD + d, dD);
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const int n = s * NS + i;
    if (n >= N) continue;
    if (p.dA_log != nullptr) atomicAdd(p.dA_log + static_cast<int64_t>(d) * N + n, dA[i] * A[i]);
    if (seg == 0 && p.dinitial_state != nullptr)
      p.dinitial_state[(static_cast<int64_t>(b) * Dm + d) * N + n] = g[i];
  }
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
  if (!scan_detail::make_args(p, &a)) return cudaErrorInvalidValue;
  if (p.u == nullptr || p.delta == nullptr || p.B == nullptr || p.C == nullptr || p.A_log == nullptr ||
      p.dy == nullptr || p.chunk_states == nullptr || (a.P > 1 && p.workspace == nullptr))
    return cudaErrorInvalidValue;
  return scan_detail::by_dtype_code(static_cast<int>(dtype), [&](auto t) {
    using T = decltype(t);
    return scan_detail::by_state_dim(p.state, [&](auto cf) { return scan_detail::launch_bwd<T, decltype(cf)>(a, stream); });
  });
}

}  // namespace peftfw::kernels::mamba1::cuda
