// Device helpers and the thread layouts shared by the selective scan's kernels (scan_fwd.cu,
// scan_bwd.cu).
//
// Two sets of kernels: the fast path for N <= kFastMaxState (16), described at its helpers
// below and in scan_fwd.cu / scan_bwd.cu, and the general one (any N <= kScanMaxState) here.
// Both write and read chunk_states alike and share the segment combine kernels.
//
// General layout: S consecutive lanes share one channel (b, d); lane s holds the NS states
// n = s*NS .. s*NS+NS-1 in registers (states past N are padding: A = B = C = 0, so they stay 0).
// A block of 512/NS threads covers CB = threads/S channels of one batch row and one segment
// of the sequence (blockIdx = (channel tile, segment, batch)); each thread walks its segment
// token by token, kTile tokens at a time. Sums over n (y, and the backward's per-token
// gradients) and over d (the backward's dB, dC) are transposed butterfly reductions over the
// tile: each shuffle halves the values a lane holds, so a lane ends with whole sums for a few
// (token, state) pairs instead of every lane shuffling every value.
//
// Long sequences with few channels are split into segments of whole chunks (kScanChunk) run
// by separate blocks: a first pass finds each segment's end state from zero (forward; the
// backward its start adjoint from zero), a combine kernel carries them across segments
// (the recurrence is linear), and the main pass runs each segment from its true start.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../../common/cuda/element.cuh"
#include "scan.hpp"

