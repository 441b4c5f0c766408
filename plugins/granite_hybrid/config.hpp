// GraniteMoeHybrid configuration (config.json, model_type "granitemoehybrid"),
// parsed and validated once; every other file of the plugin reads this struct.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace peftfw::io {
class JsonConfig;
}

namespace peftfw::granite {

enum class LayerKind { Mamba, Attention };

struct GraniteConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;     // attention query heads
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate_size = 0;         // per expert
  int64_t shared_intermediate_size = 0;  // shared MLP
  int64_t num_experts = 0;               // 0 = dense
  int64_t experts_per_token = 0;
  double rms_norm_eps = 1e-6;
  double embedding_multiplier = 1.0;
  double attention_multiplier = 1.0;
  double residual_multiplier = 1.0;
  double logits_scaling = 1.0;
  bool attention_bias = false;
  bool use_rope = false;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  int64_t pad_token_id = -1;  // embedding row that gets no gradient (nn.Embedding padding_idx)
  std::vector<LayerKind> layer_kinds;
  // Mamba-2 mixer
  int64_t mamba_heads = 0;
  int64_t mamba_groups = 1;
  int64_t mamba_state = 0;
  int64_t mamba_head_dim = 0;
  int64_t mamba_conv_kernel = 4;
  int64_t mamba_expand = 2;
  int64_t mamba_chunk_size = 256;
  bool mamba_conv_bias = true;
  bool mamba_proj_bias = false;
  double time_step_min = 0.0;
  double time_step_max = std::numeric_limits<double>::infinity();

  int64_t mamba_inner() const { return mamba_heads * mamba_head_dim; }  // Im
  int64_t conv_dim() const { return mamba_inner() + 2 * mamba_groups * mamba_state; }
  int64_t in_proj_out() const { return mamba_inner() + conv_dim() + mamba_heads; }
};

// Throws InputError naming the field and value for anything unsupported.
GraniteConfig parse_config(const io::JsonConfig& json);

const char* layer_kind_name(LayerKind kind);

}  // namespace peftfw::granite
