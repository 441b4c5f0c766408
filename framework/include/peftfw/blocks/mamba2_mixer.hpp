// The Mamba-2 mixer (SSD): in_proj -> causal depthwise conv1d + SiLU -> chunked
// selective scan -> gated RMSNorm -> out_proj, on the kernels/ dispatch point so
// CUDA kernels replace the reference ops. Serves pure Mamba-2 and every
// Mamba-2 hybrid.
#pragma once

#include <limits>
#include <optional>
#include <vector>

#include "peftfw/blocks/ssm_slots.hpp"
#include "peftfw/blocks/sublayer.hpp"
#include "peftfw/nn/linear.hpp"

namespace peftfw::blocks {

struct Mamba2MixerOptions {
  int64_t hidden_size = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  int64_t n_groups = 1;
  int64_t state_size = 0;
  int64_t conv_kernel = 4;
  int64_t chunk_size = 256;
  bool conv_bias = true;
  bool proj_bias = false;                 // in_proj, and out_proj unless out_proj_bias says
  std::optional<bool> out_proj_bias;      // Falcon-H1: projectors_bias
  double dt_min = 0.0;
  double dt_max = std::numeric_limits<double>::infinity();
  double norm_eps = 1e-6;
  // Gated norm: 0 normalises all inner channels together (transformers); g > 0 normalises
  // groups of g channels (mamba_ssm's group_size). norm_before_gate: w*norm(y)*silu(z)
  // instead of w*norm(y*silu(z)).
  int64_t norm_group_size = 0;
  bool norm_before_gate = false;
  // false: no norm (and no "norm" weight), the output is y * silu(z) (Falcon-H1's mamba_rms_norm).
  bool gated_norm = true;
  // Scales of in_proj's output segments [z, x, B, C, dt], rounded to the activations' dtype as
  // Falcon-H1's mup_vector is; empty: none.
  std::vector<double> in_proj_multipliers;
  // Pure Mamba-2 (mamba_ssm) may give in_proj 2*d_mlp extra channels [z0 | x0] ahead of
  // [z | xBC | dt]; silu(z0)*x0 joins the scan output before out_proj.
  int64_t d_mlp = 0;

  int64_t inner() const { return num_heads * head_dim; }
  int64_t conv_dim() const { return inner() + 2 * n_groups * state_size; }
  int64_t in_proj_out() const { return 2 * d_mlp + inner() + conv_dim() + num_heads; }
};

// The SSM core groups a Mamba-2 mixer holds, for [ssm] train = [...].
std::vector<std::string> mamba2_ssm_group_names();

class Mamba2MixerImpl : public SublayerImpl, public SsmMixer {
 public:
  explicit Mamba2MixerImpl(Mamba2MixerOptions options);
  torch::Tensor forward(const torch::Tensor& h, const ForwardContext& ctx, LayerCache* cache) override;
  std::string part() const override { return "mamba"; }
  const Mamba2MixerOptions& options() const { return o_; }
  SsmStateLayout state_layout() const override;
  std::vector<std::string> slot_groups() const override { return {"A_log", "D", "dt_bias"}; }
  std::vector<std::string> axes_of(const std::string& path) const override {
    if (path == "A_log" || path == "D" || path == "dt_bias") return {"head"};
    return {};
  }

  nn::Linear in_proj{nullptr}, out_proj{nullptr};
  Weights conv1d{nullptr}, norm{nullptr};
  torch::Tensor dt_bias, A_log, D;

 private:
  torch::Tensor gated_norm(const torch::Tensor& y, const torch::Tensor& z, torch::Dtype out) const;
  torch::Tensor scale_projection(const torch::Tensor& proj) const;
  Mamba2MixerOptions o_;
};

}  // namespace peftfw::blocks
