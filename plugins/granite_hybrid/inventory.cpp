// The GraniteMoeHybrid module inventory, derived from the config alone.
// Names are the checkpoint's keys; roles and layer kinds drive target
// resolution and coverage tables.
#include "inventory.hpp"

namespace peftfw::granite {

namespace {

struct Builder {
  ModelInventory inv;

  void linear(const std::string& name, const std::string& kind, int layer, const std::string& role,
              int64_t in, int64_t out, bool bias) {
    ModuleDesc m;
    m.name = name;
    m.type = "linear";
    m.layer_kind = kind;
    m.role = role;
    m.layer = layer;
    m.in_features = in;
    m.out_features = out;
    m.has_bias = bias;
    m.adaptable = true;
    inv.modules.push_back(m);
    param(name + ".weight", {out, in}, name, kind, layer);
    if (bias) param(name + ".bias", {out}, name, kind, layer);
  }

  void module(const std::string& name, const std::string& type, const std::string& kind, int layer,
              const std::string& role, const std::string& why_not) {
    ModuleDesc m;
    m.name = name;
    m.type = type;
    m.layer_kind = kind;
    m.role = role;
    m.layer = layer;
    m.adaptable = false;
    m.not_adaptable_why = why_not;
    inv.modules.push_back(m);
  }

  void param(const std::string& name, std::vector<int64_t> shape, const std::string& module,
             const std::string& kind, int layer, const std::string& group = "") {
    ParamDesc p;
    p.name = name;
    p.shape = std::move(shape);
    p.module = module;
    p.layer_kind = kind;
    p.layer = layer;
    p.ssm_group = group;
    inv.params.push_back(p);
  }

  void norm(const std::string& name, int64_t dim, const std::string& kind, int layer,
            const std::string& role) {
    module(name, "norm", kind, layer, role, "norm weights are vectors; train them with method \"full\"");
    param(name + ".weight", {dim}, name, kind, layer);
  }
};

const char* kConvWhy =
    "depthwise conv1d (groups = channels): LoRA would need r divisible by the channel count, and "
    "fused Mamba kernels read its weight directly; train it fully with [ssm] train = [\"conv1d\"]";
const char* kExpertsWhy =
    "3D expert weights [experts, out, in] are not nn.Linear modules; PEFT adapts them through "
    "target_parameters, which peftfw does not support yet";

}  // namespace

ModelInventory describe_granite(const GraniteConfig& c) {
  Builder b;
  auto& inv = b.inv;
  inv.architecture = "granite_hybrid";
  inv.model_type = "granitemoehybrid";
  inv.vocab_size = c.vocab_size;
  const int64_t H = c.hidden_size;

  b.module("model.embed_tokens", "embedding", "", -1, "embedding",
           "embedding adapters are not supported yet");
  b.param("model.embed_tokens.weight", {c.vocab_size, H}, "model.embed_tokens", "", -1);

  for (int i = 0; i < c.num_layers; ++i) {
    const auto kind = std::string(layer_kind_name(c.layer_kinds[i]));
    inv.layer_kinds.push_back(kind);
    const auto p = "model.layers." + std::to_string(i) + ".";
    b.norm(p + "input_layernorm", H, kind, i, "norm.input");
    if (c.layer_kinds[i] == LayerKind::Mamba) {
      const auto m = p + "mamba.";
      b.linear(m + "in_proj", kind, i, "mamba.in_proj", H, c.in_proj_out(), c.mamba_proj_bias);
      b.module(m + "conv1d", "conv1d", kind, i, "mamba.conv1d", kConvWhy);
      b.param(m + "conv1d.weight", {c.conv_dim(), 1, c.mamba_conv_kernel}, m + "conv1d", kind, i,
              "conv1d");
      if (c.mamba_conv_bias) b.param(m + "conv1d.bias", {c.conv_dim()}, m + "conv1d", kind, i, "conv1d");
      b.param(m + "dt_bias", {c.mamba_heads}, p + "mamba", kind, i, "dt_bias");
      b.param(m + "A_log", {c.mamba_heads}, p + "mamba", kind, i, "A_log");
      b.param(m + "D", {c.mamba_heads}, p + "mamba", kind, i, "D");
      b.norm(m + "norm", c.mamba_inner(), kind, i, "mamba.norm");
      b.linear(m + "out_proj", kind, i, "mamba.out_proj", c.mamba_inner(), H, c.mamba_proj_bias);
    } else {
      const auto a = p + "self_attn.";
      const int64_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
      b.linear(a + "q_proj", kind, i, "attention.q", H, q, c.attention_bias);
      b.linear(a + "k_proj", kind, i, "attention.k", H, kv, c.attention_bias);
      b.linear(a + "v_proj", kind, i, "attention.v", H, kv, c.attention_bias);
      b.linear(a + "o_proj", kind, i, "attention.o", q, H, c.attention_bias);
    }
    b.norm(p + "post_attention_layernorm", H, kind, i, "norm.post");
    if (c.num_experts > 0) {
      const auto e = p + "block_sparse_moe.";
      b.linear(e + "router.layer", kind, i, "moe.router", H, c.num_experts, false);
      b.module(e + "input_linear", "experts", kind, i, "moe.experts.input", kExpertsWhy);
      b.param(e + "input_linear.weight", {c.num_experts, 2 * c.intermediate_size, H},
              e + "input_linear", kind, i);
      b.module(e + "output_linear", "experts", kind, i, "moe.experts.output", kExpertsWhy);
      b.param(e + "output_linear.weight", {c.num_experts, H, c.intermediate_size},
              e + "output_linear", kind, i);
    }
    b.linear(p + "shared_mlp.input_linear", kind, i, "mlp.input", H, 2 * c.shared_intermediate_size,
             false);
    b.linear(p + "shared_mlp.output_linear", kind, i, "mlp.output", c.shared_intermediate_size, H,
             false);
  }
  b.norm("model.norm", H, "", -1, "norm.final");
  if (c.tie_word_embeddings) {
    inv.optional_checkpoint_keys.push_back("lm_head.weight");
  } else {
    b.linear("lm_head", "", -1, "lm_head", H, c.vocab_size, false);
  }

  inv.ssm_groups = {
      {"A_log", "per-head log decay rate, A = -exp(A_log) [mamba_n_heads]", false},
      {"D", "per-head skip connection [mamba_n_heads]", false},
      {"dt_bias", "per-head time-step bias before softplus [mamba_n_heads]", false},
      {"conv1d", "depthwise causal conv weights and bias", true},
  };
  return inv;
}

}  // namespace peftfw::granite
