// Mamba-2 ops behind one dispatch point.
//
// Model code calls only these functions. Each has a LibTorch reference
// (CPU and GPU, differentiable by autograd; see reference.cpp) and, when the
// CUDA kernels are built, a fused implementation for CUDA tensors. Precision
// follows transformers' torch_forward: dt softplus in the input dtype, the
// scan in float32.
#pragma once

#include <torch/types.h>

#include <limits>
#include <optional>

namespace peftfw::kernels::mamba2 {

// Causal depthwise conv1d over time, then SiLU when `silu` is set.
//   x [B,T,C], weight [C,K], bias [C] (optional), seq_ids [B,T] (optional).
// With seq_ids the window never reaches into a different sequence.
torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, const torch::Tensor& seq_ids, bool silu);

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

// Gated RMSNorm: w * rmsnorm(y * silu(z)) over the last dim, float32 math; the
// normalised value is rounded to y's dtype before the weight (transformers'
// MambaRMSNormGated). With out_dtype the result is cast to it (once).
torch::Tensor gated_rms_norm(const torch::Tensor& y, const torch::Tensor& z,
                             const torch::Tensor& weight, double eps,
                             std::optional<torch::ScalarType> out_dtype = std::nullopt);

// Gated MLP activation: silu(a) * b where gu = [a | b] along the last dim
// (Granite's shared MLP: first half gate, second half up).
torch::Tensor silu_mul(const torch::Tensor& gu);

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

// One decoding step of the conv: shifts `conv_state` [B,C,K] left, appends
// x_t [B,C], returns the conv (+SiLU) output [B,C].
torch::Tensor causal_conv1d_step(torch::Tensor& conv_state, const torch::Tensor& x_t,
                                 const torch::Tensor& weight, const torch::Tensor& bias, bool silu);

namespace reference {
torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, const torch::Tensor& seq_ids, bool silu);
SsdResult ssd_chunk_scan(const SsdArgs& args);
torch::Tensor gated_rms_norm(const torch::Tensor& y, const torch::Tensor& z,
                             const torch::Tensor& weight, double eps,
                             std::optional<torch::ScalarType> out_dtype = std::nullopt);
torch::Tensor silu_mul(const torch::Tensor& gu);
torch::Tensor ssd_step(SsdStepArgs& args);
torch::Tensor causal_conv1d_step(torch::Tensor& conv_state, const torch::Tensor& x_t,
                                 const torch::Tensor& weight, const torch::Tensor& bias, bool silu);
}  // namespace reference

// Which implementation the dispatcher picks for tensors on `device`:
// "cuda" (kernels built, CUDA tensor) or "reference".
const char* implementation_for(const torch::Device& device);

// Forces the reference everywhere (comparisons, bisecting). Also set by the
// environment variable PEFTFW_KERNELS=reference.
void set_force_reference(bool on);

}  // namespace peftfw::kernels::mamba2
