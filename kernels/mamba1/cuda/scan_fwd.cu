// The selective scan's forward (scan.hpp; layout and passes in scan_common.cuh).
//
// Per channel (b, d) and state n, dt = T(softplus(delta)), A = -exp(A_log):
//   h[t] = exp(dt[t] A) h[t-1] + dt[t] u[t] B[t,n]    (the decay is 0 where seq_ids change)
//   y[t] = (sum_n h[t] C[t,n] + D u[t]) * silu(z[t])
// scan_fwd_kernel<kLocal=false> writes y, the final state and the state before every chunk
// (chunk_states, for the backward). With segments, scan_fwd_kernel<kLocal=true> first writes
// each segment's end state from a zero start and its sum of dt (ws_h, ws_sum), and
// scan_fwd_combine turns those into every segment's start state, in place.
// For N <= kFastMaxState, fast_fwd_kernel (below) does the same with one thread per channel.
#include "scan_common.cuh"

#include <cstdint>

namespace peftfw::kernels::mamba1::cuda {
namespace scan_detail {
namespace {

constexpr int kFwdTile = 8;  // tokens per step of the walk (divides kScanChunk)
static_assert(kScanChunk % kFwdTile == 0, "a chunk is whole tiles");

template <typename T, typename Cf, bool kLocal>
__global__ void __launch_bounds__(Cf::kThreads) scan_fwd_kernel(Args a) {
  constexpr int NS = Cf::NS, S = Cf::S, L = kFwdTile, NP = NS * S;
  __shared__ __align__(16) float sB[L][NP];
  __shared__ __align__(16) float sC[kLocal ? 1 : L][NP];

  const ScanProblem& p = a.p;
  const int tid = threadIdx.x, lane = tid & 31, s = tid % S;
  const int d = blockIdx.x * Cf::CB + tid / S;
  const bool dv = d < a.Dm;
  const int seg = blockIdx.y, b = blockIdx.z;
  const int N = a.N, Dm = a.Dm;
  const int t0 = seg * a.seg_len, t1 = min(a.T, t0 + a.seg_len);
  const int64_t bT = static_cast<int64_t>(b) * a.T;

  float A2[NS], h[NS];
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const int n = s * NS + i;
    const bool ok = dv && n < N;
    A2[i] = ok ? -__expf(p.A_log[static_cast<int64_t>(d) * N + n]) * kLog2e : 0.f;
    h[i] = 0.f;
    if (!kLocal && ok) {
      if (a.P > 1) h[i] = a.ws_h[((static_cast<int64_t>(b) * a.P + seg) * Dm + d) * N + n];
      else if (p.initial_state != nullptr) h[i] = p.initial_state[(static_cast<int64_t>(b) * Dm + d) * N + n];
    }
  }
  const float Dd = (!kLocal && p.D != nullptr && dv) ? p.D[d] : 0.f;
  float dsum = 0.f;
  bool resets = false;

  for (int t = t0; t < t1; t += L) {
    if (!kLocal && p.chunk_states != nullptr && t % kScanChunk == 0 && dv) {
      float* cs = p.chunk_states + ((static_cast<int64_t>(b) * a.nc + t / kScanChunk) * Dm + d) * N;
#pragma unroll
      for (int i = 0; i < NS; ++i)
        if (s * NS + i < N) cs[s * NS + i] = h[i];
    }
    __syncthreads();  // the previous tile's reads of sB / sC are done
    for (int e = tid; e < L * NP; e += Cf::kThreads) {
      const int j = e / NP, n = e % NP, tt = t + j;
      const bool ok = tt < t1 && n < N;
      sB[j][n] = ok ? ld<T>(p.B, (bT + tt) * N + n) : 0.f;
      if constexpr (!kLocal) sC[j][n] = ok ? ld<T>(p.C, (bT + tt) * N + n) : 0.f;
    }
    __syncthreads();

    float dt[L], dtu[L], gate[L], skip[L];
    bool rst[L];
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int tt = t + j;
      const bool ok = dv && tt < t1;
      const int64_t at = (bT + tt) * Dm + d;
      const float u = ok ? ld<T>(p.u, at) : 0.f;
      dt[j] = ok ? dt_of<T>(ld<T>(p.delta, at)) : 0.f;
      dtu[j] = dt[j] * u;
      rst[j] = p.seq_ids != nullptr && tt > 0 && tt < t1 && p.seq_ids[bT + tt] != p.seq_ids[bT + tt - 1];
      if constexpr (!kLocal) {
        float g = 1.f;
        if (p.z != nullptr && ok) {
          const float zv = ld<T>(p.z, at);
          g = zv * sigmoid_f(zv);
        }
        gate[j] = g;
        skip[j] = s == 0 ? Dd * u : 0.f;
      }
    }

