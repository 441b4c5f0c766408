// The Mamba-2 family: the SSD (the selective state space recurrence, chunked for training
// and one step for decoding) behind the kernels' dispatch point (peftfw/kernels/dispatch.hpp).
// The mixer's other ops (causal conv1d, gated RMSNorm) are shared: peftfw/kernels/ops.hpp.
//
// Each op has a LibTorch reference (CPU and GPU, differentiable by autograd; see
// reference.cpp) and, when the CUDA kernels are built, a fused implementation for CUDA
// tensors. Precision follows transformers' torch_forward: dt softplus in the input dtype,
// the scan in float32.
#pragma once

#include <torch/types.h>

#include <limits>

#include "peftfw/kernels/dispatch.hpp"

namespace peftfw::kernels::mamba2 {

struct SsdArgs {
  torch::Tensor x;        // [B,T,H,P]
  torch::Tensor dt;       // [B,T,H] raw (before dt_bias and softplus)
  torch::Tensor A_log;    // [H]; A = -exp(A_log)
  torch::Tensor B;        // [B,T,G,N]
  torch::Tensor C;        // [B,T,G,N]
  torch::Tensor D;        // [H] (optional)
  torch::Tensor dt_bias;  // [H]
  double dt_min = 0.0;
  double dt_max = std::numeric_limits<double>::infinity();
  int64_t chunk_size = 256;
  torch::Tensor initial_state;  // [B,H,P,N] (optional)
  torch::Tensor seq_ids;        // [B,T] (optional): the state resets where the id changes
};

struct SsdResult {
  torch::Tensor y;            // [B,T,H,P] float32, includes the D skip
  torch::Tensor final_state;  // [B,H,P,N] float32
};

// Chunked SSD scan (the Mamba-2 selective state space recurrence).
SsdResult ssd_chunk_scan(const SsdArgs& args);

// dt -> clamp(softplus(dt + dt_bias), dt_min, dt_max), in dt's dtype.
torch::Tensor ssd_dt(const torch::Tensor& dt, const torch::Tensor& dt_bias, double dt_min,
                     double dt_max);

struct SsdStepArgs {
  torch::Tensor state;    // [B,H,P,N] float32, updated in place
  torch::Tensor x;        // [B,H,P]
  torch::Tensor dt;       // [B,H] raw
  torch::Tensor A_log;    // [H]
  torch::Tensor B;        // [B,G,N]
  torch::Tensor C;        // [B,G,N]
  torch::Tensor D;        // [H]
  torch::Tensor dt_bias;  // [H]
  double dt_min = 0.0;
  double dt_max = std::numeric_limits<double>::infinity();
};

// One decoding step of the recurrence; returns y [B,H,P] float32.
torch::Tensor ssd_step(SsdStepArgs& args);

namespace reference {
SsdResult ssd_chunk_scan(const SsdArgs& args);
torch::Tensor ssd_step(SsdStepArgs& args);
}  // namespace reference

}  // namespace peftfw::kernels::mamba2