namespace peftfw::kernels::mamba1::cuda {
namespace scan_detail {

using namespace ::peftfw::kernels::cuda;  // element.cuh

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxSegments = 64;

template <int NS_, int S_>
struct Cfg {
  static constexpr int NS = NS_;             // states per lane
  static constexpr int S = S_;               // lanes per channel
  static constexpr int kThreads = 512 / NS;  // 128, 64 or 32
  static constexpr int CB = kThreads / S;    // channels per block
  static constexpr int W = kThreads / 32;    // warps per block
  static_assert(S >= 1 && S <= 32 && 32 % S == 0, "S must divide a warp");
  static_assert(kThreads % 32 == 0, "whole warps");
};

// Calls f(Cfg<NS,S>{}) for the layout that covers N states.
template <typename F>
cudaError_t by_state_dim(int64_t N, F&& f) {
  if (N <= 16) return f(Cfg<4, 4>{});
  if (N <= 32) return f(Cfg<4, 8>{});
  if (N <= 64) return f(Cfg<4, 16>{});
  if (N <= 128) return f(Cfg<8, 16>{});
  if (N <= 256) return f(Cfg<16, 16>{});
  return cudaErrorInvalidValue;
}

inline int threads_for(int64_t N) { return N <= 64 ? 128 : N <= 128 ? 64 : 32; }
inline int lanes_for(int64_t N) { return N <= 16 ? 4 : N <= 32 ? 8 : 16; }

// Segments the sequence is split into: 1 when the channels alone fill the GPU, else enough
// (whole chunks each, at most kMaxSegments) to give every SM a few dozen warps.
inline int64_t segments_for(int64_t batch, int64_t seqlen, int64_t dim, int64_t state) {
  const int threads = threads_for(state), cb = threads / lanes_for(state);
  const int64_t warps = batch * ((dim + cb - 1) / cb) * (threads / 32);
  const int64_t target = static_cast<int64_t>(sm_count()) * 24;
  const int64_t nc = scan_chunks(seqlen);
  if (warps >= target || nc <= 1) return 1;
  int64_t P = std::min<int64_t>({nc, (target + warps - 1) / warps, kMaxSegments});
  const int64_t per = (nc + P - 1) / P;
  return (nc + per - 1) / per;
}

// Kernel arguments: the problem's pointers plus 32-bit sizes and the segment split.
struct Args {
  ScanProblem p;
  int Bsz, T, Dm, N;
  int nc;         // chunks
  int P;          // segments
  int seg_len;    // tokens per segment (a multiple of kScanChunk)
  float* ws_h;    // [B,P,D,N]: per-segment states / adjoints (P > 1)
  float* ws_sum;  // [B,P,D]: per-segment sum of dt, or -1 where the state resets inside
};

// Fills the sizes and segment split of the forward (bwd = false) or the backward (scan_fwd.cu);
// false where the kernels do not take the sizes.
bool make_args(const ScanProblem& p, Args* a, bool bwd);

// ---- fast path (N <= kFastMaxState) ----------------------------------------------------
// Layout: one block covers kFastCh consecutive channels of one batch row and one segment.
// Forward (scan_fwd.cu): one thread per channel holding all 16 (padded) states in registers;
// B, C of a tile of tokens are staged in shared memory (broadcast reads) and the next tile's
// inputs are prefetched into registers. Backward (scan_bwd.cu): two threads per channel
// (8 states each), see there. Padded states (n >= N) have B = C = 0 and a positive nA2, so
// they stay 0. A reset (seq_ids change) is applied as an exponent of kResetX: exp2 of
// kResetX * nA2 is 0 for every nA2 >= kMinNA2.
constexpr int kFastMaxState = 16;
constexpr int kFastCh = 64;
constexpr float kResetX = -1e33f;
constexpr float kMinNA2 = 1e-30f;
constexpr float kLn2 = 0.6931471805599453f;

inline bool fast_path(int64_t N) { return N <= kFastMaxState; }

// Segments for the fast kernels: the split (whole chunks per segment) that minimises a simple
// cost model: chunks walked by the most loaded SM, slowed where too few blocks share an SM
// (sat: blocks per SM that keep it busy), plus the extra pass segments need (extra: its cost
// relative to the main pass).
inline int64_t fast_segments(int64_t batch, int64_t seqlen, int64_t dim, bool bwd) {
  const int64_t nc = scan_chunks(seqlen);
  const double sm = static_cast<double>(sm_count());
  const double units = static_cast<double>(batch) * static_cast<double>((dim + kFastCh - 1) / kFastCh);
  const double sat = bwd ? 2.0 : 5.0;
  const double extra = bwd ? 0.25 : 0.85;
  int64_t best = 1;
  double best_cost = 1e300;
  const int64_t pmax = std::min<int64_t>(nc, kMaxSegments);
  for (int64_t P = 1; P <= pmax; ++P) {
    const int64_t per = (nc + P - 1) / P;
    if ((nc + per - 1) / per != P) continue;  // not an exact split into P segments
    const double blocks = units * static_cast<double>(P);
    const double per_sm = std::ceil(blocks / sm);
    const double busy = std::min(1.0, blocks / (sm * sat));
    const double cost = per_sm * static_cast<double>(per) / busy * (P > 1 ? 1.0 + extra : 1.0);
    if (cost < best_cost * 0.999) {
      best_cost = cost;
      best = P;
    }
  }
  return best;
}

// -A * log2(e) = exp(A_log) * log2(e), at least kMinNA2.
__device__ __forceinline__ float neg_a2(float A_log) { return fmaxf(__expf(A_log) * kLog2e, kMinNA2); }

// Raw element storage of T (loaded into registers without converting, so that a prefetch does
// not wait for its data) and its conversion to float.
template <typename T>
struct Raw;
template <>
struct Raw<float> {
  using type = float;
  static __device__ __forceinline__ float f(float v) { return v; }
};
template <>
struct Raw<__half> {
  using type = unsigned short;
  static __device__ __forceinline__ float f(unsigned short v) { return __half2float(__ushort_as_half(v)); }
};
template <>
struct Raw<__nv_bfloat16> {
  using type = unsigned short;
  static __device__ __forceinline__ float f(unsigned short v) { return __uint_as_float(static_cast<unsigned>(v) << 16); }
};
template <typename T>
__device__ __forceinline__ const typename Raw<T>::type* raw_ptr(const void* p) {
  return static_cast<const typename Raw<T>::type*>(p);
}

__device__ __forceinline__ void cp_async4(float* smem, const float* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// softplus with torch's threshold 20 (beta 1), in float32.
__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(__expf(x)); }
// Its derivative (torch's softplus backward): 1 above the threshold, else sigmoid(x).
__device__ __forceinline__ float softplus_grad(float x) {
  if (x > 20.f) return 1.f;
  const float e = __expf(x);
  return e / (e + 1.f);
}
__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }

// dt as the reference gets it: softplus in float32, rounded to T.
template <typename T>
__device__ __forceinline__ float dt_of(float delta) {
  return round_to<T>(softplus_f(delta));
}

template <typename T>
__device__ __forceinline__ float ld(const void* p, int64_t i) {
  return Num<T>::to_f(static_cast<const T*>(p)[i]);
}

// ---- transposed butterfly sums ----------------------------------------------------
// v holds CNT values per lane. Over the lanes whose ids differ only in the bits of MASK..LOW
// (powers of two, MASK >= LOW), sums each value: a lane with mask bit set keeps the upper
// half of its values, sends the lower half, and adds its partner's; once one value is left,
// the remaining bits are summed whole. Afterwards v[0 .. max(1, CNT/lanes)) of a lane hold
// the sums of values (group * CNT/lanes + j), where group is the lane's MASK..LOW bits
// (with fewer values than lanes, value index group / (lanes/CNT)).
template <int CNT, int MASK, int LOW>
struct Butterfly {
  static __device__ __forceinline__ void run(float* v, int lane) {
    if constexpr (CNT > 1) {
      const bool upper = (lane & MASK) != 0;
#pragma unroll
      for (int j = 0; j < CNT / 2; ++j) {
        const float send = upper ? v[j] : v[j + CNT / 2];
        const float keep = upper ? v[j + CNT / 2] : v[j];
        v[j] = keep + __shfl_xor_sync(0xffffffffu, send, MASK);
      }
      if constexpr (MASK > LOW) Butterfly<CNT / 2, MASK / 2, LOW>::run(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], MASK);
      if constexpr (MASK > LOW) Butterfly<1, MASK / 2, LOW>::run(v, lane);
    }
  }
};

// Values left per lane after Butterfly<CNT, ...> over `lanes` lanes.
template <int CNT, int LANES>
__host__ __device__ constexpr int kept() {
  return CNT >= LANES ? CNT / LANES : 1;
}

// Sum over the S lanes of a channel (lane bits S/2 .. 1) of per-token values v[L]. Afterwards
// the lane holds kept<L,S>() sums, for tokens first_token<L,S>(s) + j.
template <int L, int S>
__device__ __forceinline__ void sum_over_states(float (&v)[L], int lane) {
  if constexpr (S > 1) Butterfly<L, S / 2, 1>::run(v, lane);
}
template <int L, int S>
__device__ __forceinline__ int first_token(int s) {
  return L >= S ? s * (L / S) : s / (S / L);
}
// Whether lane s writes its sums (with fewer tokens than lanes, several hold the same sum).
template <int L, int S>
__device__ __forceinline__ bool writes_tokens(int s) {
  return L >= S ? true : (s % (S / L)) == 0;
}

}  // namespace scan_detail
}  // namespace peftfw::kernels::mamba1::cuda
