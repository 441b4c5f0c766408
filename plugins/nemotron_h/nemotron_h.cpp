// Architecture plugin for Nemotron-H (transformers NemotronHForCausalLM, model_type "nemotron_h"):
// NVIDIA's hybrid of Mamba-2, attention (no RoPE), squared-ReLU MLP and, in Nemotron-3, MoE
// layers, one mixer per layer as the config's pattern lists them.
// The name table (in memory, as transformers 5.17 names the modules):
//   model.embeddings, model.layers.<i>.{norm, mixer.*}, model.norm_f, lm_head
//   mixer of an M layer:  in_proj, conv1d, dt_bias, A_log, D, norm, out_proj
//   mixer of a * layer:   q_proj, k_proj, v_proj, o_proj
//   mixer of a - layer:   up_proj, down_proj
//   mixer of an E layer:  gate.{weight, e_score_correction_bias}, experts.{up_proj, down_proj} [E, out, in],
//                         shared_experts.{up_proj, down_proj}, fc1_latent_proj, fc2_latent_proj
// Released checkpoints store "model." as "backbone." and each expert tensor as one key per expert
// (backbone.layers.<i>.mixer.experts.<e>.up_proj.weight); multi-token-prediction heads (mtp.*) are
// not part of the model.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "peftfw/blocks/attention.hpp"
#include "peftfw/blocks/config_fields.hpp"
#include "peftfw/blocks/decoder.hpp"
#include "peftfw/blocks/gguf.hpp"
#include "peftfw/blocks/mamba2_mixer.hpp"
#include "peftfw/blocks/mlp.hpp"
#include "peftfw/blocks/plugin.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/nn/param_init.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/registrar.hpp"

