// The selective scan's forward (scan.hpp; layout and passes in scan_common.cuh).
//
// Per channel (b, d) and state n, dt = T(softplus(delta)), A = -exp(A_log):
//   h[t] = exp(dt[t] A) h[t-1] + dt[t] u[t] B[t,n]    (the decay is 0 where seq_ids change)
//   y[t] = (sum_n h[t] C[t,n] + D u[t]) * silu(z[t])
// scan_fwd_kernel<kLocal=false> writes y, the final state and the state before every chunk
// (chunk_states, for the backward). With segments, scan_fwd_kernel<kLocal=true> first writes
// each segment's end state from a zero start and its sum of dt (ws_h, ws_sum), and
// scan_fwd_combine turns those into every segment's start state, in place.
#include "scan_common.cuh"

namespace peftfw::kernels::mamba1::cuda {
namespace scan_detail {
namespace {

constexpr int kFwdTile = 8;  // tokens per step of the walk (divides kScanChunk)
static_assert(kScanChunk % kFwdTile == 0, "a chunk is whole tiles");

template <typename T, typename Cf, bool kLocal>
__global__ void __launch_bounds__(Cf::kThreads) scan_fwd_kernel(Args a) {
  constexpr int NS = Cf::NS, S = Cf::S, L = kFwdTile, NP = NS * S, K = kept<L, S>();
  constexpr int E = (L * NP + Cf::kThreads - 1) / Cf::kThreads;  // B (and C) elements staged per thread
  // Double-buffered: tile i is stored into buffer i&1 and read after one barrier; by then every
  // thread has finished tile i-1, the last reader of the buffer tile i+1 overwrites.
  __shared__ __align__(16) float sB[2][L][NP];
  __shared__ __align__(16) float sC[2][kLocal ? 1 : L][NP];

  const ScanProblem& p = a.p;
  const int tid = threadIdx.x, lane = tid & 31, s = tid % S;
  const int d = blockIdx.x * Cf::CB + tid / S;
  const bool dv = d < a.Dm;
  const int seg = blockIdx.y, b = blockIdx.z;
  const int N = a.N, Dm = a.Dm;
  const int t0 = seg * a.seg_len, t1 = min(a.T, t0 + a.seg_len);
  const int64_t bT = static_cast<int64_t>(b) * a.T;
  const int own = first_token<L, S>(s);  // this lane's tokens: own .. own+K-1 of each tile

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

  // The next tile's raw inputs, loaded a tile ahead.
  const T zero = Num<T>::from_f(0.f);
  T ru[K], rd[K], rz[K], rb[E], rc[E];
  auto fetch = [&](int t) {
#pragma unroll
    for (int q = 0; q < K; ++q) {
      const int tt = t + own + q;
      const bool ok = dv && tt < t1;
      const int64_t at = (bT + tt) * Dm + d;
      ru[q] = ok ? static_cast<const T*>(p.u)[at] : zero;
      rd[q] = ok ? static_cast<const T*>(p.delta)[at] : zero;
      rz[q] = (!kLocal && ok && p.z != nullptr) ? static_cast<const T*>(p.z)[at] : zero;
    }
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int e = tid + k * Cf::kThreads, j = e / NP, n = e % NP, tt = t + j;
      const bool ok = e < L * NP && tt < t1 && n < N;
      rb[k] = ok ? static_cast<const T*>(p.B)[(bT + tt) * N + n] : zero;
      rc[k] = (!kLocal && ok) ? static_cast<const T*>(p.C)[(bT + tt) * N + n] : zero;
    }
  };
  if (t0 < t1) fetch(t0);

