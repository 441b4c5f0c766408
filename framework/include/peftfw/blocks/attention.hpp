// Multi-head attention with grouped KV heads, optional (partial) RoPE from the
// forward context, optional biases, and a KV cache; scaled dot-product
// attention with the context's masks (causal, padding, packed sequences).
#pragma once

#include "peftfw/blocks/sublayer.hpp"
#include "peftfw/nn/linear.hpp"

namespace peftfw::blocks {

struct AttentionOptions {
  int64_t hidden_size = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  bool bias = false;  // on q, k, v and o
  double scale = 0;   // softmax scale; 0 = 1/sqrt(head_dim)
  double key_multiplier = 1.0;  // k = k_proj(x) * m before RoPE (Falcon-H1); cached keys include it
};

class AttentionImpl : public SublayerImpl {
 public:
  explicit AttentionImpl(AttentionOptions options);
  torch::Tensor forward(const torch::Tensor& h, const ForwardContext& ctx, LayerCache* cache) override;
  std::string part() const override { return "attention"; }
  nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};

 private:
  AttentionOptions o_;
};

}  // namespace peftfw::blocks
