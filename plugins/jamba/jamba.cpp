// Architecture plugin for Jamba (transformers JambaForCausalLM, model_type "jamba"): Mamba-1 mixers
// with RMS norms on dt, B and C, attention without positional encoding, and a feed-forward that is a
// softmax-routed MoE or a dense SwiGLU MLP. Layer i is attention when i % attn_layer_period ==
// attn_layer_offset (else mamba) and MoE when i % expert_layer_period == expert_layer_offset (else MLP),
// so its kind is one of mamba+moe, mamba+mlp, attention+moe and attention+mlp. The name table:
//   model.embed_tokens, model.layers.<i>.{input_layernorm, mamba | self_attn, pre_ff_layernorm,
//   feed_forward.{gate_proj, up_proj, down_proj} | feed_forward.{router, experts.{gate_up_proj,
//   down_proj}}}, model.final_layernorm, lm_head
// Checkpoints store the experts one key per expert and projection (experts.<e>.{gate,up,down}_proj).
#include <torch/torch.h>

#include "peftfw/blocks/attention.hpp"
#include "peftfw/blocks/config_fields.hpp"
#include "peftfw/blocks/decoder.hpp"
#include "peftfw/blocks/gguf.hpp"
#include "peftfw/blocks/mamba1_mixer.hpp"
#include "peftfw/blocks/mlp.hpp"
#include "peftfw/blocks/plugin.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/nn/param_init.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/registrar.hpp"

namespace peftfw::jamba {
namespace {

using blocks::refuse;

struct Config {
  blocks::LMOptions lm;
  blocks::Mamba1MixerOptions mixer;
  blocks::AttentionOptions attention;
  blocks::MlpOptions mlp;
  blocks::SoftmaxMoeOptions moe;
  int64_t num_layers = 0;
  int64_t max_positions = 0;
  bool explicit_head_dim = false;
  std::vector<bool> is_attention, is_moe;
};

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// The released checkpoints' expert keys: gate_up_proj [E, 2F, H] is experts.<e>.gate_proj then
// experts.<e>.up_proj for each e; down_proj [E, H, F] is experts.<e>.down_proj.
std::vector<std::string> expert_keys(const std::string& name, int64_t experts) {
  for (const char* leaf : {"gate_up_proj", "down_proj"}) {
    const std::string tail = std::string("feed_forward.experts.") + leaf;
    if (!ends_with(name, tail)) continue;
    const auto base = name.substr(0, name.size() - std::string(leaf).size());  // "...experts."
    std::vector<std::string> keys;
    for (int64_t e = 0; e < experts; ++e) {
      const auto p = base + std::to_string(e) + ".";
      if (std::string(leaf) == "gate_up_proj") {
        keys.push_back(p + "gate_proj.weight");
        keys.push_back(p + "up_proj.weight");
      } else {
        keys.push_back(p + "down_proj.weight");
      }
    }
    return keys;
  }
  return {};
}

int64_t period_index(const io::JsonConfig& j, const std::string& period_key, int64_t period_default,
                     const std::string& offset_key, int64_t offset_default, int64_t& offset) {
  const int64_t period = blocks::dim_or(j, period_key, period_default);
  offset = j.get_int(offset_key, offset_default);
  if (offset < 0 || offset >= period)
    refuse(j, offset_key, "must lie in 0.." + std::to_string(period - 1) + " (" + period_key + " is " +
                              std::to_string(period) + "), found " + std::to_string(offset));
  return period;
}

// Defaults are JambaConfig's (transformers 5.17).
Config parse(const io::JsonConfig& j) {
  blocks::expect_model_type(j, {"jamba"});
  Config c;
  auto& lm = c.lm;
  lm.architecture = "jamba";
  lm.model_type = "jamba";
  lm.final_norm = "final_layernorm";
  lm.vocab_size = blocks::dim_or(j, "vocab_size", 65536);
  lm.hidden_size = blocks::dim_or(j, "hidden_size", 4096);
  lm.norm_eps = j.get_float("rms_norm_eps", 1e-6);
  lm.tie_word_embeddings = j.get_bool("tie_word_embeddings", false);
  if (auto pad = j.optional_int("pad_token_id"); pad && *pad >= 0 && *pad < lm.vocab_size)
    lm.padding_idx = *pad;
  else if (!j.has("pad_token_id"))
    lm.padding_idx = 0;  // JambaConfig's default pad_token_id
  if (j.get_bool("output_router_logits", false)) lm.router_aux_loss_coef = j.get_float("router_aux_loss_coef", 0.001);
  c.num_layers = blocks::dim_or(j, "num_hidden_layers", 32);
  c.max_positions = blocks::dim_or(j, "max_position_embeddings", 262144);
  blocks::activation(j, "hidden_act", {"silu"}, "silu");
  if (j.get_bool("use_mambapy", false))
    refuse(j, "use_mambapy", "true selects mamba.py's parallel scan in transformers' fallback path; peftfw "
                             "runs the selective scan itself (same result): set it to false");

  int64_t attn_offset = 0, expert_offset = 0;
  const int64_t attn_period = period_index(j, "attn_layer_period", 8, "attn_layer_offset", 4, attn_offset);
  const int64_t expert_period = period_index(j, "expert_layer_period", 2, "expert_layer_offset", 1, expert_offset);
  const int64_t experts = blocks::dim_or(j, "num_experts", 16);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    c.is_attention.push_back(i % attn_period == attn_offset);
    c.is_moe.push_back(experts > 1 && i % expert_period == expert_offset);  // one expert: a dense MLP
  }