  int buf = 0;
  for (int t = t0; t < t1; t += L, buf ^= 1) {
    if (!kLocal && p.chunk_states != nullptr && t % kScanChunk == 0 && dv) {
      float* cs = p.chunk_states + ((static_cast<int64_t>(b) * a.nc + t / kScanChunk) * Dm + d) * N;
#pragma unroll
      for (int i = 0; i < NS; ++i)
        if (s * NS + i < N) cs[s * NS + i] = h[i];
    }
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int e = tid + k * Cf::kThreads;
      if (e < L * NP) {
        sB[buf][e / NP][e % NP] = Num<T>::to_f(rb[k]);
        if constexpr (!kLocal) sC[buf][e / NP][e % NP] = Num<T>::to_f(rc[k]);
      }
    }
    // This lane's tokens: dt, dt*u, u and the gate.
    float dto[K], dtuo[K], uo[K], go[K];
#pragma unroll
    for (int q = 0; q < K; ++q) {
      const bool ok = dv && t + own + q < t1;
      uo[q] = Num<T>::to_f(ru[q]);
      dto[q] = ok ? dt_of<T>(Num<T>::to_f(rd[q])) : 0.f;
      dtuo[q] = dto[q] * uo[q];
      go[q] = 1.f;
      if (!kLocal && p.z != nullptr) {
        const float zv = Num<T>::to_f(rz[q]);
        go[q] = zv * sigmoid_f(zv);
      }
    }
    if (t + L < t1) fetch(t + L);
    __syncthreads();

    float yp[L];
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int tt = t + j;
      const bool rst = p.seq_ids != nullptr && tt > 0 && tt < t1 && p.seq_ids[bT + tt] != p.seq_ids[bT + tt - 1];
      const float dt = bcast_token<L, S>(dto, j, lane), dtu = bcast_token<L, S>(dtuo, j, lane);
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < NS; ++i) {
        const int n = s * NS + i;
        const float dA = rst ? 0.f : fast_exp2(dt * A2[i]);
        h[i] = fmaf(dA, h[i], dtu * sB[buf][j][n]);
        if constexpr (!kLocal) acc = fmaf(h[i], sC[buf][j][n], acc);
      }
      yp[j] = acc;
      if constexpr (kLocal) {
        dsum += dt;
        resets = resets || rst;
      }
    }

    if constexpr (!kLocal) {
      sum_over_states<L, S>(yp, lane);
      if (dv && writes_tokens<L, S>(s)) {
#pragma unroll
        for (int q = 0; q < K; ++q) {
          const int tt = t + own + q;
          if (tt < t1) p.y[(bT + tt) * Dm + d] = (yp[q] + Dd * uo[q]) * go[q];
        }
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
bool make_args(const ScanProblem& p, Args* a) {
  if (!scan_supported(p.batch, p.seqlen, p.dim, p.state)) return false;
  a->p = p;
  a->Bsz = static_cast<int>(p.batch);
  a->T = static_cast<int>(p.seqlen);
  a->Dm = static_cast<int>(p.dim);
  a->N = static_cast<int>(p.state);
  a->nc = static_cast<int>(scan_chunks(p.seqlen));
  a->P = static_cast<int>(segments_for(p.batch, p.seqlen, p.dim, p.state));
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
  const int64_t P = scan_detail::segments_for(batch, seqlen, dim, state);
  return P > 1 ? batch * P * dim * (state + 1) : 0;
}

cudaError_t selective_scan_fwd(DType dtype, const ScanProblem& p, cudaStream_t stream) {
  scan_detail::Args a;
  if (!scan_detail::make_args(p, &a)) return cudaErrorInvalidValue;
  if (p.u == nullptr || p.delta == nullptr || p.B == nullptr || p.C == nullptr || p.A_log == nullptr ||
      p.y == nullptr || (a.P > 1 && p.workspace == nullptr))
    return cudaErrorInvalidValue;
  return scan_detail::by_dtype_code(static_cast<int>(dtype), [&](auto t) {
    using T = decltype(t);
    return scan_detail::by_state_dim(p.state, [&](auto cf) { return scan_detail::launch_fwd<T, decltype(cf)>(a, stream); });
  });
}

}  // namespace peftfw::kernels::mamba1::cuda
