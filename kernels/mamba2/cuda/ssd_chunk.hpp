// Fused per-chunk SSD kernels (tensor cores, mma.sync; 16-bit inputs, float32 accumulation):
// ssd_chunk_fwd.cu (the chunk states with their recurrence, the output), ssd_chunk_bwd.cu
// (the incoming-state, chunk-state and within-chunk backward), ssd_chunk_cb.cu (C.B and its
// backward). A thread block works on one (batch, chunk) and one head, or a few
// heads of one group in turn (all but the chunk-state kernels and C.B's), and keeps the
// chunk's operands in shared memory or registers, so the [Lc,Lc] decay-weighted matrices and
// the [Lc,P] partial products of the unfused scan (ssd_fused.cpp) never reach global memory. Chunk length Lc = 128, head dim P in {32, 64}, state N in
// {64, 128}, dtype code 1 (float16) or 2 (bfloat16). Torch-free, so CI
// compiles it with nvcc on a machine without a GPU.
//
// Layouts (float32 unless said otherwise; T = the 16-bit input type):
//   x [B,T,H,P] T: element (b,t,h,p) at x + b*x_sb + t*x_st + h*P + p
//   B, C [B,T,G,N] T: likewise with (b_sb, b_st) and (c_sb, c_st)
//   dt [B,T,H] (after softplus / bias / limit), dy [B,T,H,P], y [B,T,H,P], dx [B,T,H,P] T: contiguous
//   cum, Ld, E, ddt_u, dcum, dLd, dcum_E: [B,nc,H,Lc]; seg [B,nc,Lc] int32
//   CB, dCB: [B,nc,G,Lc,Lc]; prev, dS, dH_off: [B,nc,H,P,N] T
//   dC_off, dB_S: [B,nc,G,Lc,N] (the cross-head parts of dC and dB, summed over the group's heads)
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace peftfw::kernels::mamba2::cuda {

constexpr int64_t kSsdChunk = 128;

struct SsdChunkDims {
  int64_t B, T, H, P, G, N, nc;
  int64_t x_sb, x_st, b_sb, b_st, c_sb, c_st;
};

// Whether the fused kernels cover this head dim, state size and dtype code.
bool ssd_chunk_supported(int64_t P, int64_t N, int dtype);

// The chunk states and the recurrence over chunks in one kernel:
// prev[b,c,h] = H_c (T), H_{c+1} = dec[b,c,h] H_c + S[b,c,h] with
// S[b,c,h] = sum_s (dt_s Ld_s x_s)^T B_s (the chunk's own contribution to its end state) kept in
// float32, final [B,H,P,N] = H_nc (float32); init [B,H,P,N] float32 or null (zeros).
// dec [B,nc,H] float32.
cudaError_t ssd_chunk_states_pass(int dtype, const SsdChunkDims& d, const void* x, const float* dt,
                                  const float* Ld, const void* B, const float* dec, const float* init, void* prev,
                                  float* final_state, cudaStream_t stream);

// y_l = sum_{s<=l, same segment} CB[l,s] exp(cum_l - cum_s) dt_s x_s + E_l C_l prev^T + D x_l
// D may be null.
cudaError_t ssd_chunk_scan_fwd(int dtype, const SsdChunkDims& d, const void* x, const float* dt,
                               const float* cum, const int32_t* seg, const float* CB, const float* E,
                               const void* C, const void* prev, const float* D, float* y,
                               cudaStream_t stream);

// Backward of the incoming-state term: with dyE = dy * E (never stored), dH_off = dyE^T C,
// dcum_E_l = dyE_l . (C_l prev^T), and dC_off[l] += sum over the group's heads of dyE_l prev
// (dC_off zeroed by the caller; float32 atomics, so the summation order varies).
cudaError_t ssd_chunk_bwd_off(int dtype, const SsdChunkDims& d, const float* dy, const float* E,
                              const void* C, const void* prev, void* dH_off, float* dcum_E, float* dC_off,
                              cudaStream_t stream);

// Backward of the chunk states S = (dt Ld x)^T B through B: dB_S[l] += sum over the group's
// heads of dt_l Ld_l x_l dS (dB_S zeroed by the caller; float32 atomics).
cudaError_t ssd_chunk_bwd_db(int dtype, const SsdChunkDims& d, const void* x, const float* dt, const float* Ld,
                             const void* dS, float* dB_S, cudaStream_t stream);

// Backward of the within-chunk term and of the chunk states (except through B, see
// ssd_chunk_bwd_db), given dS (the gradient of the state leaving each chunk). Writes dx
// (incl. D dy), ddt_u = du . x, dLd = Ld (u . B dS^T), dcum = rowsum(W) - colsum(W) - dLd
// with W = dM * M; adds into dCB (zeroed by the caller) and dD (zeroed, may be null together
// with D).
cudaError_t ssd_chunk_bwd_diag(int dtype, const SsdChunkDims& d, const void* x, const float* dt,
                               const float* cum, const int32_t* seg, const float* CB, const float* Ld,
                               const void* B, const float* dy, const void* dS, const float* D, void* dx,
                               float* ddt_u, float* dcum, float* dLd, float* dCB, float* dD,
                               cudaStream_t stream);

// CB [B,nc,G,Lc,Lc] = C B^T per chunk and group (float32 accumulation, zero past T).
cudaError_t ssd_chunk_cb(int dtype, const SsdChunkDims& d, const void* B, const void* C, float* CB,
                         cudaStream_t stream);

// The gradients of B and C, [B,T,G,N] in the inputs' dtype T: dC = dC_off + dCB B and
// dB = dB_S + dCB^T C per chunk (dCB lower triangular, float32; the products on TF32 tensor
// cores with dCB split in two TF32 terms).
cudaError_t ssd_chunk_cb_bwd(int dtype, const SsdChunkDims& d, const void* B, const void* C, const float* dCB,
                             const float* dC_off, const float* dB_S, void* dC, void* dB, cudaStream_t stream);

}  // namespace peftfw::kernels::mamba2::cuda
