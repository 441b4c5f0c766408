// Architecture plugin for Bamba (transformers BambaForCausalLM, model_type "bamba"): the
// Mamba-2 mixer of Granite 4.0-H, attention with partial RoPE, and a split SwiGLU MLP.
// The name table:
//   model.embed_tokens, model.layers.<i>.{input_layernorm, mamba | self_attn, pre_ff_layernorm,
//   feed_forward.{gate_proj, up_proj, down_proj}}, model.final_layernorm, lm_head
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "peftfw/blocks/attention.hpp"
#include "peftfw/blocks/config_fields.hpp"
#include "peftfw/blocks/decoder.hpp"
#include "peftfw/blocks/plugin.hpp"
#include "peftfw/blocks/gguf.hpp"
#include "peftfw/blocks/mamba2_mixer.hpp"
#include "peftfw/blocks/mlp.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/nn/param_init.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/registrar.hpp"

namespace peftfw::bamba {
namespace {

using blocks::refuse;

struct Config {
  blocks::LMOptions lm;
  blocks::Mamba2MixerOptions mixer;
  blocks::AttentionOptions attention;
  blocks::MlpOptions mlp;
  int64_t num_layers = 0;
  std::vector<bool> is_attention;
  int64_t max_positions = 0;
  double rope_theta = 10000.0;
};

// Defaults are BambaConfig's (transformers 5.17).
Config parse(const io::JsonConfig& j) {
  blocks::expect_model_type(j, {"bamba"});
  Config c;
  auto& lm = c.lm;
  lm.architecture = "bamba";
  lm.model_type = "bamba";
  lm.final_norm = "final_layernorm";
  lm.vocab_size = blocks::dim_or(j, "vocab_size", 128000);
  lm.hidden_size = blocks::dim_or(j, "hidden_size", 4096);
  lm.norm_eps = j.get_float("rms_norm_eps", 1e-5);
  lm.tie_word_embeddings = j.get_bool("tie_word_embeddings", false);
  lm.z_loss = j.get_float("z_loss_coefficient", 0.0);
  if (auto pad = j.optional_int("pad_token_id"); pad && *pad >= 0 && *pad < lm.vocab_size)
    lm.padding_idx = *pad;
  else if (j.is_unset("pad_token_id") && !j.has("pad_token_id"))
    lm.padding_idx = 0;  // BambaConfig's default pad_token_id
  c.num_layers = blocks::dim_or(j, "num_hidden_layers", 32);
  c.max_positions = j.get_int("max_position_embeddings", 262144);
  blocks::activation(j, "hidden_act", {"silu"}, "silu");

  // Attention layers: attn_layer_indices (layer_types / layers_block_type when written).
  c.is_attention.assign(static_cast<size_t>(c.num_layers), false);
  if (!j.is_unset("attn_layer_indices")) {
    for (auto i : j.require_int_list("attn_layer_indices")) {
      if (i < 0 || i >= c.num_layers)
        refuse(j, "attn_layer_indices", "index " + std::to_string(i) + " is outside 0.." +
                                            std::to_string(c.num_layers - 1));
      c.is_attention[static_cast<size_t>(i)] = true;
    }
  }

  auto& a = c.attention;
  a.hidden_size = lm.hidden_size;
  a.num_heads = blocks::dim_or(j, "num_attention_heads", 32);
  a.num_kv_heads = blocks::kv_heads(j, a.num_heads, a.num_heads);
  a.head_dim = blocks::dim_or(j, "head_dim", lm.hidden_size / a.num_heads);
  a.bias = j.get_bool("attention_bias", false);
  // BambaConfig forces partial_rotary_factor 0.5.
  const auto rope = blocks::rope_fields(j, 0.5);
  c.rope_theta = rope.theta;
  lm.rope = {static_cast<int64_t>(static_cast<double>(a.head_dim) * rope.partial_rotary_factor), rope.theta};
  if (lm.rope.rotary_dim % 2 != 0 || lm.rope.rotary_dim == 0)
    refuse(j, "partial_rotary_factor", "head_dim x partial_rotary_factor must be a positive even number, found " +
                                           std::to_string(lm.rope.rotary_dim));

  auto& f = c.mlp;
  f.layout = blocks::MlpOptions::Layout::Split;
  f.hidden_size = lm.hidden_size;
  f.intermediate_size = blocks::dim_or(j, "intermediate_size", 14336);
  f.bias = j.get_bool("mlp_bias", false);

  auto& m = c.mixer;
  m.hidden_size = lm.hidden_size;
  m.num_heads = blocks::dim_or(j, "mamba_n_heads", 128);
  m.n_groups = blocks::dim_or(j, "mamba_n_groups", 1);
  m.state_size = blocks::dim_or(j, "mamba_d_state", 256);
  m.conv_kernel = blocks::dim_or(j, "mamba_d_conv", 4);
  m.chunk_size = blocks::dim_or(j, "mamba_chunk_size", 256);
  m.conv_bias = j.get_bool("mamba_conv_bias", true);
  m.proj_bias = j.get_bool("mamba_proj_bias", false);
  m.norm_eps = lm.norm_eps;
  std::tie(m.dt_min, m.dt_max) = blocks::time_step_limit(j);
  const int64_t inner = blocks::dim_or(j, "mamba_expand", 2) * lm.hidden_size;
  const auto d_head = j.raw().find("mamba_d_head");
  if (d_head == j.raw().end() || d_head->is_null() || (d_head->is_string() && *d_head == "auto")) {
    if (inner % m.num_heads != 0)
      refuse(j, "mamba_n_heads", "must divide mamba_expand * hidden_size (" + std::to_string(inner) +
                                     "), found " + std::to_string(m.num_heads));
    m.head_dim = inner / m.num_heads;
  } else {
    m.head_dim = blocks::require_dim(j, "mamba_d_head");
  }
  if (m.inner() != inner)
    refuse(j, "mamba_d_head", "mamba_d_head x mamba_n_heads (" + std::to_string(m.inner()) +
                                  ") must equal mamba_expand x hidden_size (" + std::to_string(inner) + ")");
  if (m.num_heads % m.n_groups != 0)
    refuse(j, "mamba_n_groups", "must divide mamba_n_heads (" + std::to_string(m.num_heads) + "), found " +
                                    std::to_string(m.n_groups));
  return c;
}

std::shared_ptr<blocks::HybridLM> build_model(const Config& c) {
  auto model = std::make_shared<blocks::HybridLM>(c.lm);
  blocks::LayerOptions layer;
  layer.hidden_size = c.lm.hidden_size;
  layer.norm_eps = c.lm.norm_eps;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    auto l = std::make_shared<blocks::DecoderLayerImpl>(i, layer);
    // transformers registers feed_forward first, then the norms, then the mixer; names, not
    // order, tie parameters to checkpoint keys.
    if (c.is_attention[static_cast<size_t>(i)]) {
      l->add_unit("input_layernorm", "norm.input",
                  {{"self_attn", std::make_shared<blocks::AttentionImpl>(c.attention)}});
    } else {
      l->add_unit("input_layernorm", "norm.input",
                  {{"mamba", std::make_shared<blocks::Mamba2MixerImpl>(c.mixer)}});
    }
    l->add_unit("pre_ff_layernorm", "norm.ff", {{"feed_forward", std::make_shared<blocks::MlpImpl>(c.mlp)}});
    model->add_layer(l);
  }
  model->finish();
  return model;
}

class BambaPlugin final : public blocks::BlockArchitecture {
 public:
  std::string id() const override { return "bamba"; }
  std::vector<std::string> model_types() const override { return {"bamba"}; }