    float yp[L];
#pragma unroll
    for (int j = 0; j < L; ++j) {
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < NS; ++i) {
        const int n = s * NS + i;
        const float dA = rst[j] ? 0.f : fast_exp2(dt[j] * A2[i]);
        h[i] = fmaf(dA, h[i], dtu[j] * sB[j][n]);
        if constexpr (!kLocal) acc = fmaf(h[i], sC[j][n], acc);
      }
      if constexpr (!kLocal) {
        yp[j] = (acc + skip[j]) * gate[j];
      } else {
        dsum += dt[j];
        resets = resets || rst[j];
      }
    }

    if constexpr (!kLocal) {
      sum_over_states<L, S>(yp, lane);
      if (dv && writes_tokens<L, S>(s)) {
        const int ft = t + first_token<L, S>(s);
#pragma unroll
        for (int j = 0; j < kept<L, S>(); ++j)
          if (ft + j < t1) p.y[(bT + ft + j) * Dm + d] = yp[j];
      }
    }
  }

  if (!dv) return;
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const int n = s * NS + i;
    if (n >= N) continue;
    if constexpr (kLocal) {
      a.ws_h[((static_cast<int64_t>(b) * a.P + seg) * Dm + d) * N + n] = h[i];
    } else if (seg == a.P - 1 && p.final_state != nullptr) {
      p.final_state[(static_cast<int64_t>(b) * Dm + d) * N + n] = h[i];
    }
  }
  if (kLocal && s == 0) a.ws_sum[(static_cast<int64_t>(b) * a.P + seg) * Dm + d] = resets ? -1.f : dsum;
}

// Per (b, d, n): the start state of every segment from the segments' local end states (in place).
__global__ void scan_fwd_combine(Args a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t DN = static_cast<int64_t>(a.Dm) * a.N;
  if (idx >= a.Bsz * DN) return;
  const int64_t b = idx / DN, dn = idx % DN, d = dn / a.N;
  const float A2 = -__expf(a.p.A_log[dn]) * kLog2e;
  float h = a.p.initial_state != nullptr ? a.p.initial_state[idx] : 0.f;
  for (int q = 0; q < a.P; ++q) {
    const int64_t at = (b * a.P + q) * DN + dn;
    const float sum = a.ws_sum[(b * a.P + q) * a.Dm + d];
    const float local = a.ws_h[at];
    a.ws_h[at] = h;
    h = fmaf(sum < 0.f ? 0.f : fast_exp2(sum * A2), h, local);
  }
}

// ---- fast path (N <= kFastMaxState): one thread per channel, all 16 states in registers ----
constexpr int kFL = 8;  // tokens per tile (divides kScanChunk)
static_assert(kScanChunk % kFL == 0, "a chunk is whole tiles");
constexpr int kFS = kFastMaxState;
constexpr int kFBC = kFL * kFS / kFastCh;  // B (and C) values each thread stages per tile
static_assert(kFL * kFS % kFastCh == 0, "B, C of a tile split evenly over the threads");

