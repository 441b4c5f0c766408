// Role-driven GGUF tensor layout; see gguf.hpp.
#include "peftfw/blocks/gguf.hpp"

#include <torch/torch.h>

#include <map>

#include "peftfw/error.hpp"

namespace peftfw::blocks {

namespace {

using Hf = std::function<torch::Tensor(const std::string&)>;

// ggml's RoPE rotates adjacent pairs; transformers rotates (i, i + d/2). Per head, the first
// `rotary` rows are reordered [2, d/2] -> [d/2, 2] (the converter's LlamaModel.permute); the
// rest of the head (partial RoPE) stays.
torch::Tensor rope_permute(const torch::Tensor& w, int64_t head_dim, int64_t rotary) {
  const bool vector = w.dim() == 1;
  auto m = vector ? w.unsqueeze(1) : w;
  const int64_t heads = m.size(0) / head_dim, cols = m.size(1);
  auto h = m.reshape({heads, head_dim, cols});
  auto rot = h.narrow(1, 0, rotary).reshape({heads, 2, rotary / 2, cols}).transpose(1, 2).reshape({heads, rotary, cols});
  auto out = torch::cat({rot, h.narrow(1, rotary, head_dim - rotary)}, 1).reshape(m.sizes());
  return vector ? out.squeeze(1) : out;
}

std::function<torch::Tensor(const Hf&)> half(const std::string& name, int64_t which) {
  return [name, which](const Hf& get) {
    auto w = get(name);
    return w.narrow(-2, which * (w.size(-2) / 2), w.size(-2) / 2);
  };
}

std::vector<int64_t> halved(std::vector<int64_t> shape) {
  shape[shape.size() - 2] /= 2;
  return shape;
}

}  // namespace

GgufBuilder::GgufBuilder(std::string arch) { layout_.arch = std::move(arch); }

void GgufBuilder::u32(const std::string& key, int64_t value) {
  GgufValue g;
  g.key = layout_.arch + "." + key, g.type = GgufValue::Type::u32, g.number = static_cast<double>(value);
  layout_.metadata.push_back(g);
}
void GgufBuilder::f32(const std::string& key, double value) {
  GgufValue g;
  g.key = layout_.arch + "." + key, g.type = GgufValue::Type::f32, g.number = value;
  layout_.metadata.push_back(g);
}
void GgufBuilder::boolean(const std::string& key, bool value) {
  GgufValue g;
  g.key = layout_.arch + "." + key, g.type = GgufValue::Type::boolean, g.number = value ? 1 : 0;
  layout_.metadata.push_back(g);
}
void GgufBuilder::i32_array(const std::string& key, std::vector<int32_t> values) {
  GgufValue g;
  g.key = layout_.arch + "." + key, g.type = GgufValue::Type::i32_array, g.integers = std::move(values);
  layout_.metadata.push_back(g);
}

void GgufBuilder::tensors(const ModelInventory& inv, const GgufNames& names) {
  std::map<std::string, const ModuleDesc*> modules;
  for (const auto& m : inv.modules) modules[m.name] = &m;
  // Layers holding a MoE: their MLP is the shared expert.
  std::map<int, bool> has_moe;
  for (const auto& m : inv.modules)
    if (m.role.rfind("moe.", 0) == 0) has_moe[m.layer] = true;

  auto& T = layout_.tensors;
  auto same = [&](const std::string& gguf, const ParamDesc& p, bool f32) {
    const std::string hf = p.name;
    T.push_back({gguf, p.shape, f32, [hf](const Hf& get) { return get(hf); }});
  };
  std::vector<const ParamDesc*> all;
  for (const auto& p : inv.params) all.push_back(&p);
  for (const auto& p : inv.buffers) all.push_back(&p);
  for (const auto* pp : all) {
    const auto& p = *pp;
    const auto leaf = p.name.substr(p.name.rfind('.') + 1);  // "weight", "bias", "A_log", ...
    const std::string b = p.layer >= 0 ? "blk." + std::to_string(p.layer) + "." : "";
    const std::string hf = p.name;
    if (p.ssm_group == "A_log") {
      if (names.ssm_columns)
        T.push_back({b + "ssm_a", {p.shape[0], 1}, true,
                     [hf](const Hf& get) { return (-torch::exp(get(hf))).unsqueeze(1); }});
      else
        T.push_back({b + "ssm_a", p.shape, true, [hf](const Hf& get) { return -torch::exp(get(hf)); }});
      continue;
    }
    if (p.ssm_group == "D") {
      if (names.ssm_columns)
        T.push_back({b + "ssm_d", {p.shape[0], 1}, true, [hf](const Hf& get) { return get(hf).unsqueeze(1); }});
      else
        same(b + "ssm_d", p, true);
      continue;
    }
    if (p.ssm_group == "dt_bias") {
      same(b + "ssm_dt.bias", p, true);
      continue;
    }
    auto it = modules.find(p.module);
    if (it == modules.end())
      throw InputError("GGUF export: no llama.cpp tensor for " + p.name + " (no module role)");
    const auto& role = it->second->role;
    const std::string sfx = has_moe[p.layer] ? names.shared_expert_suffix : "";
    if (role == "embedding") {
      same("token_embd.weight", p, false);
    } else if (role == "norm.final") {
      same("output_norm.weight", p, true);
    } else if (role == "lm_head") {
      same("output.weight", p, false);
    } else if (role == "norm.input") {
      same(b + "attn_norm.weight", p, true);
    } else if (role == "norm.post" || role == "norm.ff") {
      same(b + "ffn_norm.weight", p, true);
    } else if (role == "mamba.in_proj") {
      same(b + "ssm_in." + leaf, p, false);
    } else if (role == "mamba.conv1d") {
      if (leaf == "weight") {
        T.push_back({b + "ssm_conv1d.weight", {p.shape[0], p.shape[2]}, true,
                     [hf](const Hf& get) { return get(hf).squeeze(1); }});
      } else {
        same(b + "ssm_conv1d.bias", p, true);
      }
    } else if (role == "mamba.norm") {
      const int64_t G = names.ssm_groups;
      T.push_back({b + "ssm_norm.weight", {G, p.shape[0] / G}, true,
                   [hf, G](const Hf& get) { return get(hf).reshape({G, -1}); }});
    } else if (role == "mamba.out_proj") {
      same(b + "ssm_out." + leaf, p, false);
    } else if (role == "mamba.x_proj") {
      same(b + "ssm_x." + leaf, p, false);
    } else if (role == "mamba.dt_proj") {  // its bias is the dt_bias group, above
      same(b + "ssm_dt." + leaf, p, false);
    } else if (role == "mamba.dt_norm" || role == "mamba.b_norm" || role == "mamba.c_norm") {
      same(b + "ssm_" + role.substr(6) + ".weight", p, true);
    } else if (role == "attention.q" || role == "attention.k") {
      const std::string g = b + (role == "attention.q" ? "attn_q." : "attn_k.") + leaf;
      if (names.rotary_dim > 0) {
        const int64_t hd = names.head_dim, rd = names.rotary_dim;
        T.push_back({g, p.shape, leaf == "bias",
                     [hf, hd, rd](const Hf& get) { return rope_permute(get(hf), hd, rd); }});
      } else {
        same(g, p, leaf == "bias");
      }
    } else if (role == "attention.v") {
      same(b + "attn_v." + leaf, p, leaf == "bias");
    } else if (role == "attention.o") {
      same(b + "attn_output." + leaf, p, leaf == "bias");
    } else if (role == "mlp.input") {
      T.push_back({b + "ffn_gate" + sfx + "." + leaf, halved(p.shape), false, half(hf, 0)});
      T.push_back({b + "ffn_up" + sfx + "." + leaf, halved(p.shape), false, half(hf, 1)});
    } else if (role == "mlp.output" || role == "mlp.down") {
      same(b + "ffn_down" + sfx + "." + leaf, p, false);
    } else if (role == "mlp.gate") {
      same(b + "ffn_gate" + sfx + "." + leaf, p, false);
    } else if (role == "mlp.up") {
      same(b + "ffn_up" + sfx + "." + leaf, p, false);
    } else if (role == "moe.router") {
      same(b + (leaf == "e_score_correction_bias" ? "exp_probs_b.bias" : "ffn_gate_inp.weight"), p, true);
    } else if (role == "moe.experts" && leaf == "gate_up_proj") {  // [E, 2F, H]: gate rows, then up
      T.push_back({b + "ffn_gate_exps.weight", halved(p.shape), false, half(hf, 0)});
      T.push_back({b + "ffn_up_exps.weight", halved(p.shape), false, half(hf, 1)});
    } else if (role == "moe.experts") {  // plain experts: up_proj [E,F,in], down_proj [E,in,F]
      same(b + (leaf == "up_proj" ? "ffn_up_exps.weight" : "ffn_down_exps.weight"), p, false);
    } else if (role == "moe.latent_in") {
      same(b + "ffn_latent_down." + leaf, p, false);
    } else if (role == "moe.latent_out") {
      same(b + "ffn_latent_up." + leaf, p, false);
    } else if (role == "moe.experts.input") {
      T.push_back({b + "ffn_gate_exps.weight", halved(p.shape), false, half(hf, 0)});
      T.push_back({b + "ffn_up_exps.weight", halved(p.shape), false, half(hf, 1)});
    } else if (role == "moe.experts.output") {
      same(b + "ffn_down_exps.weight", p, false);
    } else {
      throw InputError("GGUF export: llama.cpp has no tensor for " + p.name + " (role " + role + ")");
    }
  }
}

}  // namespace peftfw::blocks
