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

}  // namespace peftfw::blocks
