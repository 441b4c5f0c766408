// The model contract between architecture plugins and the framework.
#pragma once

#include <torch/nn/module.h>

#include <memory>

#include "peftfw/model/inventory.hpp"

namespace peftfw {

struct ModelBatch {
  torch::Tensor input_ids;       // [B,T] int64
  torch::Tensor attention_mask;  // [B,T] int64, 1 = token, 0 = padding; undefined = all tokens
  // [B,T] int64 sequence ids for packed rows: tokens with different ids never
  // interact (SSM state, conv window, attention). Undefined = one sequence per row.
  torch::Tensor seq_ids;
  torch::Tensor labels;          // [B,T] int64, -100 = ignored; undefined = no loss
  // false: only the loss is wanted, so the model may compute it without ever
  // materialising the [B,T,V] logits (causal_lm_loss_from_hidden).
  bool want_logits = true;
};

struct ModelOutput {
  torch::Tensor logits;  // [B,T,V] (float32 unless the model computes in another dtype)
  torch::Tensor loss;    // scalar, when labels were given
};

// Per-model decoding state (conv/SSM states, KV cache), opaque to the framework.
class GenerationCache {
 public:
  virtual ~GenerationCache() = default;
  virtual int64_t seen_tokens() const = 0;
};

class CausalLM : public torch::nn::Module {
 public:
  // With a cache: consumes the new tokens after the cached ones and updates the cache.
  virtual ModelOutput forward(const ModelBatch& batch, GenerationCache* cache = nullptr) = 0;
  virtual std::unique_ptr<GenerationCache> make_cache(int64_t batch_size) = 0;
  virtual const ModelInventory& inventory() const = 0;
  // Recompute each decoder layer in backward instead of keeping its activations.
  // Returns false when the architecture does not support it.
  virtual bool set_gradient_checkpointing(bool on) { return !on; }
};

// Causal-LM loss as transformers computes it: labels shifted left, ignore -100, mean.
torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels);

// The same loss from the last hidden states and the output projection:
// logits = (hidden @ weight^T) / logits_divisor, computed a block of rows at a
// time (float32 softmax) and recomputed in backward, so at most `max_elements`
// logits exist at once instead of [B,T,V] in float32. Only labelled positions
// are projected. The weight gradient is computed only if weight requires grad.
torch::Tensor causal_lm_loss_from_hidden(const torch::Tensor& hidden, const torch::Tensor& weight,
                                         double logits_divisor, const torch::Tensor& labels,
                                         int64_t max_elements = int64_t{1} << 28);

}  // namespace peftfw
