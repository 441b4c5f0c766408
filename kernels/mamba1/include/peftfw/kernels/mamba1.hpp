// The Mamba-1 family: the selective scan (the S6 recurrence of Mamba, Falcon-Mamba and Jamba)
// over a sequence for training and prefill, and one step for decoding, behind the kernels'
// dispatch point (peftfw/kernels/dispatch.hpp). The mixer's conv1d is shared
// (peftfw/kernels/ops.hpp).
//
// Per channel d and state n, with dt = softplus(delta) (rounded to delta's dtype, as
// transformers' MambaMixer.slow_forward computes it) and A = -exp(A_log):
//   h[t,d,n] = exp(dt[t,d] * A[d,n]) * h[t-1,d,n] + dt[t,d] * B[t,n] * u[t,d]
//   y[t,d]   = (sum_n h[t,d,n] * C[t,n] + D[d] * u[t,d]) * silu(z[t,d])
// The state and y are float32 whatever the inputs' dtype. With sequence ids the state resets
// to zero at the first token of each sequence after the first (packed rows); the initial state
// belongs to the first sequence of the row.
//
// Each op has a LibTorch reference (CPU and GPU, differentiable by autograd; reference.cpp) and,
// when the CUDA kernels are built, CUDA forward and backward kernels for CUDA tensors.
#pragma once

#include <torch/types.h>

#include "peftfw/kernels/dispatch.hpp"

namespace peftfw::kernels::mamba1 {

struct ScanArgs {
  torch::Tensor u;              // [B,T,D] the conv output after SiLU
  torch::Tensor delta;          // [B,T,D] dt_proj's output (its bias included), before softplus
  torch::Tensor A_log;          // [D,N]
  torch::Tensor B;              // [B,T,N]
  torch::Tensor C;              // [B,T,N]
  torch::Tensor D;              // [D] (optional): the skip u * D
  torch::Tensor z;              // [B,T,D] (optional): the gate silu(z)
  torch::Tensor initial_state;  // [B,D,N] (optional)
  torch::Tensor seq_ids;        // [B,T] integer (optional)
};

struct ScanResult {
  torch::Tensor y;            // [B,T,D] float32
  torch::Tensor final_state;  // [B,D,N] float32: the state after the last token
};

ScanResult selective_scan(const ScanArgs& args);

struct StepArgs {
  torch::Tensor state;  // [B,D,N] float32, replaced by the next state
  torch::Tensor u;      // [B,D]
  torch::Tensor delta;  // [B,D]
  torch::Tensor A_log;  // [D,N]
  torch::Tensor B;      // [B,N]
  torch::Tensor C;      // [B,N]
  torch::Tensor D;      // [D] (optional)
  torch::Tensor z;      // [B,D] (optional)
};

// One decoding step; returns y [B,D] float32.
torch::Tensor selective_scan_step(StepArgs& args);

namespace reference {
ScanResult selective_scan(const ScanArgs& args);
torch::Tensor selective_scan_step(StepArgs& args);
}  // namespace reference

}  // namespace peftfw::kernels::mamba1
