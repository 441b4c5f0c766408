// CUDA kernels for the two elementwise passes of the fast SSD scan over the
// [Lc,Lc] decay matrices (see ssd_fused.cpp). Torch-free so that the CPU CI
// machine compiles them with nvcc.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace peftfw::kernels::mamba2::cuda {

// M[bc,h,l,s] = CB[bc,g,l,s] * exp(cum[bc,h,l] - cum[bc,h,s]) for l >= s and
// seg[bc,l] == seg[bc,s], else 0. out_dtype: 0 float32, 1 float16, 2 bfloat16.
// Lc must be 32, 64 or 128.
cudaError_t ssd_build_decay_cb(int out_dtype, const float* CB, const float* cum, const int32_t* seg,
                               void* M, int64_t BC, int64_t G, int64_t Hg, int64_t Lc,
                               cudaStream_t stream);

// Backward of the above: dCB[bc,g] += sum over the group's heads of dM * L
// (dCB must be zeroed by the caller) and dcum[bc,h,l] = rowsum_l(W) - colsum_l(W)
// with W = dM * L * CB. dM has dtype in_dtype (codes as above).
cudaError_t ssd_build_decay_cb_backward(int in_dtype, const void* dM, const float* CB,
                                        const float* cum, const int32_t* seg, float* dCB,
                                        float* dcum, int64_t BC, int64_t G, int64_t Hg, int64_t Lc,
                                        cudaStream_t stream);

// The chunk-state recurrence H_{c+1} = dec_c * H_c + S_c over c = 0..nc-1, per
// element of [B, H, P*N] (PN = P*N): prev[c] = H_c (dtype code as above, same
// as S), final = H_nc (float32). init may be null (zeros). Float32 running state.
cudaError_t ssd_state_passing(int dtype, const void* S, const float* dec, const float* init, void* prev,
                              float* final_state, int64_t B, int64_t nc, int64_t H, int64_t PN,
                              cudaStream_t stream);

// Its backward: g = dfinal (null: 0); for c = nc-1..0: dS[c] = g,
// ddec[b,c,h] += sum over PN of g * prev[c], g = dH_off[c] + dec_c * g; dinit = g.
// ddec must be zeroed by the caller; dinit may be null.
cudaError_t ssd_state_passing_backward(int dtype, const void* dH_off, const float* dec,
                                       const float* dfinal, const void* prev, void* dS, float* ddec,
                                       float* dinit, int64_t B, int64_t nc, int64_t H, int64_t PN,
                                       cudaStream_t stream);

}  // namespace peftfw::kernels::mamba2::cuda