  std::shared_ptr<blocks::HybridLM> make(const io::JsonConfig& json) const override {
    return build_model(parse(json));
  }

  // llama.cpp runs Bamba as its "granitehybrid" architecture (multipliers 1).
  std::optional<GgufLayout> gguf_layout(const io::JsonConfig& json) const override {
    const auto c = parse(json);
    auto no = [&](bool set, const std::string& field) {
      if (set)
        throw InputError("config " + json.path() + ": " + field + " = true has no place in llama.cpp's "
                         "granitehybrid tensors; export format \"merged\" instead");
    };
    no(c.mixer.proj_bias, "mamba_proj_bias");
    no(c.mlp.bias, "mlp_bias");
    if (c.mixer.inner() != 2 * c.lm.hidden_size)
      throw InputError("config " + json.path() + ": llama.cpp's granitehybrid supports only mamba_expand = 2");
    nn::MetaScope meta;
    auto inv = build_model(c)->inventory();
    blocks::GgufBuilder g("granitehybrid");
    const auto& a = c.attention;
    g.u32("vocab_size", c.lm.vocab_size);
    g.u32("context_length", c.max_positions);
    g.u32("embedding_length", c.lm.hidden_size);
    g.u32("block_count", c.num_layers);
    g.u32("feed_forward_length", c.mlp.intermediate_size);
    g.u32("attention.head_count", a.num_heads);
    std::vector<int32_t> kv;
    for (bool attn : c.is_attention) kv.push_back(attn ? static_cast<int32_t>(a.num_kv_heads) : 0);
    g.i32_array("attention.head_count_kv", kv);
    g.f32("rope.freq_base", c.rope_theta);
    g.f32("attention.layer_norm_rms_epsilon", c.lm.norm_eps);
    g.u32("expert_count", 0);
    g.u32("expert_used_count", 0);
    g.u32("rope.dimension_count", c.lm.rope.rotary_dim);
    g.f32("attention.scale", 1.0 / std::sqrt(static_cast<double>(a.head_dim)));
    g.f32("embedding_scale", 1.0);
    g.f32("residual_scale", 1.0);
    g.f32("logit_scale", 1.0);
    g.u32("ssm.conv_kernel", c.mixer.conv_kernel);
    g.u32("ssm.state_size", c.mixer.state_size);
    g.u32("ssm.group_count", c.mixer.n_groups);
    g.u32("ssm.inner_size", c.mixer.inner());
    g.u32("ssm.time_step_rank", c.mixer.num_heads);
    g.boolean("rope.scaling.finetuned", true);  // Granite's "apply RoPE" flag
    blocks::GgufNames names;
    names.ssm_groups = c.mixer.n_groups;
    names.head_dim = a.head_dim;
    names.rotary_dim = c.lm.rope.rotary_dim;
    g.tensors(inv, names);
    return g.layout();
  }
};

void register_bamba(PluginRegistrar& registrar) {
  registrar.add_architecture(std::make_shared<BambaPlugin>());
}

}  // namespace
}  // namespace peftfw::bamba

PEFTFW_DEFINE_PLUGIN("bamba", "architecture", "0.1.0",
                     "Bamba hybrid Mamba-2/attention (model_type bamba)", peftfw::bamba::register_bamba)
