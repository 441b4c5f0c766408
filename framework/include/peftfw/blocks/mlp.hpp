// Feed-forward blocks: the gated or plain MLP in its checkpoint layouts, and a
// top-k mixture of experts.
#pragma once

#include "peftfw/blocks/sublayer.hpp"
#include "peftfw/nn/linear.hpp"

namespace peftfw::blocks {

enum class Activation { Silu, Relu2 };  // relu2: squared ReLU (Nemotron-H)

struct MlpOptions {
  enum class Layout {
    Fused,  // input_linear [2F,H] = [gate | up], output_linear (one stored matrix)
    Split,  // gate_proj, up_proj, down_proj (Llama, Bamba)
    Plain,  // up_proj, down_proj, no gate (Nemotron-H)
  };
  Layout layout = Layout::Split;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  Activation activation = Activation::Silu;
  bool bias = false;
  double gate_multiplier = 1.0;  // Split: act(gate(x) * m) * up(x) (Falcon-H1's mlp_multipliers[0])
};

class MlpImpl : public SublayerImpl {
 public:
  explicit MlpImpl(MlpOptions options);
  torch::Tensor forward(const torch::Tensor& x, const ForwardContext& ctx, LayerCache* cache) override;
  torch::Tensor forward(const torch::Tensor& x);
  std::string part() const override { return "mlp"; }
  nn::Linear input_linear{nullptr}, output_linear{nullptr};       // Fused
  nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};  // Split / Plain

 private:
  MlpOptions o_;
};

// Top-k routed experts with softmax over the k selected router logits
// (float32), experts as 3D weights [E, 2F, H] (gate | up) and [E, H, F].
struct MoeOptions {
  int64_t hidden_size = 0;
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t intermediate_size = 0;  // per expert
};

class MoeImpl : public SublayerImpl {
 public:
  explicit MoeImpl(MoeOptions options);
  torch::Tensor forward(const torch::Tensor& x, const ForwardContext& ctx, LayerCache* cache) override;
  std::string part() const override { return "moe"; }

  // The router's linear sits one level down ("router.layer").
  class RouterImpl : public BlockImpl {
   public:
    RouterImpl(int64_t hidden, int64_t experts);
    nn::Linear layer{nullptr};
  };

  std::shared_ptr<RouterImpl> router;
  Weights input_linear{nullptr}, output_linear{nullptr};

 private:
  MoeOptions o_;
};

// Top-k of a softmax over every expert's router logit (float32), the k weights not renormalised
// (Jamba): router "router" (a Linear [E,H]), SwiGLU experts "experts" stacked as transformers 5 holds
// them, gate_up_proj [E,2F,H] (gate rows first) and down_proj [E,H,F]. With a router collector in the
// forward context it hands over its logits for the load-balancing loss.
struct SoftmaxMoeOptions {
  int64_t hidden_size = 0;
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t intermediate_size = 0;  // per expert
};

class SoftmaxMoeImpl : public SublayerImpl {
 public:
  explicit SoftmaxMoeImpl(SoftmaxMoeOptions options);
  torch::Tensor forward(const torch::Tensor& x, const ForwardContext& ctx, LayerCache* cache) override;
  std::string part() const override { return "moe"; }

  class ExpertsImpl : public BlockImpl {
   public:
    ExpertsImpl(int64_t experts, int64_t width, int64_t hidden);
    torch::Tensor gate_up_proj, down_proj;
  };
  nn::Linear router{nullptr};
  std::shared_ptr<ExpertsImpl> experts;

 private:
  SoftmaxMoeOptions o_;
};

// Top-k experts picked by sigmoid scores plus a selection bias, inside the best groups of experts
// (DeepSeek-V3's router, Nemotron-3's MoE): router "gate" (weight [E,H] and the float32 buffer
// e_score_correction_bias, float32 math), plain up/down experts "experts" ([E,F,in], [E,in,F],
// parameters named without ".weight"), optional latent projections fc1/fc2_latent_proj around the
// experts, and a shared expert "shared_experts" beside them.
struct GroupedMoeOptions {
  int64_t hidden_size = 0;
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t intermediate_size = 0;         // per expert
  int64_t n_group = 1, topk_group = 1;   // experts in n_group groups; tokens use the topk_group best
  bool norm_topk_prob = true;            // weights / (sum + 1e-20)
  double routed_scaling_factor = 1.0;
  int64_t latent_size = 0;               // 0: the experts act on x
  int64_t shared_intermediate_size = 0;  // 0: no shared expert
  Activation activation = Activation::Relu2;
  bool bias = false;                     // latent projections and shared expert
};

class GroupedMoeImpl : public SublayerImpl {
 public:
  explicit GroupedMoeImpl(GroupedMoeOptions options);
  torch::Tensor forward(const torch::Tensor& x, const ForwardContext& ctx, LayerCache* cache) override;
  std::string part() const override { return "moe"; }

  class RouterImpl : public BlockImpl {
   public:
    RouterImpl(int64_t hidden, int64_t experts);
    using BlockImpl::to;
    // The selection bias stays float32 when the model is cast (transformers keeps it so).
    void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
    void to(torch::Dtype dtype, bool non_blocking = false) override;
    torch::Tensor weight, e_score_correction_bias;
  };
  class ExpertsImpl : public BlockImpl {
   public:
    ExpertsImpl(int64_t experts, int64_t width, int64_t in);
    torch::Tensor up_proj, down_proj;
  };

  std::shared_ptr<RouterImpl> gate;
  std::shared_ptr<ExpertsImpl> experts;
  std::shared_ptr<MlpImpl> shared_experts;
  nn::Linear fc1_latent_proj{nullptr}, fc2_latent_proj{nullptr};

 private:
  GroupedMoeOptions o_;
};

}  // namespace peftfw::blocks
