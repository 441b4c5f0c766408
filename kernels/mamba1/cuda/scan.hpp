// Torch-free launchers for the Mamba-1 selective scan (scan_fwd.cu, scan_bwd.cu) and its
// decoding step (scan_step.cu). Pointers are device pointers to contiguous row-major buffers;
// `void*` buffers hold `dtype` elements, everything else is stated. Each launcher enqueues its
// kernels on `stream` and returns cudaGetLastError() (or cudaErrorInvalidValue, without
// launching anything, for arguments it does not support). Math is float32; the only rounding
// to `dtype` is dt = dtype(softplus(delta)), as the LibTorch reference (kernels/mamba1/reference.cpp)
// computes softplus in delta's dtype.
//
// The scan keeps the float32 state of each chunk of kScanChunk tokens' start (chunk_states)
// for the backward, which recomputes the states chunk by chunk from them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../../common/cuda/launch.hpp"

namespace peftfw::kernels::mamba1::cuda {

using ::peftfw::kernels::cuda::DType;

// Tokens between two saved states (the backward's unit of recomputation).
constexpr int kScanChunk = 64;
// Largest state dimension the kernels take (the glue falls back to the reference above it).
constexpr int64_t kScanMaxState = 256;

struct ScanProblem {
  int64_t batch = 0, seqlen = 0, dim = 0, state = 0;  // B, T, D, N
  // Inputs: u, delta, z [B,T,D] and B, C [B,T,N] (dtype); A_log [D,N], D [D] (nullable) and
  // initial_state [B,D,N] (nullable) float32; seq_ids [B,T] int32 (nullable); z nullable.
  const void* u = nullptr;
  const void* delta = nullptr;
  const void* z = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const float* A_log = nullptr;
  const float* D = nullptr;
  const float* initial_state = nullptr;
  const int32_t* seq_ids = nullptr;
  // [B, n_chunks, D, N] float32, n_chunks = ceil(T / kScanChunk): the state before each chunk.
  // Written by the forward (nullable there: inference), read by the backward.
  float* chunk_states = nullptr;
  // Scratch of scan_workspace_floats() float32 elements (both directions).
  float* workspace = nullptr;

  // Forward outputs: y [B,T,D] and final_state [B,D,N], float32.
  float* y = nullptr;
  float* final_state = nullptr;

  // Backward inputs: dy [B,T,D] float32; dfinal [B,D,N] float32 (nullable: zero).
  const float* dy = nullptr;
  const float* dfinal = nullptr;
  // Backward outputs, each nullable (not computed): du, ddelta, dz [B,T,D] dtype (written);
  // dA_log [D,N], dB, dC [B,T,N], dD [D] float32, zero-filled by the caller (accumulated
  // with atomicAdd); dinitial_state [B,D,N] float32 (written).
  void* du = nullptr;
  void* ddelta = nullptr;
  void* dz = nullptr;
  float* dA_log = nullptr;
  float* dB = nullptr;
  float* dC = nullptr;
  float* dD = nullptr;
  float* dinitial_state = nullptr;
};

// Whether the kernels take these sizes (N <= kScanMaxState, sizes within the grid's limits).
bool scan_supported(int64_t batch, int64_t seqlen, int64_t dim, int64_t state);

inline int64_t scan_chunks(int64_t seqlen) { return (seqlen + kScanChunk - 1) / kScanChunk; }

// Float32 scratch elements the launchers need for these sizes (0 when none).
int64_t scan_workspace_floats(int64_t batch, int64_t seqlen, int64_t dim, int64_t state);

// y, final_state and (when non-null) chunk_states.
cudaError_t selective_scan_fwd(DType dtype, const ScanProblem& p, cudaStream_t stream);

// The requested gradients from dy (and dfinal); needs the forward's chunk_states.
cudaError_t selective_scan_bwd(DType dtype, const ScanProblem& p, cudaStream_t stream);

// One decoding step: state [B,D,N] float32 (updated in place), u, delta, z [B,D] (z nullable),
// B, C [B,N] (dtype), A_log [D,N] and D [D] (nullable) float32, y [B,D] float32 (out).
cudaError_t selective_scan_step(DType dtype, float* state, const void* u, const void* delta,
                                const void* z, const float* A_log, const void* B, const void* C,
                                const float* D, float* y, int64_t batch, int64_t dim,
                                int64_t state_dim, cudaStream_t stream);

}  // namespace peftfw::kernels::mamba1::cuda