namespace peftfw::nemotron_h {
namespace {

using blocks::refuse;

enum class Kind { Mamba, Attention, Mlp, Moe };

struct Config {
  blocks::LMOptions lm;
  blocks::Mamba2MixerOptions mixer;
  blocks::AttentionOptions attention;
  blocks::MlpOptions mlp;
  blocks::GroupedMoeOptions moe;
  std::vector<Kind> kinds;
  std::string pattern;  // M * - E, one character per layer
};

// The field a value comes from: the older alias (mamba_n_groups, ...) when the config has it, as
// transformers lets the alias win, else the current name.
std::string field(const io::JsonConfig& j, const std::string& key, const std::string& alias) {
  return j.has(alias) && !j.is_unset(alias) ? alias : key;
}

std::vector<Kind> layer_kinds(const io::JsonConfig& j, std::string& pattern) {
  const char* expected =
      "a list of \"linear_attention\" (or \"mamba\"), \"full_attention\" (or \"attention\"), \"mlp\" and \"moe\"";
  std::vector<Kind> kinds;
  auto from_char = [&](char c, const std::string& field) {
    switch (c) {
      case 'M': return Kind::Mamba;
      case '*': return Kind::Attention;
      case '-': return Kind::Mlp;
      case 'E': return Kind::Moe;
      default:
        refuse(j, field, std::string("layer character '") + c + "' is not one of M (mamba), * (attention), "
                         "- (mlp), E (moe)");
    }
  };
  std::string list_key;
  for (const char* k : {"layers_block_type", "layer_types"})
    if (j.has(k) && !j.is_unset(k)) {
      list_key = k;
      break;
    }
  if (!list_key.empty()) {
    const auto& node = j.raw().at(list_key);
    if (!node.is_array() || node.empty()) refuse(j, list_key, std::string("expected ") + expected + ", found " + node.dump());
    for (const auto& v : node) {
      if (!v.is_string()) refuse(j, list_key, std::string("expected ") + expected);
      const auto s = v.get<std::string>();
      if (s == "linear_attention" || s == "mamba") kinds.push_back(Kind::Mamba);
      else if (s == "full_attention" || s == "attention") kinds.push_back(Kind::Attention);
      else if (s == "mlp") kinds.push_back(Kind::Mlp);
      else if (s == "moe") kinds.push_back(Kind::Moe);
      else refuse(j, list_key, "unknown layer type \"" + s + "\"; expected " + expected);
    }
  } else if (j.has("hybrid_override_pattern") && !j.is_unset("hybrid_override_pattern")) {
    const auto p = j.get_string("hybrid_override_pattern", "");
    if (p.empty()) refuse(j, "hybrid_override_pattern", "expected a non-empty string such as \"M-M*-\"");
    for (char c : p) kinds.push_back(from_char(c, "hybrid_override_pattern"));
  } else {
    kinds = {Kind::Mamba, Kind::Moe, Kind::Attention, Kind::Mlp};  // NemotronHConfig's default
  }
  if (kinds.size() > (1u << 16)) refuse(j, list_key.empty() ? "hybrid_override_pattern" : list_key, "too many layers");
  for (auto k : kinds) pattern += k == Kind::Mamba ? 'M' : k == Kind::Attention ? '*' : k == Kind::Mlp ? '-' : 'E';
  return kinds;
}

// Defaults are NemotronHConfig's (transformers 5.17).
Config parse(const io::JsonConfig& j) {
  blocks::expect_model_type(j, {"nemotron_h"});
  Config c;
  auto& lm = c.lm;
  lm.architecture = "nemotron_h";
  lm.model_type = "nemotron_h";
  lm.embedding = "embeddings";
  lm.final_norm = "norm_f";
  lm.vocab_size = blocks::dim_or(j, "vocab_size", 131072);
  lm.hidden_size = blocks::dim_or(j, "hidden_size", 4096);
  lm.norm_eps = j.get_float("layer_norm_epsilon", 1e-5);
  // transformers 5.17 never ties Nemotron-H's lm_head (its _tied_weights_keys is empty), whatever
  // tie_word_embeddings says; the embedding has no padding row.
  lm.tie_word_embeddings = false;
  c.kinds = layer_kinds(j, c.pattern);

  const auto has = [&](Kind k) { return std::find(c.kinds.begin(), c.kinds.end(), k) != c.kinds.end(); };
  blocks::activation(j, "mlp_hidden_act", {"relu2"}, "relu2");
  blocks::activation(j, "mamba_hidden_act", {"silu"}, "silu");

  auto& a = c.attention;
  a.hidden_size = lm.hidden_size;
  a.num_heads = blocks::dim_or(j, "num_attention_heads", 32);
  a.num_kv_heads = blocks::kv_heads(j, a.num_heads, 8);  // as the family's config class, absent: 8
  a.head_dim = blocks::dim_or(j, "head_dim", 128);
  a.bias = false;  // attention_bias is not read by the 5.17 model

  auto& f = c.mlp;
  f.layout = blocks::MlpOptions::Layout::Plain;
  f.activation = blocks::Activation::Relu2;
  f.hidden_size = lm.hidden_size;
  f.intermediate_size = blocks::dim_or(j, "intermediate_size", 21504);
  f.bias = j.get_bool("mlp_bias", false);

  auto& m = c.mixer;
  m.hidden_size = lm.hidden_size;
  m.num_heads = blocks::dim_or(j, "mamba_num_heads", 128);
  m.head_dim = blocks::dim_or(j, "mamba_head_dim", 64);
  const auto groups_field = field(j, "n_groups", "mamba_n_groups");
  m.n_groups = blocks::dim_or(j, groups_field, 8);
  m.state_size = blocks::dim_or(j, "ssm_state_size", 128);
  m.conv_kernel = blocks::dim_or(j, field(j, "conv_kernel", "mamba_d_conv"), 4);
  m.chunk_size = blocks::dim_or(j, field(j, "chunk_size", "mamba_chunk_size"), 128);
  m.conv_bias = j.has("mamba_conv_bias") ? j.get_bool("mamba_conv_bias", true) : j.get_bool("use_conv_bias", true);
  m.proj_bias = j.get_bool("use_bias", false);
  m.norm_eps = lm.norm_eps;
  // The mixer clamps dt to (time_step_min, inf); config time_step_limit is not read.
  const auto dt_field = field(j, "time_step_min", "mamba_dt_min");
  m.dt_min = j.get_float(dt_field, 0.001);
  m.dt_max = std::numeric_limits<double>::infinity();
  if (!(m.dt_min >= 0.0) || !std::isfinite(m.dt_min))
    refuse(j, dt_field, "must be a finite number >= 0, found " + std::to_string(m.dt_min));
  if (m.num_heads % m.n_groups != 0)
    refuse(j, groups_field, "must divide mamba_num_heads (" + std::to_string(m.num_heads) + "), found " +
                                std::to_string(m.n_groups));
  // Zamba2RMSNormGated: gate first, normalised per group of inner / n_groups channels.
  m.norm_group_size = m.n_groups == 1 ? 0 : m.inner() / m.n_groups;

  auto& e = c.moe;
  e.hidden_size = lm.hidden_size;
  const auto experts_field = field(j, "n_routed_experts", "num_local_experts");
  e.num_experts = blocks::dim_or(j, experts_field, 8);
  e.top_k = blocks::dim_or(j, "num_experts_per_tok", 2);
  e.intermediate_size = blocks::dim_or(j, "moe_intermediate_size", 7688);
  e.shared_intermediate_size = blocks::dim_or(j, "moe_shared_expert_intermediate_size", 7688);
  e.latent_size = j.is_unset("moe_latent_size") ? 0 : blocks::require_dim(j, "moe_latent_size");
  e.n_group = blocks::dim_or(j, "n_group", 1);
  e.topk_group = blocks::dim_or(j, "topk_group", 1);
  e.norm_topk_prob = j.get_bool("norm_topk_prob", true);
  e.routed_scaling_factor = j.get_float("routed_scaling_factor", 1.0);
  e.activation = blocks::Activation::Relu2;
  e.bias = f.bias;
  if (has(Kind::Moe)) {
    if (e.top_k > e.num_experts)
      refuse(j, "num_experts_per_tok", "must be at most " + experts_field + " (" + std::to_string(e.num_experts) +
                                           "), found " + std::to_string(e.top_k));
    if (e.num_experts % e.n_group != 0)
      refuse(j, "n_group", "must divide " + experts_field + " (" + std::to_string(e.num_experts) + "), found " +
                               std::to_string(e.n_group));
    if (e.n_group > 1 && e.num_experts / e.n_group < 2)
      refuse(j, "n_group", "each expert group needs at least 2 experts (the group score sums its best two), found " +
                               std::to_string(e.num_experts / e.n_group) + " per group");
    if (e.topk_group > e.n_group)
      refuse(j, "topk_group", "must be at most n_group (" + std::to_string(e.n_group) + "), found " +
                                  std::to_string(e.topk_group));
    if (e.top_k > e.topk_group * (e.num_experts / e.n_group))
      refuse(j, "num_experts_per_tok", "must be at most the experts of the topk_group kept groups (" +
                                           std::to_string(e.topk_group * (e.num_experts / e.n_group)) + "), found " +
                                           std::to_string(e.top_k));
  }

  // Checkpoints: "model." is stored as "backbone."; stacked experts as one key per expert.
  lm.stored_as = [](const std::string& name, int64_t leading) -> std::vector<std::string> {
    if (name.rfind("model.", 0) != 0) return {};
    const std::string stored = "backbone." + name.substr(6);
    static const std::string kExperts = ".mixer.experts.";
    const auto at = stored.rfind(kExperts);
    if (at != std::string::npos && stored.find('.', at + kExperts.size()) == std::string::npos) {
      const std::string stem = stored.substr(0, at + kExperts.size());
      const std::string leaf = stored.substr(at + kExperts.size());  // up_proj | down_proj
      std::vector<std::string> keys;
      for (int64_t x = 0; x < leading; ++x) keys.push_back(stem + std::to_string(x) + "." + leaf + ".weight");
      return keys;
    }
    return {stored};
  };
  lm.ignored_checkpoint_prefixes = {"mtp."};
  return c;
}

std::shared_ptr<blocks::HybridLM> build_model(const Config& c) {
  auto model = std::make_shared<blocks::HybridLM>(c.lm);
  blocks::LayerOptions layer;
  layer.hidden_size = c.lm.hidden_size;
  layer.norm_eps = c.lm.norm_eps;
  for (size_t i = 0; i < c.kinds.size(); ++i) {
    auto l = std::make_shared<blocks::DecoderLayerImpl>(static_cast<int64_t>(i), layer);
    std::shared_ptr<blocks::SublayerImpl> mixer;
    switch (c.kinds[i]) {
      case Kind::Mamba: mixer = std::make_shared<blocks::Mamba2MixerImpl>(c.mixer); break;
      case Kind::Attention: mixer = std::make_shared<blocks::AttentionImpl>(c.attention); break;
      case Kind::Mlp: mixer = std::make_shared<blocks::MlpImpl>(c.mlp); break;
      case Kind::Moe: mixer = std::make_shared<blocks::GroupedMoeImpl>(c.moe); break;
    }
    l->add_unit("norm", "norm.input", {{"mixer", mixer}});
    model->add_layer(l);
  }
  model->finish();
  return model;
}

class NemotronHPlugin final : public blocks::BlockArchitecture {
 public:
  std::string id() const override { return "nemotron_h"; }
  std::vector<std::string> model_types() const override { return {"nemotron_h"}; }

