// The fused SSD path's per-chunk bookkeeping (ssd_fused.cpp) as two kernels, where the
// LibTorch composition takes about twenty small launches each way. Chunk length Lc = 128.
// Torch-free so that the CPU CI machine compiles them with nvcc.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace peftfw::kernels::mamba2::cuda {

constexpr int64_t kSsdPrepChunk = 128;

// From dt [B,T,H] float32 (after softplus, bias and limits), A [H] float32 and seq [B,T]
// int64 (null: one sequence per row), with positions t >= T reading dt = 0:
//   seg [B,nc,Lc] int32   number of sequence starts (t > 0, seq_t != seq_{t-1}) in the chunk up to l
//   cum [B,nc,H,Lc]       inclusive sum over the chunk of A dt
//   Ld = exp(cum_last - cum_l) where seg_l == seg_last, else 0        [B,nc,H,Lc]
//   E  = exp(cum_l) where seg_l == 0, else 0                          [B,nc,H,Lc]
//   dec = exp(cum_last) where seg_last == 0, else 0                   [B,nc,H]
cudaError_t ssd_chunk_prep(const float* dt, const float* A, const int64_t* seq, int64_t B, int64_t T, int64_t H,
                           int64_t nc, int32_t* seg, float* cum, float* Ld, float* E, float* dec,
                           cudaStream_t stream);

// The log-decay chain of the backward. Per (b, c, h), with g = dcum_E + dcum_diag and
// g_last += ddec dec + sum_l dLd_l (all [B,nc,H,Lc] but ddec, dec [B,nc,H]):
//   da_l = sum_{k >= l} g_k                      (cum = cumsum(a), a = A dt)
//   ddt[b, c*Lc + l, h] = ddt_u_l + da_l A_h     for c*Lc + l < T      [B,T,H] float32
//   dA_part[b*nc + c, h] = sum_l da_l dt_l                            [B*nc,H] float32
// (summing dA_part over its first dimension gives dA, in a fixed order).
cudaError_t ssd_chunk_decay_grad(const float* dcum_E, const float* dcum_diag, const float* dLd, const float* ddec,
                                 const float* dec, const float* ddt_u, const float* dt, const float* A, int64_t B,
                                 int64_t T, int64_t H, int64_t nc, float* ddt, float* dA_part, cudaStream_t stream);

// dt [n] float32 = clamp(softplus(raw + bias[h]), lo, hi) for raw [n] of dtype code
// `dtype` (0 float32, 1 float16, 2 bfloat16), h = i % H, rounded to that dtype after the add,
// the softplus and the clamp as the LibTorch composition in the input dtype does (ssd_dt);
// and A [H] = -exp(A_log), float32.
cudaError_t ssd_dt_fwd(int dtype, const void* raw, const float* bias, const float* A_log, int64_t n, int64_t H,
                       float lo, float hi, float* dt, float* A, cudaStream_t stream);

// Its backward, for g = dL/d(dt) [n] float32 and dA [H] float32 (null: none):
//   draw [n] (dtype `dtype`) = g * [lo <= softplus(v) <= hi] * sigmoid(v)   (v = raw + bias; 1 past 20)
//   bias_part [ssd_dt_blocks(n, H), H] float32: per-block sums of draw over rows (sum them for dbias)
//   dA_log [H] = dA * A  (when dA is given)
int64_t ssd_dt_blocks(int64_t n, int64_t H);
cudaError_t ssd_dt_bwd(int dtype, const float* g, const void* raw, const float* bias, const float* A_log,
                       const float* dA, int64_t n, int64_t H, float lo, float hi, void* draw, float* bias_part,
                       float* dA_log, cudaStream_t stream);

}  // namespace peftfw::kernels::mamba2::cuda