  auto& a = c.attention;
  a.hidden_size = lm.hidden_size;
  a.num_heads = blocks::dim_or(j, "num_attention_heads", 32);
  a.num_kv_heads = blocks::kv_heads(j, a.num_heads, 8);
  if (!j.has("head_dim") && lm.hidden_size % a.num_heads != 0)
    refuse(j, "num_attention_heads", "must divide hidden_size (" + std::to_string(lm.hidden_size) + "), found " +
                                         std::to_string(a.num_heads));
  a.head_dim = blocks::dim_or(j, "head_dim", lm.hidden_size / a.num_heads);
  c.explicit_head_dim = a.head_dim * a.num_heads != lm.hidden_size;

  auto& f = c.mlp;
  f.layout = blocks::MlpOptions::Layout::Split;
  f.hidden_size = lm.hidden_size;
  f.intermediate_size = blocks::dim_or(j, "intermediate_size", 14336);

  auto& e = c.moe;
  e.hidden_size = lm.hidden_size;
  e.num_experts = experts;
  e.top_k = blocks::dim_or(j, "num_experts_per_tok", 2);
  e.intermediate_size = f.intermediate_size;
  if (experts > 1 && e.top_k > experts)
    refuse(j, "num_experts_per_tok", "must be at most num_experts (" + std::to_string(experts) + "), found " +
                                         std::to_string(e.top_k));

  auto& m = c.mixer;
  m.hidden_size = lm.hidden_size;
  m.inner = blocks::dim_or(j, "mamba_expand", 2) * lm.hidden_size;
  m.state_size = blocks::dim_or(j, "mamba_d_state", 16);
  m.conv_kernel = blocks::dim_or(j, "mamba_d_conv", 4);
  m.dt_rank = blocks::dim_or_auto(j, "mamba_dt_rank", (lm.hidden_size + 15) / 16);
  m.conv_bias = j.get_bool("mamba_conv_bias", true);
  m.proj_bias = j.get_bool("mamba_proj_bias", false);
  m.dt_bc_norm = blocks::Mamba1MixerOptions::DtBcNorm::Weighted;
  m.dt_bc_norm_eps = lm.norm_eps;

  const int64_t E = experts;
  lm.stored_as = [E](const std::string& name, int64_t) { return expert_keys(name, E); };
  return c;
}

std::shared_ptr<blocks::HybridLM> build_model(const Config& c) {
  auto model = std::make_shared<blocks::HybridLM>(c.lm);
  blocks::LayerOptions layer;
  layer.hidden_size = c.lm.hidden_size;
  layer.norm_eps = c.lm.norm_eps;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const bool attention = c.is_attention[static_cast<size_t>(i)], moe = c.is_moe[static_cast<size_t>(i)];
    auto l = std::make_shared<blocks::DecoderLayerImpl>(i, layer);
    if (attention) {
      l->add_unit("input_layernorm", "norm.input", {{"self_attn", std::make_shared<blocks::AttentionImpl>(c.attention)}});
    } else {
      l->add_unit("input_layernorm", "norm.input", {{"mamba", std::make_shared<blocks::Mamba1MixerImpl>(c.mixer)}});
    }
    std::shared_ptr<blocks::SublayerImpl> ff;
    if (moe) ff = std::make_shared<blocks::SoftmaxMoeImpl>(c.moe);
    else ff = std::make_shared<blocks::MlpImpl>(c.mlp);
    l->add_unit("pre_ff_layernorm", "norm.ff", {{"feed_forward", ff}});
    l->set_kind(std::string(attention ? "attention" : "mamba") + (moe ? "+moe" : "+mlp"));
    model->add_layer(l);
  }
  model->finish();
  return model;
}

