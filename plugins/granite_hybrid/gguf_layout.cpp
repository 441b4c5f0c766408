// GGUF layout of Granite 4.0-H for llama.cpp's "granitehybrid" architecture
// (convert_hf_to_gguf.py GraniteHybridModel): the arch name and the
// hyperparameter keys its loader reads. Tensor names and layout changes come
// from the inventory's roles (blocks::GgufBuilder).
#include "builder.hpp"
#include "config.hpp"
#include "gguf_layout.hpp"
#include "peftfw/error.hpp"
#include "peftfw/blocks/gguf.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/nn/param_init.hpp"

namespace peftfw::granite {

GgufLayout gguf_layout_of(const io::JsonConfig& json) {
  const GraniteConfig c = parse_config(json);
  if (c.mamba_proj_bias)
    throw InputError("config " + json.path() + ": mamba_proj_bias = true has no place in llama.cpp's "
                     "granitehybrid tensors (no ssm_in/ssm_out bias); export format \"merged\" instead");
  if (c.mamba_inner() != 2 * c.hidden_size)
    throw InputError("config " + json.path() + ": llama.cpp's granitehybrid supports only mamba_expand = 2 "
                     "(mamba_n_heads * mamba_d_head = 2 * hidden_size); this config has " +
                     std::to_string(c.mamba_inner()) + " vs hidden_size " + std::to_string(c.hidden_size));
  bool any_ssm = false;
  for (auto k : c.layer_kinds) any_ssm = any_ssm || k == LayerKind::Mamba;
  const bool moe = c.num_experts > 0;

  blocks::GgufBuilder g(any_ssm ? "granitehybrid" : (moe ? "granitemoe" : "granite"));
  const int64_t n_ff = moe ? c.intermediate_size : c.shared_intermediate_size;
  g.u32("vocab_size", c.vocab_size);
  // Without RoPE the converter writes 2^20: position is unbounded for llama.cpp.
  g.u32("context_length", c.use_rope ? json.get_int("max_position_embeddings", 4096) : (1 << 20));
  g.u32("embedding_length", c.hidden_size);
  g.u32("block_count", c.num_layers);
  g.u32("feed_forward_length", n_ff);
  g.u32("attention.head_count", c.num_heads);
  std::vector<int32_t> kv;
  for (auto k : c.layer_kinds) kv.push_back(k == LayerKind::Attention ? static_cast<int32_t>(c.num_kv_heads) : 0);
  g.i32_array("attention.head_count_kv", kv);
  g.f32("rope.freq_base", c.rope_theta);
  g.f32("attention.layer_norm_rms_epsilon", c.rms_norm_eps);
  g.u32("expert_count", c.num_experts);
  g.u32("expert_used_count", c.experts_per_token);
  g.u32("rope.dimension_count", c.head_dim);
  g.f32("attention.scale", c.attention_multiplier);
  g.f32("embedding_scale", c.embedding_multiplier);
  g.f32("residual_scale", c.residual_multiplier);
  g.f32("logit_scale", c.logits_scaling);
  if (c.shared_intermediate_size > 0) g.u32("expert_shared_feed_forward_length", c.shared_intermediate_size);
  if (any_ssm) {
    g.u32("ssm.conv_kernel", c.mamba_conv_kernel);
    g.u32("ssm.state_size", c.mamba_state);
    g.u32("ssm.group_count", c.mamba_groups);
    g.u32("ssm.inner_size", c.mamba_inner());
    g.u32("ssm.time_step_rank", c.mamba_heads);
  }
  // Granite reuses this flag as "apply RoPE".
  g.boolean("rope.scaling.finetuned", c.use_rope);

  // Tensors by role from the inventory; the converter permutes q/k rows with or without RoPE.
  nn::MetaScope meta;
  blocks::GgufNames names;
  names.ssm_groups = c.mamba_groups;
  names.head_dim = c.head_dim;
  names.rotary_dim = c.head_dim;
  g.tensors(build_granite(c)->inventory(), names);
  return g.layout();
}

}  // namespace peftfw::granite
