// Architecture plugin for Mamba-1 (transformers MambaForCausalLM, model_type "mamba") and
// Falcon-Mamba (FalconMambaForCausalLM, model_type "falcon_mamba": the same model with weightless
// RMS norms on dt, B and C). The name table:
//   backbone.embeddings (legacy files: backbone.embedding), backbone.layers.<i>.{norm, mixer.{in_proj,
//   conv1d, x_proj, dt_proj, A_log, D, out_proj}}, backbone.norm_f, lm_head (untied only)
#include <torch/torch.h>

#include "peftfw/blocks/config_fields.hpp"
#include "peftfw/blocks/decoder.hpp"
#include "peftfw/blocks/gguf.hpp"
#include "peftfw/blocks/mamba1_mixer.hpp"
#include "peftfw/blocks/plugin.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/nn/param_init.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/registrar.hpp"

namespace peftfw::mamba {
namespace {

using blocks::refuse;

struct Config {
  blocks::LMOptions lm;
  blocks::Mamba1MixerOptions mixer;
  int64_t num_layers = 0;
  bool residual_in_fp32 = true;
  bool falcon = false;
};

// Defaults are MambaConfig's and FalconMambaConfig's (transformers 5.17).
Config parse(const io::JsonConfig& j) {
  blocks::expect_model_type(j, {"mamba", "falcon_mamba"});
  Config c;
  c.falcon = j.get_string("model_type", "") == "falcon_mamba";
  auto& lm = c.lm;
  lm.architecture = "mamba";
  lm.model_type = c.falcon ? "falcon_mamba" : "mamba";
  lm.backbone = "backbone";
  lm.embedding = "embeddings";
  lm.final_norm = "norm_f";
  lm.vocab_size = blocks::dim_or(j, "vocab_size", 50280);
  lm.hidden_size = blocks::dim_or(j, "hidden_size", 768);
  lm.norm_eps = j.get_float("layer_norm_epsilon", 1e-5);
  lm.tie_word_embeddings = j.get_bool("tie_word_embeddings", true);
  lm.checkpoint_aliases = {{"backbone.embedding.weight", "backbone.embeddings.weight"}};
  c.num_layers = blocks::dim_or(j, "num_hidden_layers", 32);
  c.residual_in_fp32 = j.get_bool("residual_in_fp32", true);
  blocks::activation(j, "hidden_act", {"silu"}, "silu");
  if (j.get_bool("use_mambapy", false))
    refuse(j, "use_mambapy", "true selects mamba.py's parallel scan in transformers' fallback path; peftfw "
                             "runs the selective scan itself (same result): set it to false");

  auto& m = c.mixer;
  m.hidden_size = lm.hidden_size;
  // An explicit intermediate_size wins over expand * hidden_size (as MambaConfig applies it).
  m.inner = blocks::dim_or(j, "intermediate_size", blocks::dim_or(j, "expand", 2) * lm.hidden_size);
  m.state_size = blocks::dim_or(j, "state_size", 16);
  m.conv_kernel = blocks::dim_or(j, "conv_kernel", 4);
  m.dt_rank = blocks::dim_or_auto(j, "time_step_rank", (lm.hidden_size + 15) / 16);
  m.conv_bias = j.get_bool("use_conv_bias", true);
  m.proj_bias = j.get_bool("use_bias", false);
  if (c.falcon) {
    m.dt_bc_norm = blocks::Mamba1MixerOptions::DtBcNorm::Weightless;
    m.dt_bc_norm_eps = j.get_float("mixer_rms_eps", 1e-6);
  }
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
    l->add_unit("norm", "norm.input", {{"mixer", std::make_shared<blocks::Mamba1MixerImpl>(c.mixer)}});
    model->add_layer(l);
  }
  model->finish();
  return model;
}

class MambaPlugin final : public blocks::BlockArchitecture {
 public:
  std::string id() const override { return "mamba"; }
  std::vector<std::string> model_types() const override { return {"mamba", "falcon_mamba"}; }

  std::shared_ptr<blocks::HybridLM> make(const io::JsonConfig& json) const override {
    return build_model(parse(json));
  }

  // llama.cpp's "mamba" architecture, for both model types (convert_hf_to_gguf.py's MambaModel):
  // Falcon-Mamba is the ssm.dt_b_c_rms flag, its norms taking layer_norm_epsilon as their eps.
  std::optional<GgufLayout> gguf_layout(const io::JsonConfig& json) const override {
    const auto c = parse(json);
    auto unsupported = [&](const std::string& what) {
      throw InputError("config " + json.path() + ": " + what + "; export format \"merged\" instead");
    };
    if (c.mixer.proj_bias) unsupported("use_bias = true has no place in llama.cpp's mamba tensors (no ssm_in/ssm_out bias)");
    if (!c.mixer.conv_bias) unsupported("use_conv_bias = false: llama.cpp's mamba requires ssm_conv1d.bias");
    if (c.mixer.inner != 2 * c.lm.hidden_size)
      unsupported("intermediate_size " + std::to_string(c.mixer.inner) + " is not 2 x hidden_size (" +
                  std::to_string(2 * c.lm.hidden_size) + "), the only expansion llama.cpp's mamba supports");
    nn::MetaScope meta;
    auto inv = build_model(c)->inventory();
    blocks::GgufBuilder g("mamba");
    g.u32("context_length", 1 << 20);
    g.u32("embedding_length", c.lm.hidden_size);
    g.u32("feed_forward_length", 0);
    g.u32("attention.head_count", 0);
    g.u32("block_count", c.num_layers);
    g.u32("ssm.conv_kernel", c.mixer.conv_kernel);
    g.u32("ssm.inner_size", c.mixer.inner);
    g.u32("ssm.state_size", c.mixer.state_size);
    g.u32("ssm.time_step_rank", c.mixer.dt_rank);
    g.f32("attention.layer_norm_rms_epsilon", c.lm.norm_eps);
    g.boolean("ssm.dt_b_c_rms", c.falcon);
    g.u32("vocab_size", c.lm.vocab_size);
    blocks::GgufNames names;
    names.ssm_columns = false;
    g.tensors(inv, names);
    return g.layout();
  }
};

void register_mamba(PluginRegistrar& registrar) { registrar.add_architecture(std::make_shared<MambaPlugin>()); }

}  // namespace
}  // namespace peftfw::mamba

PEFTFW_DEFINE_PLUGIN("mamba", "architecture", "0.1.0",
                     "Mamba-1 and Falcon-Mamba (model_type mamba, falcon_mamba)", peftfw::mamba::register_mamba)