  std::shared_ptr<blocks::HybridLM> make(const io::JsonConfig& json) const override {
    return build_model(parse(json));
  }

  // llama.cpp's nemotron_h (no MoE layer) or nemotron_h_moe (MoE layers): convert_hf_to_gguf.py's
  // NemotronHModel. Its loader tells the layer kinds apart by the per-layer head_count_kv and
  // feed_forward_length arrays (both 0: Mamba).
  std::optional<GgufLayout> gguf_layout(const io::JsonConfig& json) const override {
    const auto c = parse(json);
    const bool moe = c.pattern.find('E') != std::string::npos;
    if (moe && c.pattern.find('-') != std::string::npos)
      throw InputError("config " + json.path() + ": layers \"" + c.pattern + "\" mix MLP (-) and MoE (E) "
                       "layers; llama.cpp's nemotron_h_moe builds every feed-forward layer as MoE. Export "
                       "format \"merged\" instead");
    if (c.mixer.proj_bias || c.mlp.bias)
      throw InputError("config " + json.path() + ": use_bias / mlp_bias = true have no place in llama.cpp's "
                       "nemotron_h tensors; export format \"merged\" instead");
    nn::MetaScope meta;
    auto inv = build_model(c)->inventory();
    blocks::GgufBuilder g(moe ? "nemotron_h_moe" : "nemotron_h");
    const auto& a = c.attention;
    const int64_t layers = static_cast<int64_t>(c.kinds.size());
    g.u32("vocab_size", c.lm.vocab_size);
    g.u32("context_length", int64_t{1} << 20);  // the converter's value for a model without RoPE
    g.u32("embedding_length", c.lm.hidden_size);
    g.u32("block_count", layers);
    std::vector<int32_t> ff, kv;
    for (auto k : c.kinds) {
      ff.push_back(k == Kind::Mlp ? static_cast<int32_t>(c.mlp.intermediate_size)
                   : k == Kind::Moe ? static_cast<int32_t>(c.moe.intermediate_size) : 0);
      kv.push_back(k == Kind::Attention ? static_cast<int32_t>(a.num_kv_heads) : 0);
    }
    g.i32_array("feed_forward_length", ff);
    g.u32("attention.head_count", a.num_heads);
    g.i32_array("attention.head_count_kv", kv);
    g.u32("attention.key_length", a.head_dim);
    g.u32("attention.value_length", a.head_dim);
    g.u32("rope.dimension_count", c.lm.hidden_size / a.num_heads);
    g.boolean("rope.scaling.finetuned", false);
    g.f32("attention.layer_norm_epsilon", c.lm.norm_eps);
    g.u32("ssm.conv_kernel", c.mixer.conv_kernel);
    g.u32("ssm.state_size", c.mixer.state_size);
    g.u32("ssm.group_count", c.mixer.n_groups);
    g.u32("ssm.inner_size", c.mixer.inner());
    g.u32("ssm.time_step_rank", c.mixer.num_heads);
    if (moe) {
      const auto& e = c.moe;
      g.u32("expert_count", e.num_experts);
      g.u32("expert_used_count", e.top_k);
      g.u32("expert_feed_forward_length", e.intermediate_size);
      g.u32("expert_shared_feed_forward_length", e.shared_intermediate_size);
      g.u32("expert_shared_count", 1);
      g.boolean("expert_weights_norm", e.norm_topk_prob);
      g.f32("expert_weights_scale", e.routed_scaling_factor);
      // Keeping every group is no grouping; llama.cpp refuses used >= count when count > 1.
      const bool grouped = e.topk_group < e.n_group;
      g.u32("expert_group_count", grouped ? e.n_group : 1);
      g.u32("expert_group_used_count", grouped ? e.topk_group : 1);
      if (e.latent_size > 0) g.u32("moe_latent_size", e.latent_size);
    }
    blocks::GgufNames names;
    names.ssm_groups = c.mixer.n_groups;
    // The converter permutes q/k rows as for RoPE although there is none (QK^T is unchanged).
    names.head_dim = a.head_dim;
    names.rotary_dim = a.head_dim;
    g.tensors(inv, names);
    return g.layout();
  }
};

void register_nemotron_h(PluginRegistrar& registrar) {
  registrar.add_architecture(std::make_shared<NemotronHPlugin>());
}

}  // namespace
}  // namespace peftfw::nemotron_h

PEFTFW_DEFINE_PLUGIN("nemotron_h", "architecture", "0.1.0",
                     "Nemotron-H hybrid Mamba-2/attention/MLP/MoE (model_type nemotron_h)",
                     peftfw::nemotron_h::register_nemotron_h)
