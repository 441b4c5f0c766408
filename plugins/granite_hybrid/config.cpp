// Parsing and validation of GraniteMoeHybrid config.json.
#include "config.hpp"

#include <cmath>
#include <nlohmann/json.hpp>
#include <tuple>

#include "peftfw/blocks/config_fields.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"

namespace peftfw::granite {

const char* layer_kind_name(LayerKind kind) {
  return kind == LayerKind::Mamba ? "mamba" : "attention";
}

using blocks::positive;
using blocks::refuse;

GraniteConfig parse_config(const io::JsonConfig& j) {
  GraniteConfig c;
  const auto model_type = j.get_string("model_type", "");
  if (model_type != "granitemoehybrid")
    refuse(j, "model_type", "expected \"granitemoehybrid\", found \"" + model_type + "\"");

  c.vocab_size = positive(j, "vocab_size", j.require_int("vocab_size"));
  c.hidden_size = positive(j, "hidden_size", j.require_int("hidden_size"));
  c.num_layers = positive(j, "num_hidden_layers", j.require_int("num_hidden_layers"));
  c.num_heads = positive(j, "num_attention_heads", j.require_int("num_attention_heads"));
  c.num_kv_heads = positive(j, "num_key_value_heads", j.get_int("num_key_value_heads", c.num_heads));
  if (c.num_heads % c.num_kv_heads != 0)
    refuse(j, "num_key_value_heads",
           "must divide num_attention_heads (" + std::to_string(c.num_heads) + "), found " +
               std::to_string(c.num_kv_heads));
  c.head_dim = positive(j, "head_dim", j.get_int("head_dim", c.hidden_size / c.num_heads));
  c.intermediate_size = j.get_int("intermediate_size", 11008);
  c.shared_intermediate_size =
      positive(j, "shared_intermediate_size", j.get_int("shared_intermediate_size", 1024));
  c.num_experts = j.get_int("num_local_experts", 8);
  if (c.num_experts < 0) refuse(j, "num_local_experts", "must be >= 0");
  c.experts_per_token = j.get_int("num_experts_per_tok", 2);
  if (c.num_experts > 0) {
    positive(j, "intermediate_size", c.intermediate_size);
    if (c.experts_per_token < 1 || c.experts_per_token > c.num_experts)
      refuse(j, "num_experts_per_tok",
             "must be between 1 and num_local_experts (" + std::to_string(c.num_experts) +
                 "), found " + std::to_string(c.experts_per_token));
  }
  c.rms_norm_eps = j.get_float("rms_norm_eps", 1e-6);
  c.embedding_multiplier = j.get_float("embedding_multiplier", 1.0);
  c.attention_multiplier = j.get_float("attention_multiplier", 1.0);
  c.residual_multiplier = j.get_float("residual_multiplier", 1.0);
  c.logits_scaling = j.get_float("logits_scaling", 1.0);
  if (c.logits_scaling == 0.0) refuse(j, "logits_scaling", "must not be 0 (logits are divided by it)");
  c.attention_bias = j.get_bool("attention_bias", false);
  c.tie_word_embeddings = j.get_bool("tie_word_embeddings", false);

  const auto act = j.get_string("hidden_act", "silu");
  if (act != "silu") refuse(j, "hidden_act", "only \"silu\" is supported, found \"" + act + "\"");

  const auto pos = j.optional_string("position_embedding_type");
  if (!pos || *pos == "nope") {
    c.use_rope = false;
  } else if (*pos == "rope") {
    c.use_rope = true;
  } else {
    refuse(j, "position_embedding_type", "expected null, \"nope\" or \"rope\", found \"" + *pos + "\"");
  }
  if (auto rp = j.optional_child("rope_parameters")) {
    const auto type = rp->get_string("rope_type", "default");
    if (c.use_rope && type != "default")
      refuse(j, "rope_parameters.rope_type", "only \"default\" RoPE is supported, found \"" + type + "\"");
    c.rope_theta = rp->get_float("rope_theta", j.get_float("rope_theta", 10000.0));
  } else {
    c.rope_theta = j.get_float("rope_theta", 10000.0);
  }

  // layer_types (alias layers_block_type); transformers' legacy names accepted.
  std::vector<std::string> types;
  const std::string types_key = j.has("layer_types") ? "layer_types" : "layers_block_type";
  if (!j.is_unset(types_key)) {
    types = j.require_string_list(types_key);
  } else {
    types.assign(static_cast<size_t>(c.num_layers), "mamba");
  }
  if (static_cast<int64_t>(types.size()) != c.num_layers)
    refuse(j, types_key,
           "has " + std::to_string(types.size()) + " entries but num_hidden_layers is " +
               std::to_string(c.num_layers));
  for (size_t i = 0; i < types.size(); ++i) {
    const auto& t = types[i];
    if (t == "mamba" || t == "linear_attention") {
      c.layer_kinds.push_back(LayerKind::Mamba);
    } else if (t == "attention" || t == "full_attention") {
      c.layer_kinds.push_back(LayerKind::Attention);
    } else {
      refuse(j, types_key + "[" + std::to_string(i) + "]",
             "unknown layer type \"" + t +
                 "\"; expected \"mamba\" (or \"linear_attention\") or \"attention\" (or \"full_attention\")");
    }
  }

  c.mamba_heads = positive(j, "mamba_n_heads", j.get_int("mamba_n_heads", 128));
  c.mamba_groups = positive(j, "mamba_n_groups", j.get_int("mamba_n_groups", 1));
  c.mamba_state = positive(j, "mamba_d_state", j.get_int("mamba_d_state", 256));
  c.mamba_conv_kernel = positive(j, "mamba_d_conv", j.get_int("mamba_d_conv", 4));
  c.mamba_expand = positive(j, "mamba_expand", j.get_int("mamba_expand", 2));
  c.mamba_chunk_size = positive(j, "mamba_chunk_size", j.get_int("mamba_chunk_size", 256));
  c.mamba_conv_bias = j.get_bool("mamba_conv_bias", true);
  c.mamba_proj_bias = j.get_bool("mamba_proj_bias", false);
  const int64_t inner = c.mamba_expand * c.hidden_size;
  const auto d_head = j.raw().find("mamba_d_head");
  if (d_head == j.raw().end() || d_head->is_null() ||
      (d_head->is_string() && d_head->get<std::string>() == "auto")) {
    if (inner % c.mamba_heads != 0)
      refuse(j, "mamba_n_heads",
             "must divide mamba_expand * hidden_size (" + std::to_string(inner) + "), found " +
                 std::to_string(c.mamba_heads));
    c.mamba_head_dim = inner / c.mamba_heads;
  } else {
    c.mamba_head_dim = positive(j, "mamba_d_head", j.require_int("mamba_d_head"));
  }
  if (c.mamba_head_dim * c.mamba_heads != inner)
    refuse(j, "mamba_d_head",
           "mamba_d_head (" + std::to_string(c.mamba_head_dim) + ") x mamba_n_heads (" +
               std::to_string(c.mamba_heads) + ") must equal mamba_expand x hidden_size (" +
               std::to_string(inner) + ")");
  if (c.mamba_heads % c.mamba_groups != 0)
    refuse(j, "mamba_n_groups",
           "must divide mamba_n_heads (" + std::to_string(c.mamba_heads) + "), found " +
               std::to_string(c.mamba_groups));
  std::tie(c.time_step_min, c.time_step_max) = blocks::time_step_limit(j);
  if (auto pad = j.optional_int("pad_token_id"); pad && *pad >= 0 && *pad < c.vocab_size)
    c.pad_token_id = *pad;
  return c;
}

}  // namespace peftfw::granite
