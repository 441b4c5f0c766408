// Architecture plugin for Falcon-H1 (transformers FalconH1ForCausalLM, model_type "falcon_h1"): TII's
// hybrid where every layer runs attention and the Mamba-2 mixer side by side on the same normed
// input, then a SwiGLU MLP, with muP multipliers on the embedding, the head, both mixers' inputs
// and outputs, the keys, the five in_proj segments of the mixer and the MLP.
// The name table:
//   model.embed_tokens, model.layers.<i>.{input_layernorm, mamba.*, self_attn.{q,k,v,o}_proj,
//   pre_ff_layernorm, feed_forward.{gate_proj, up_proj, down_proj}}, model.final_layernorm, lm_head
#include <torch/torch.h>

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

namespace peftfw::falcon_h1 {
namespace {

using blocks::refuse;

struct Multipliers {
  double embedding = 1, lm_head = 1, key = 1, attention_in = 1, attention_out = 1, ssm_in = 1, ssm_out = 1;
  std::vector<double> ssm{1, 1, 1, 1, 1};  // in_proj segments z, x, B, C, dt
  std::vector<double> mlp{1, 1};           // gate, down
};

struct Config {
  blocks::LMOptions lm;
  blocks::Mamba2MixerOptions mixer;
  blocks::AttentionOptions attention;
  blocks::MlpOptions mlp;
  Multipliers mult;
  int64_t num_layers = 0;
  int64_t max_positions = 0;
  double rope_theta = 10000.0;
};

double finite(const io::JsonConfig& j, const std::string& key, double fallback) {
  const double v = j.is_unset(key) ? fallback : j.get_float(key, fallback);
  if (!std::isfinite(v)) refuse(j, key, "must be a finite number");
  return v;
}

std::vector<double> finite_list(const io::JsonConfig& j, const std::string& key, std::vector<double> fallback) {
  if (!j.has(key) || j.is_unset(key)) return fallback;
  const auto& node = j.raw().at(key);
  const std::string expected = "a list of " + std::to_string(fallback.size()) + " finite numbers";
  if (!node.is_array() || node.size() != fallback.size()) refuse(j, key, "expected " + expected + ", found " + node.dump());
  std::vector<double> out;
  for (const auto& v : node) {
    if (!v.is_number() || !std::isfinite(v.get<double>())) refuse(j, key, "expected " + expected + ", found " + node.dump());
    out.push_back(v.get<double>());
  }
  return out;
}

// Defaults are FalconH1Config's (transformers 5.17).
Config parse(const io::JsonConfig& j) {
  blocks::expect_model_type(j, {"falcon_h1"});
  Config c;
  auto& lm = c.lm;
  lm.architecture = "falcon_h1";
  lm.model_type = "falcon_h1";
  lm.final_norm = "final_layernorm";
  lm.vocab_size = blocks::dim_or(j, "vocab_size", 128000);
  lm.hidden_size = blocks::dim_or(j, "hidden_size", 4096);
  lm.norm_eps = j.get_float("rms_norm_eps", 1e-5);
  lm.tie_word_embeddings = j.get_bool("tie_word_embeddings", false);
  if (auto pad = j.optional_int("pad_token_id"); pad && *pad >= 0 && *pad < lm.vocab_size)
    lm.padding_idx = *pad;
  else if (!j.has("pad_token_id"))
    lm.padding_idx = 0;  // FalconH1Config's default pad_token_id
  c.num_layers = blocks::dim_or(j, "num_hidden_layers", 32);
  c.max_positions = j.get_int("max_position_embeddings", 8192);
  // hidden_act is both the MLP's and the mixer's conv activation.
  blocks::activation(j, "hidden_act", {"silu"}, "silu");

  auto& mu = c.mult;
  mu.embedding = finite(j, "embedding_multiplier", 1.0);
  mu.lm_head = finite(j, "lm_head_multiplier", 1.0);
  mu.key = finite(j, "key_multiplier", 1.0);
  mu.attention_in = finite(j, "attention_in_multiplier", 1.0);
  mu.attention_out = finite(j, "attention_out_multiplier", 1.0);
  mu.ssm_in = finite(j, "ssm_in_multiplier", 1.0);
  mu.ssm_out = finite(j, "ssm_out_multiplier", 1.0);
  mu.ssm = finite_list(j, "ssm_multipliers", mu.ssm);
  mu.mlp = finite_list(j, "mlp_multipliers", mu.mlp);
  if (mu.lm_head == 0.0) refuse(j, "lm_head_multiplier", "must not be 0");
  lm.embedding_multiplier = mu.embedding;
  lm.logits_divisor = 1.0 / mu.lm_head;

  auto& a = c.attention;
  a.hidden_size = lm.hidden_size;
  a.num_heads = blocks::dim_or(j, "num_attention_heads", 32);
  a.num_kv_heads = blocks::kv_heads(j, a.num_heads, 8);  // as the family's config class, absent: 8
  // head_dim is not a FalconH1Config field; the model reads it when the config carries one.
  a.head_dim = blocks::dim_or(j, "head_dim", lm.hidden_size / a.num_heads);
  a.bias = j.get_bool("attention_bias", false);
  a.key_multiplier = mu.key;
  // RoPE over the whole head: transformers' Falcon-H1 does not read partial_rotary_factor.
  const auto rope = blocks::rope_fields(j, 1.0);
  c.rope_theta = rope.theta;
  lm.rope = {a.head_dim, rope.theta};
  if (a.head_dim % 2 != 0)
    refuse(j, "head_dim", "RoPE needs an even head_dim, found " + std::to_string(a.head_dim));

  auto& f = c.mlp;
  f.layout = blocks::MlpOptions::Layout::Split;
  f.hidden_size = lm.hidden_size;
  f.intermediate_size = blocks::dim_or(j, "intermediate_size", 14336);
  f.bias = j.get_bool("mlp_bias", false);
  f.gate_multiplier = mu.mlp[0];

  auto& m = c.mixer;
  m.hidden_size = lm.hidden_size;
  m.num_heads = blocks::dim_or(j, "mamba_n_heads", 128);
  m.n_groups = blocks::dim_or(j, "mamba_n_groups", 1);
  m.state_size = blocks::dim_or(j, "mamba_d_state", 256);
  m.conv_kernel = blocks::dim_or(j, "mamba_d_conv", 4);
  m.chunk_size = blocks::dim_or(j, "mamba_chunk_size", 256);
  m.conv_bias = j.get_bool("mamba_conv_bias", true);
  m.proj_bias = j.get_bool("mamba_proj_bias", false);
  m.out_proj_bias = j.get_bool("projectors_bias", false);
  m.norm_eps = lm.norm_eps;
  std::tie(m.dt_min, m.dt_max) = blocks::time_step_limit(j);
  const int64_t d_ssm = j.is_unset("mamba_d_ssm") && j.has("mamba_d_ssm")
                            ? blocks::dim_or(j, "mamba_expand", 2) * lm.hidden_size
                            : blocks::dim_or(j, "mamba_d_ssm", 1024);
  const auto d_head = j.raw().find("mamba_d_head");
  if (d_head == j.raw().end() || d_head->is_null() || (d_head->is_string() && *d_head == "auto")) {
    if (d_ssm % m.num_heads != 0)
      refuse(j, "mamba_n_heads", "must divide the mamba width d_ssm (" + std::to_string(d_ssm) + "), found " +
                                     std::to_string(m.num_heads));
    m.head_dim = d_ssm / m.num_heads;
  } else {
    m.head_dim = blocks::require_dim(j, "mamba_d_head");
  }
  if (m.inner() != d_ssm)
    refuse(j, "mamba_d_head", "mamba_d_head x mamba_n_heads (" + std::to_string(m.inner()) +
                                  ") must equal the mamba width d_ssm (" + std::to_string(d_ssm) + ")");
  if (m.num_heads % m.n_groups != 0)
    refuse(j, "mamba_n_groups", "must divide mamba_n_heads (" + std::to_string(m.num_heads) + "), found " +
                                    std::to_string(m.n_groups));
  // mamba_rms_norm: a gated RMSNorm per group of d_ssm / n_groups; else y * silu(z), no weight.
  m.gated_norm = j.get_bool("mamba_rms_norm", false);
  m.norm_before_gate = j.get_bool("mamba_norm_before_gate", true);
  m.norm_group_size = m.n_groups == 1 && !m.norm_before_gate ? 0 : d_ssm / m.n_groups;
  m.in_proj_multipliers = mu.ssm;
  return c;
}

std::shared_ptr<blocks::HybridLM> build_model(const Config& c) {
  auto model = std::make_shared<blocks::HybridLM>(c.lm);
  blocks::LayerOptions layer;
  layer.hidden_size = c.lm.hidden_size;
  layer.norm_eps = c.lm.norm_eps;
  const auto& mu = c.mult;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    auto l = std::make_shared<blocks::DecoderLayerImpl>(i, layer);
    l->add_unit("input_layernorm", "norm.input",
                {{"mamba", std::make_shared<blocks::Mamba2MixerImpl>(c.mixer), mu.ssm_in, mu.ssm_out},
                 {"self_attn", std::make_shared<blocks::AttentionImpl>(c.attention), mu.attention_in,
                  mu.attention_out}});
    l->add_unit("pre_ff_layernorm", "norm.ff",
                {{"feed_forward", std::make_shared<blocks::MlpImpl>(c.mlp), 1.0, mu.mlp[1]}});
    model->add_layer(l);
  }
  model->finish();
  return model;
}

// Wraps the maker of the tensors named `name` (a global tensor) or "blk.<i>.<name>" to scale
// their result.
void scale(GgufLayout& layout, const std::string& name, double by) {
  if (by == 1.0) return;
  const std::string in_block = "." + name;
  for (auto& t : layout.tensors)
    if (t.name == name || (t.name.rfind("blk.", 0) == 0 && t.name.size() > in_block.size() &&
                           t.name.compare(t.name.size() - in_block.size(), in_block.size(), in_block) == 0)) {
      auto make = t.make;
      t.make = [make, by](const auto& get) { return make(get) * by; };
    }
}

class FalconH1Plugin final : public blocks::BlockArchitecture {
 public:
  std::string id() const override { return "falcon_h1"; }
  std::vector<std::string> model_types() const override { return {"falcon_h1"}; }