// Stores the thread's 16 states h[0..N) at dst (a [.., N] row of float32).
__device__ __forceinline__ void store_states16(float* dst, const float (&h)[kFS], int N) {
  if (N == kFS && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    float4* d4 = reinterpret_cast<float4*>(dst);
#pragma unroll
    for (int g = 0; g < kFS / 4; ++g) d4[g] = make_float4(h[4 * g], h[4 * g + 1], h[4 * g + 2], h[4 * g + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < kFS; ++i)
      if (i < N) dst[i] = h[i];
  }
}

// kLocal = false: y, chunk_states, final_state (the main pass). kLocal = true: each segment's
// end state from a zero start and its sum of dt (-1 where it resets), into ws_h / ws_sum.
template <typename T, bool kLocal>
__global__ void __launch_bounds__(kFastCh, 8) fast_fwd_kernel(Args a) {
  using R = typename Raw<T>::type;
  constexpr int L = kFL;
  __shared__ __align__(16) float sB[2][L][kFS];
  __shared__ __align__(16) float sC[2][kLocal ? 1 : L][kFS];
  __shared__ int sR[2][L];
  __shared__ float4 sTok[L][kFastCh];  // per token: -dt (kResetX at a reset), dt*u, silu(z), D*u

  const ScanProblem& p = a.p;
  const int tid = threadIdx.x;
  const int d = blockIdx.x * kFastCh + tid;
  const bool dv = d < a.Dm;
  const int seg = blockIdx.y, b = blockIdx.z;
  const int N = a.N, Dm = a.Dm;
  const int t0 = seg * a.seg_len, t1 = min(a.T, t0 + a.seg_len);
  const int64_t bT = static_cast<int64_t>(b) * a.T;
  const R* __restrict__ gu = raw_ptr<T>(p.u);
  const R* __restrict__ gdl = raw_ptr<T>(p.delta);
  const R* __restrict__ gz = raw_ptr<T>(p.z);
  const R* __restrict__ gB = raw_ptr<T>(p.B);
  const R* __restrict__ gC = raw_ptr<T>(p.C);
  const int32_t* __restrict__ seq = p.seq_ids;

  float nA2[kFS], h[kFS];
#pragma unroll
  for (int i = 0; i < kFS; ++i) {
    const bool ok = dv && i < N;
    nA2[i] = ok ? neg_a2(p.A_log[static_cast<int64_t>(d) * N + i]) : 1.f;
    h[i] = 0.f;
    if (!kLocal && ok) {
      if (a.P > 1) h[i] = a.ws_h[((static_cast<int64_t>(b) * a.P + seg) * Dm + d) * N + i];
      else if (p.initial_state != nullptr) h[i] = p.initial_state[(static_cast<int64_t>(b) * Dm + d) * N + i];
    }
  }
  const float Dd = (!kLocal && p.D != nullptr && dv) ? p.D[d] : 0.f;
  float dsum = 0.f;
  bool resets = false;

  // Prefetch registers: this channel's u, delta, z of a tile, and a share of its B, C and reset flags.
  R ru[L], rd[L], rz[L], rb[kFBC], rc[kFBC];
  int rs0 = 0, rs1 = 0;
  auto issue = [&](int t) {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int tt = t + j;
      const bool ok = dv && tt < t1;
      const int64_t at = (bT + tt) * Dm + d;
      ru[j] = ok ? gu[at] : R(0);
      rd[j] = ok ? gdl[at] : R(0);
      if (!kLocal) rz[j] = (ok && gz != nullptr) ? gz[at] : R(0);
    }
#pragma unroll
    for (int k = 0; k < kFBC; ++k) {
      const int e = tid + kFastCh * k, j = e / kFS, n = e % kFS;
      const bool ok = t + j < t1 && n < N;
      const int64_t src = (bT + t + j) * N + n;
      rb[k] = ok ? gB[src] : R(0);
      if (!kLocal) rc[k] = ok ? gC[src] : R(0);
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
    for (int k = 0; k < kFBC; ++k) {
      const int e = tid + kFastCh * k, j = e / kFS, n = e % kFS;
      sB[buf][j][n] = Raw<T>::f(rb[k]);
      if (!kLocal) sC[buf][j][n] = Raw<T>::f(rc[k]);
    }
    if (tid < L) sR[buf][tid] = rs1 != rs0;
  };

  issue(t0);
  stage(0);
  __syncthreads();
  int buf = 0;
  for (int t = t0; t < t1; t += L, buf ^= 1) {
    // This tile's per-token values, from the prefetched registers (kept in this thread's
    // column of sTok, which frees the registers for the next tile's prefetch).
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const bool ok = dv && t + j < t1;
      const float u = Raw<T>::f(ru[j]);
      const float dt = ok ? dt_of<T>(Raw<T>::f(rd[j])) : 0.f;
      const bool rst = sR[buf][j] != 0;
      float4 tok;
      tok.x = rst ? kResetX : -dt;
      tok.y = dt * u;
      if constexpr (kLocal) {
        dsum += dt;
        resets = resets || rst;
      } else {
        float gt = 1.f;
        if (gz != nullptr && ok) {
          const float zv = Raw<T>::f(rz[j]);
          gt = zv * sigmoid_f(zv);
        }
        tok.z = gt;
        tok.w = Dd * u;
      }
      sTok[j][tid] = tok;
    }
    const bool more = t + L < t1;
    if (more) issue(t + L);
    if (!kLocal && p.chunk_states != nullptr && t % kScanChunk == 0 && dv)
      store_states16(p.chunk_states + ((static_cast<int64_t>(b) * a.nc + t / kScanChunk) * Dm + d) * N, h, N);

#pragma unroll 1
    for (int j = 0; j < L; ++j) {
      float Bv[kFS], Cv[kFS];
      const float4* b4 = reinterpret_cast<const float4*>(sB[buf][j]);
#pragma unroll
      for (int g = 0; g < kFS / 4; ++g) {
        const float4 v = b4[g];
        Bv[4 * g] = v.x, Bv[4 * g + 1] = v.y, Bv[4 * g + 2] = v.z, Bv[4 * g + 3] = v.w;
      }
      if constexpr (!kLocal) {
        const float4* c4 = reinterpret_cast<const float4*>(sC[buf][j]);
#pragma unroll
        for (int g = 0; g < kFS / 4; ++g) {
          const float4 v = c4[g];
          Cv[4 * g] = v.x, Cv[4 * g + 1] = v.y, Cv[4 * g + 2] = v.z, Cv[4 * g + 3] = v.w;
        }
      }
      const float4 tok = sTok[j][tid];
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < kFS; ++i) {
        const float dA = fast_exp2(tok.x * nA2[i]);
        h[i] = fmaf(dA, h[i], tok.y * Bv[i]);
        if constexpr (!kLocal) acc = fmaf(h[i], Cv[i], acc);
      }
      if constexpr (!kLocal) {
        const int tt = t + j;
        if (dv && tt < t1) p.y[(bT + tt) * Dm + d] = (acc + tok.w) * tok.z;
      }
    }
    if (more) {
      stage(buf ^ 1);
      __syncthreads();
    }
  }

  if (!dv) return;
  if constexpr (kLocal) {
    store_states16(a.ws_h + ((static_cast<int64_t>(b) * a.P + seg) * Dm + d) * N, h, N);
    a.ws_sum[(static_cast<int64_t>(b) * a.P + seg) * Dm + d] = resets ? -1.f : dsum;
  } else {
    if (seg == a.P - 1 && p.final_state != nullptr)
      store_states16(p.final_state + (static_cast<int64_t>(b) * Dm + d) * N, h, N);
  }
}

