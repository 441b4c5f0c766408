// The Mamba-1 mixer (S6): in_proj -> [x | z]; causal depthwise conv1d + SiLU on x; x_proj ->
// [dt | B | C]; dt_proj (with its bias) -> delta; the selective scan with the D skip and the
// silu(z) gate; out_proj. On the kernels/ dispatch point, so CUDA kernels replace the reference
// scan. Serves Mamba, Falcon-Mamba (weightless RMS norms on dt, B and C) and Jamba (RMS norms with
// weights on dt, B and C).
#pragma once

#include "peftfw/blocks/ssm_slots.hpp"
#include "peftfw/blocks/sublayer.hpp"
#include "peftfw/nn/linear.hpp"

namespace peftfw::blocks {

struct Mamba1MixerOptions {
  int64_t hidden_size = 0;
  int64_t inner = 0;        // d_inner (intermediate_size)
  int64_t state_size = 16;  // d_state
  int64_t conv_kernel = 4;
  int64_t dt_rank = 0;
  bool conv_bias = true;
  bool proj_bias = false;  // in_proj and out_proj
  // RMS norms on dt, B and C after x_proj: None (Mamba), Weightless (Falcon-Mamba: no parameters),
  // Weighted (Jamba: dt_layernorm, b_layernorm, c_layernorm).
  enum class DtBcNorm { None, Weightless, Weighted };
  DtBcNorm dt_bc_norm = DtBcNorm::None;
  double dt_bc_norm_eps = 1e-6;
};

class Mamba1MixerImpl : public SublayerImpl, public SsmMixer {
 public:
  explicit Mamba1MixerImpl(Mamba1MixerOptions options);
  torch::Tensor forward(const torch::Tensor& h, const ForwardContext& ctx, LayerCache* cache) override;
  std::string part() const override { return "mamba"; }
  const Mamba1MixerOptions& options() const { return o_; }
  SsmStateLayout state_layout() const override;
  // Mamba-1's time-step bias is dt_proj.bias, reached through dt_proj's LinearAdapter.
  std::vector<std::string> slot_groups() const override { return {"A_log", "D"}; }
  std::vector<std::string> axes_of(const std::string& path) const override;

  nn::Linear in_proj{nullptr}, x_proj{nullptr}, dt_proj{nullptr}, out_proj{nullptr};
  Weights conv1d{nullptr};
  RMSNorm dt_layernorm{nullptr}, b_layernorm{nullptr}, c_layernorm{nullptr};  // Weighted only
  torch::Tensor A_log, D;

 private:
  torch::Tensor dt_bc_norm(RMSNorm& n, const torch::Tensor& x) const;
  Mamba1MixerOptions o_;
};

}  // namespace peftfw::blocks