  std::shared_ptr<blocks::HybridLM> make(const io::JsonConfig& json) const override {
    return build_model(parse(json));
  }

  // llama.cpp's falcon-h1 (convert_hf_to_gguf.py's FalconH1Model): every multiplier is folded into
  // the weights; llama.cpp gates before its grouped norm.
  std::optional<GgufLayout> gguf_layout(const io::JsonConfig& json) const override {
    const auto c = parse(json);
    if (c.mixer.gated_norm && c.mixer.norm_before_gate)
      throw InputError("config " + json.path() + ": mamba_rms_norm with mamba_norm_before_gate = true "
                       "(norm, then gate) has no llama.cpp form: its falcon-h1 gates before the norm. Export "
                       "format \"merged\" instead");
    for (const auto& [set, field] : {std::pair{c.mixer.proj_bias, "mamba_proj_bias"},
                                     std::pair{c.mixer.out_proj_bias.value_or(false), "projectors_bias"},
                                     std::pair{c.attention.bias, "attention_bias"}, std::pair{c.mlp.bias, "mlp_bias"}})
      if (set)
        throw InputError("config " + json.path() + ": " + field + " = true has no place in llama.cpp's "
                         "falcon-h1 tensors; export format \"merged\" instead");
    nn::MetaScope meta;
    auto inv = build_model(c)->inventory();
    blocks::GgufBuilder g("falcon-h1");
    const auto& a = c.attention;
    const auto& m = c.mixer;
    g.u32("vocab_size", c.lm.vocab_size);
    g.u32("context_length", c.max_positions);
    g.u32("embedding_length", c.lm.hidden_size);
    g.u32("block_count", c.num_layers);
    g.u32("feed_forward_length", c.mlp.intermediate_size);
    g.u32("attention.head_count", a.num_heads);
    g.u32("attention.head_count_kv", a.num_kv_heads);
    g.u32("attention.key_length", a.head_dim);
    g.u32("attention.value_length", a.head_dim);
    g.f32("rope.freq_base", c.rope_theta);
    g.f32("attention.layer_norm_rms_epsilon", c.lm.norm_eps);
    g.u32("ssm.conv_kernel", m.conv_kernel);
    g.u32("ssm.inner_size", m.inner());
    g.u32("ssm.state_size", m.state_size);
    g.u32("ssm.time_step_rank", m.num_heads);
    g.u32("ssm.group_count", m.n_groups);
    blocks::GgufNames names;
    names.ssm_groups = m.n_groups;  // q/k are not permuted: falcon-h1 uses NeoX-style RoPE
    g.tensors(inv, names);
    auto layout = g.layout();
    const auto& mu = c.mult;
    for (auto& t : layout.tensors)
      if (t.name.size() > 16 && t.name.compare(t.name.size() - 16, 16, ".ffn_norm.weight") == 0)
        t.name.resize(t.name.size() - 7);  // the converter writes blk.N.ffn_norm, no ".weight"
    scale(layout, "token_embd.weight", mu.embedding);
    scale(layout, "output.weight", mu.lm_head);
    scale(layout, "attn_q.weight", mu.attention_in);
    scale(layout, "attn_k.weight", mu.key);  // then attention_in, as the converter: two float32 products
    scale(layout, "attn_k.weight", mu.attention_in);
    scale(layout, "attn_v.weight", mu.attention_in);
    scale(layout, "attn_output.weight", mu.attention_out);
    scale(layout, "ssm_out.weight", mu.ssm_out);
    scale(layout, "ffn_gate.weight", mu.mlp[0]);
    scale(layout, "ffn_down.weight", mu.mlp[1]);
    // in_proj: x ssm_in, then its rows [z | x | B | C | dt] by the ssm multipliers.
    const int64_t I = m.inner(), GN = m.n_groups * m.state_size;
    const std::vector<int64_t> rows = {I, I, GN, GN, m.num_heads};
    for (auto& t : layout.tensors)
      if (t.name.size() > 14 && t.name.compare(t.name.size() - 14, 14, ".ssm_in.weight") == 0) {
        auto make = t.make;
        const double in = mu.ssm_in;
        const auto seg = mu.ssm;
        t.make = [make, in, seg, rows](const auto& get) {
          auto w = make(get) * in;
          std::vector<torch::Tensor> parts;
          int64_t at = 0;
          for (size_t s = 0; s < rows.size(); ++s) {
            parts.push_back(w.narrow(0, at, rows[s]) * seg[s]);
            at += rows[s];
          }
          return torch::cat(parts, 0);
        };
      }
    // Tied: llama.cpp would fall back to the scaled token_embd; write the head explicitly.
    if (c.lm.tie_word_embeddings) {
      const std::string embed = "model.embed_tokens.weight";
      const double by = mu.lm_head;
      layout.tensors.push_back({"output.weight", {c.lm.vocab_size, c.lm.hidden_size}, false,
                                [embed, by](const auto& get) { return get(embed) * by; }});
    }
    return layout;
  }
};

void register_falcon_h1(PluginRegistrar& registrar) {
  registrar.add_architecture(std::make_shared<FalconH1Plugin>());
}

}  // namespace
}  // namespace peftfw::falcon_h1

PEFTFW_DEFINE_PLUGIN("falcon_h1", "architecture", "0.1.0",
                     "Falcon-H1 hybrid, attention and Mamba-2 in parallel (model_type falcon_h1)",
                     peftfw::falcon_h1::register_falcon_h1)