class JambaPlugin final : public blocks::BlockArchitecture {
 public:
  std::string id() const override { return "jamba"; }
  std::vector<std::string> model_types() const override { return {"jamba"}; }

  std::shared_ptr<blocks::HybridLM> make(const io::JsonConfig& json) const override {
    return build_model(parse(json));
  }

  // llama.cpp's "jamba" architecture (convert_hf_to_gguf.py's JambaModel): per-layer KV head counts
  // tell mamba layers (0) from attention layers; a MoE layer is one with ffn_gate_inp.
  std::optional<GgufLayout> gguf_layout(const io::JsonConfig& json) const override {
    const auto c = parse(json);
    auto unsupported = [&](const std::string& what) {
      throw InputError("config " + json.path() + ": " + what + "; export format \"merged\" instead");
    };
    if (c.mixer.proj_bias)
      unsupported("mamba_proj_bias = true has no place in llama.cpp's jamba tensors (no ssm_in/ssm_out bias)");
    if (!c.mixer.conv_bias) unsupported("mamba_conv_bias = false: llama.cpp's jamba requires ssm_conv1d.bias");
    if (c.mixer.inner != 2 * c.lm.hidden_size)
      unsupported("mamba_expand must be 2 for llama.cpp's jamba (d_inner = 2 x hidden_size)");
    if (c.explicit_head_dim)
      unsupported("head_dim " + std::to_string(c.attention.head_dim) +
                  " x num_attention_heads is not hidden_size; llama.cpp's jamba derives head_dim = hidden_size / heads");
    bool any_attention = false;
    for (bool a : c.is_attention) any_attention = any_attention || a;
    if (!any_attention)
      unsupported("no attention layer (attn_layer_offset >= num_hidden_layers): llama.cpp's jamba cannot make a "
                  "context for a model without one");
    nn::MetaScope meta;
    auto inv = build_model(c)->inventory();
    bool any_moe = false;
    std::vector<int32_t> kv;
    for (int64_t i = 0; i < c.num_layers; ++i) {
      any_moe = any_moe || c.is_moe[static_cast<size_t>(i)];
      kv.push_back(c.is_attention[static_cast<size_t>(i)] ? static_cast<int32_t>(c.attention.num_kv_heads) : 0);
    }
    blocks::GgufBuilder g("jamba");
    g.u32("block_count", c.num_layers);
    g.u32("context_length", c.max_positions);
    g.u32("embedding_length", c.lm.hidden_size);
    g.u32("feed_forward_length", c.mlp.intermediate_size);
    g.u32("attention.head_count", c.attention.num_heads);
    g.i32_array("attention.head_count_kv", kv);
    g.u32("ssm.conv_kernel", c.mixer.conv_kernel);
    g.u32("ssm.inner_size", c.mixer.inner);
    g.u32("ssm.state_size", c.mixer.state_size);
    g.u32("ssm.time_step_rank", c.mixer.dt_rank);
    g.f32("attention.layer_norm_rms_epsilon", c.lm.norm_eps);
    // Without MoE layers llama.cpp must see no experts (it checks used <= count).
    g.u32("expert_count", any_moe ? c.moe.num_experts : 0);
    g.u32("expert_used_count", any_moe ? c.moe.top_k : 0);
    g.u32("vocab_size", c.lm.vocab_size);
    blocks::GgufNames names;
    names.ssm_columns = false;
    g.tensors(inv, names);
    return g.layout();
  }
};

void register_jamba(PluginRegistrar& registrar) { registrar.add_architecture(std::make_shared<JambaPlugin>()); }

}  // namespace
}  // namespace peftfw::jamba

PEFTFW_DEFINE_PLUGIN("jamba", "architecture", "0.1.0",
                     "Jamba: Mamba-1 + attention + MoE (model_type jamba)", peftfw::jamba::register_jamba)
