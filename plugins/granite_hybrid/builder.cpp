// The Granite 4.0-H name table: which block sits under which checkpoint name.
//   model.embed_tokens, model.layers.<i>.{input_layernorm, mamba | self_attn,
//   post_attention_layernorm, block_sparse_moe (MoE configs), shared_mlp}, model.norm, lm_head
#include "builder.hpp"

#include "peftfw/blocks/attention.hpp"
#include "peftfw/blocks/mamba2_mixer.hpp"
#include "peftfw/blocks/mlp.hpp"

namespace peftfw::granite {

std::shared_ptr<blocks::HybridLM> build_granite(const GraniteConfig& c) {
  blocks::LMOptions lm;
  lm.architecture = "granite_hybrid";
  lm.model_type = "granitemoehybrid";
  lm.vocab_size = c.vocab_size;
  lm.hidden_size = c.hidden_size;
  lm.norm_eps = c.rms_norm_eps;
  lm.tie_word_embeddings = c.tie_word_embeddings;
  lm.padding_idx = c.pad_token_id;
  lm.embedding_multiplier = c.embedding_multiplier;
  lm.logits_divisor = c.logits_scaling;
  if (c.use_rope) lm.rope = {c.head_dim, c.rope_theta};
  auto model = std::make_shared<blocks::HybridLM>(lm);

  blocks::Mamba2MixerOptions mamba;
  mamba.hidden_size = c.hidden_size;
  mamba.num_heads = c.mamba_heads;
  mamba.head_dim = c.mamba_head_dim;
  mamba.n_groups = c.mamba_groups;
  mamba.state_size = c.mamba_state;
  mamba.conv_kernel = c.mamba_conv_kernel;
  mamba.chunk_size = c.mamba_chunk_size;
  mamba.conv_bias = c.mamba_conv_bias;
  mamba.proj_bias = c.mamba_proj_bias;
  mamba.dt_min = c.time_step_min;
  mamba.dt_max = c.time_step_max;
  mamba.norm_eps = c.rms_norm_eps;

  blocks::AttentionOptions attn;
  attn.hidden_size = c.hidden_size;
  attn.num_heads = c.num_heads;
  attn.num_kv_heads = c.num_kv_heads;
  attn.head_dim = c.head_dim;
  attn.bias = c.attention_bias;
  attn.scale = c.attention_multiplier;

  blocks::MlpOptions shared;
  shared.layout = blocks::MlpOptions::Layout::Fused;
  shared.hidden_size = c.hidden_size;
  shared.intermediate_size = c.shared_intermediate_size;

  blocks::MoeOptions moe{c.hidden_size, c.num_experts, c.experts_per_token, c.intermediate_size};

  blocks::LayerOptions layer;
  layer.hidden_size = c.hidden_size;
  layer.norm_eps = c.rms_norm_eps;
  layer.residual_multiplier = c.residual_multiplier;

  for (int64_t i = 0; i < c.num_layers; ++i) {
    auto l = std::make_shared<blocks::DecoderLayerImpl>(i, layer);
    if (c.layer_kinds[static_cast<size_t>(i)] == LayerKind::Mamba) {
      l->add_unit("input_layernorm", "norm.input",
                  {{"mamba", std::make_shared<blocks::Mamba2MixerImpl>(mamba)}});
    } else {
      l->add_unit("input_layernorm", "norm.input",
                  {{"self_attn", std::make_shared<blocks::AttentionImpl>(attn)}});
    }
    std::vector<blocks::Branch> ff;
    if (c.num_experts > 0) ff.push_back({"block_sparse_moe", std::make_shared<blocks::MoeImpl>(moe)});
    ff.push_back({"shared_mlp", std::make_shared<blocks::MlpImpl>(shared)});
    l->add_unit("post_attention_layernorm", "norm.post", std::move(ff));
    model->add_layer(l);
  }
  model->finish();
  return model;
}

}  // namespace peftfw::granite
