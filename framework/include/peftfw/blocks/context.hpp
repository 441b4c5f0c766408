// Per-forward state shared by the layers of one model call (masks, RoPE
// tables, sequence ids) and the per-layer decoding cache.
#pragma once

#include <torch/types.h>

#include <vector>

#include "peftfw/model/causal_lm.hpp"

namespace peftfw::blocks {

// The router logits of one MoE layer, for the load-balancing loss.
struct RouterRecord {
  torch::Tensor logits;  // [tokens, experts]
  int64_t top_k = 0;
};

struct ForwardContext {
  torch::Tensor seq_ids;     // [B,T] or undefined: tokens with different ids never interact
  torch::Tensor ssm_mask;    // [B,T] float padding mask for SSM mixers, undefined = none applied
  torch::Tensor attn_bias;   // [B,1,T,S] additive attention mask, undefined = plain causal
  torch::Tensor attn_rows;   // [B,1,T,1] 0 for query rows with no visible key, else 1
  torch::Tensor cos, sin;    // RoPE tables [B,T,rotary_dim] (undefined without RoPE)
  bool decode_step = false;  // one new token on top of a filled cache
  // Set when the model's loss needs the routers' logits: MoE blocks append theirs. Never set
  // for a layer run under activation checkpointing (its recomputation would append again).
  std::vector<RouterRecord>* router_logits = nullptr;
};

// Decoding state of one layer; a layer holding two mixers in parallel uses both parts.
struct LayerCache {
  torch::Tensor conv_state;  // [B,conv_dim,K]
  torch::Tensor ssm_state;   // [B,H,P,N] float32
  torch::Tensor k, v;        // [B,nkv,S,hd]
};

class HybridCache : public GenerationCache {
 public:
  int64_t seen_tokens() const override { return seen; }
  int64_t seen = 0;
  torch::Tensor mask_history;  // [B,S] 0/1 attention mask of all cached tokens
  std::vector<LayerCache> layers;
};

// Rotary position embedding over the first rotary_dim channels of each head
// (rotary_dim = head_dim for full RoPE, head_dim / 2 for Bamba's partial RoPE).
struct RopeOptions {
  int64_t rotary_dim = 0;  // 0: no RoPE
  double theta = 10000.0;
};

// transformers' apply_mask_to_padding_states: h [B,T,C] times the SSM padding mask, in h's dtype;
// h itself where no mask applies (`mask` undefined).
inline torch::Tensor mask_padding_states(const torch::Tensor& h, const torch::Tensor& mask) {
  return mask.defined() ? (h * mask.unsqueeze(-1)).to(h.scalar_type()) : h;
}

// Position of each token within its own sequence (restarts where the id changes).
torch::Tensor positions_in_sequence(const torch::Tensor& seq_ids);

// cos/sin tables [B,T,rotary_dim] for positions [B,T], in `dtype`.
std::pair<torch::Tensor, torch::Tensor> rope_tables(const torch::Tensor& positions,
                                                    const RopeOptions& rope, torch::Dtype dtype);

}  // namespace peftfw::blocks
