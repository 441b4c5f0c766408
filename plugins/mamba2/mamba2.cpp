// Architecture plugin for pure Mamba-2 (transformers Mamba2ForCausalLM, model_type "mamba2"),
// Codestral Mamba included. The name table:
//   backbone.embeddings (legacy files: backbone.embedding), backbone.layers.<i>.{norm, mixer},
//   backbone.norm_f, lm_head
#include <torch/torch.h>

#include "peftfw/blocks/config_fields.hpp"
#include "peftfw/error.hpp"
#include "peftfw/blocks/decoder.hpp"
#include "peftfw/blocks/plugin.hpp"
#include "peftfw/blocks/gguf.hpp"
#include "peftfw/blocks/mamba2_mixer.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/nn/param_init.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/registrar.hpp"

namespace peftfw::mamba2 {
namespace {

using blocks::refuse;

struct Config {
  blocks::LMOptions lm;
  blocks::Mamba2MixerOptions mixer;
  int64_t num_layers = 0;
  bool residual_in_fp32 = true;
};

// Defaults are Mamba2Config's (transformers 5.17).
Config parse(const io::JsonConfig& j) {
  blocks::expect_model_type(j, {"mamba2"});
  Config c;
  auto& lm = c.lm;
  lm.architecture = "mamba2";
  lm.model_type = "mamba2";
  lm.backbone = "backbone";
  lm.embedding = "embeddings";
  lm.final_norm = "norm_f";
  lm.vocab_size = blocks::dim_or(j, "vocab_size", 32768);
  lm.hidden_size = blocks::dim_or(j, "hidden_size", 4096);
  lm.norm_eps = j.get_float("layer_norm_epsilon", 1e-5);
  lm.tie_word_embeddings = j.get_bool("tie_word_embeddings", false);
  lm.checkpoint_aliases = {{"backbone.embedding.weight", "backbone.embeddings.weight"}};
  c.num_layers = blocks::dim_or(j, "num_hidden_layers", 64);
  c.residual_in_fp32 = j.get_bool("residual_in_fp32", true);
  blocks::activation(j, "hidden_act", {"silu"}, "silu");

  auto& m = c.mixer;
  m.hidden_size = lm.hidden_size;
  m.num_heads = blocks::dim_or(j, "num_heads", 128);
  m.head_dim = blocks::dim_or(j, "head_dim", 64);
  m.n_groups = blocks::dim_or(j, "n_groups", 8);
  m.state_size = blocks::dim_or(j, "state_size", 128);
  m.conv_kernel = blocks::dim_or(j, "conv_kernel", 4);
  m.chunk_size = blocks::dim_or(j, "chunk_size", 256);
  m.conv_bias = j.get_bool("use_conv_bias", true);
  m.proj_bias = j.get_bool("use_bias", false);
  m.norm_eps = lm.norm_eps;
  std::tie(m.dt_min, m.dt_max) = blocks::time_step_limit(j);
  const int64_t expand = blocks::dim_or(j, "expand", 2);
  if (lm.hidden_size * expand != m.inner())
    refuse(j, "num_heads",
           "num_heads x head_dim (" + std::to_string(m.num_heads) + " x " + std::to_string(m.head_dim) +
               ") must equal hidden_size x expand (" + std::to_string(lm.hidden_size * expand) + ")");
  if (m.num_heads % m.n_groups != 0)
    refuse(j, "n_groups", "must divide num_heads (" + std::to_string(m.num_heads) + "), found " +
                              std::to_string(m.n_groups));
  return c;
}

std::shared_ptr<blocks::HybridLM> build_model(const Config& c) {
  auto model = std::make_shared<blocks::HybridLM>(c.lm);
  blocks::LayerOptions layer;
  layer.hidden_size = c.lm.hidden_size;
  layer.norm_eps = c.lm.norm_eps;
  layer.residual_in_fp32 = c.residual_in_fp32;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    auto l = std::make_shared<blocks::DecoderLayerImpl>(i, layer);
    l->add_unit("norm", "norm.input", {{"mixer", std::make_shared<blocks::Mamba2MixerImpl>(c.mixer)}});
    model->add_layer(l);
  }
  model->finish();
  return model;
}

class Mamba2Plugin final : public blocks::BlockArchitecture {
 public:
  std::string id() const override { return "mamba2"; }
  std::vector<std::string> model_types() const override { return {"mamba2"}; }

  std::shared_ptr<blocks::HybridLM> make(const io::JsonConfig& json) const override {
    return build_model(parse(json));
  }

  // llama.cpp's "mamba2" architecture (convert_hf_to_gguf.py Mamba2Model).
  std::optional<GgufLayout> gguf_layout(const io::JsonConfig& json) const override {
    const auto c = parse(json);
    if (c.mixer.proj_bias)
      throw InputError("config " + json.path() + ": use_bias = true has no place in llama.cpp's mamba2 "
                       "tensors (no ssm_in/ssm_out bias); export format \"merged\" instead");
    nn::MetaScope meta;
    auto inv = build_model(c)->inventory();
    blocks::GgufBuilder g("mamba2");
    g.u32("context_length", 1 << 20);
    g.u32("embedding_length", c.lm.hidden_size);
    g.u32("feed_forward_length", 0);
    g.u32("attention.head_count", 0);
    g.u32("block_count", c.num_layers);
    g.u32("ssm.conv_kernel", c.mixer.conv_kernel);
    g.u32("ssm.inner_size", c.mixer.inner());
    g.u32("ssm.state_size", c.mixer.state_size);
    g.u32("ssm.time_step_rank", c.mixer.num_heads);
    g.u32("ssm.group_count", c.mixer.n_groups);
    g.f32("attention.layer_norm_rms_epsilon", c.lm.norm_eps);
    g.u32("vocab_size", c.lm.vocab_size);
    blocks::GgufNames names;
    names.ssm_groups = c.mixer.n_groups;  // ssm_norm is stored per group: [G, inner/G]
    g.tensors(inv, names);
    return g.layout();
  }
};

void register_mamba2(PluginRegistrar& registrar) {
  registrar.add_architecture(std::make_shared<Mamba2Plugin>());
}

}  // namespace
}  // namespace peftfw::mamba2

PEFTFW_DEFINE_PLUGIN("mamba2", "architecture", "0.1.0",
                     "Mamba-2 and Codestral Mamba (model_type mamba2)", peftfw::mamba2::register_mamba2)