template <typename T>
cudaError_t launch_fast_fwd(const Args& a, cudaStream_t stream) {
  const dim3 grid((a.Dm + kFastCh - 1) / kFastCh, a.P, a.Bsz);
  if (a.P > 1) {
    fast_fwd_kernel<T, true><<<grid, kFastCh, 0, stream>>>(a);
    const int64_t n = static_cast<int64_t>(a.Bsz) * a.Dm * a.N;
    scan_fwd_combine<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(a);
  }
  fast_fwd_kernel<T, false><<<grid, kFastCh, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename Cf>
cudaError_t launch_fwd(const Args& a, cudaStream_t stream) {
  const dim3 grid((a.Dm + Cf::CB - 1) / Cf::CB, a.P, a.Bsz);
  if (a.P > 1) {
    scan_fwd_kernel<T, Cf, true><<<grid, Cf::kThreads, 0, stream>>>(a);
    const int64_t n = static_cast<int64_t>(a.Bsz) * a.Dm * a.N;
    scan_fwd_combine<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(a);
  }
  scan_fwd_kernel<T, Cf, false><<<grid, Cf::kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

// Fills the sizes and segment split of Args; false where the kernels do not take the sizes.
bool make_args(const ScanProblem& p, Args* a, bool bwd) {
  if (!scan_supported(p.batch, p.seqlen, p.dim, p.state)) return false;
  a->p = p;
  a->Bsz = static_cast<int>(p.batch);
  a->T = static_cast<int>(p.seqlen);
  a->Dm = static_cast<int>(p.dim);
  a->N = static_cast<int>(p.state);
  a->nc = static_cast<int>(scan_chunks(p.seqlen));
  a->P = static_cast<int>(fast_path(p.state) ? fast_segments(p.batch, p.seqlen, p.dim, bwd)
                                              : segments_for(p.batch, p.seqlen, p.dim, p.state));
  a->seg_len = ((a->nc + a->P - 1) / a->P) * kScanChunk;
  a->ws_h = p.workspace;
  a->ws_sum = a->P > 1 ? p.workspace + static_cast<int64_t>(a->Bsz) * a->P * a->Dm * a->N : nullptr;
  return true;
}

}  // namespace scan_detail

bool scan_supported(int64_t batch, int64_t seqlen, int64_t dim, int64_t state) {
  return batch >= 1 && batch <= 65535 && seqlen >= 1 && dim >= 1 && state >= 1 && state <= kScanMaxState &&
         seqlen <= (int64_t{1} << 30) && dim <= (int64_t{1} << 30) &&
         batch * seqlen <= (int64_t{1} << 40);
}

int64_t scan_workspace_floats(int64_t batch, int64_t seqlen, int64_t dim, int64_t state) {
  if (!scan_supported(batch, seqlen, dim, state)) return 0;
  const int64_t P = scan_detail::fast_path(state)
                        ? std::max(scan_detail::fast_segments(batch, seqlen, dim, false),
                                   scan_detail::fast_segments(batch, seqlen, dim, true))
                        : scan_detail::segments_for(batch, seqlen, dim, state);
  return P > 1 ? batch * P * dim * (state + 1) : 0;
}

cudaError_t selective_scan_fwd(DType dtype, const ScanProblem& p, cudaStream_t stream) {
  scan_detail::Args a;
  if (!scan_detail::make_args(p, &a, false)) return cudaErrorInvalidValue;
  if (p.u == nullptr || p.delta == nullptr || p.B == nullptr || p.C == nullptr || p.A_log == nullptr ||
      p.y == nullptr || (a.P > 1 && p.workspace == nullptr))
    return cudaErrorInvalidValue;
  return scan_detail::by_dtype_code(static_cast<int>(dtype), [&](auto t) {
    using T = decltype(t);
    if (scan_detail::fast_path(p.state)) return scan_detail::launch_fast_fwd<T>(a, stream);
    return scan_detail::by_state_dim(p.state, [&](auto cf) { return scan_detail::launch_fwd<T, decltype(cf)>(a, stream); });
  });
}

}  // namespace peftfw::kernels::mamba1::cuda
