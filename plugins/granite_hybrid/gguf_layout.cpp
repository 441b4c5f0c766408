// GGUF layout of Granite 4.0-H for llama.cpp's "granitehybrid" architecture,
// as llama.cpp's convert_hf_to_gguf.py (GraniteHybridModel) writes it: the
// hyperparameter keys its loader reads, tensor names, and the layout changes
// (A stored as -exp(A_log) [H,1], D as [H,1], conv1d weight squeezed to
// [C,K], the gated-norm weight as [G, Im/G], merged gate/up projections split,
// q/k rows permuted into ggml's RoPE order).
#include <torch/torch.h>

#include <cmath>

#include "config.hpp"
#include "gguf_layout.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"

namespace peftfw::granite {
namespace {

using Hf = std::function<torch::Tensor(const std::string&)>;

GgufValue u32(const std::string& key, int64_t v) {
  GgufValue g;
  g.key = key, g.type = GgufValue::Type::u32, g.number = static_cast<double>(v);
  return g;
}
GgufValue f32(const std::string& key, double v) {
  GgufValue g;
  g.key = key, g.type = GgufValue::Type::f32, g.number = v;
  return g;
}
GgufValue boolean(const std::string& key, bool v) {
  GgufValue g;
  g.key = key, g.type = GgufValue::Type::boolean, g.number = v ? 1 : 0;
  return g;
}

// ggml's RoPE pairs rotate (i, i + d/2) as adjacent rows: per head, rows are
// reordered [2, d/2] -> [d/2, 2] (the converter's LlamaModel.permute).
torch::Tensor rope_permute(const torch::Tensor& w, int64_t heads) {
  const int64_t rows = w.size(0);
  return w.reshape({heads, 2, rows / heads / 2, w.size(1)}).transpose(1, 2).reshape(w.sizes());
}

}  // namespace

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

  GgufLayout L;
  L.arch = any_ssm ? "granitehybrid" : (moe ? "granitemoe" : "granite");
  const std::string a = L.arch + ".";
  auto& m = L.metadata;
  const int64_t n_ff = moe ? c.intermediate_size : c.shared_intermediate_size;
  m.push_back(u32(a + "vocab_size", c.vocab_size));
  // Without RoPE the converter writes 2^20: position is unbounded for llama.cpp.
  m.push_back(u32(a + "context_length", c.use_rope ? json.get_int("max_position_embeddings", 4096) : (1 << 20)));
  m.push_back(u32(a + "embedding_length", c.hidden_size));
  m.push_back(u32(a + "block_count", c.num_layers));
  m.push_back(u32(a + "feed_forward_length", n_ff));
  m.push_back(u32(a + "attention.head_count", c.num_heads));
  GgufValue kv;
  kv.key = a + "attention.head_count_kv", kv.type = GgufValue::Type::i32_array;
  for (auto k : c.layer_kinds) kv.integers.push_back(k == LayerKind::Attention ? static_cast<int32_t>(c.num_kv_heads) : 0);
  m.push_back(kv);
  m.push_back(f32(a + "rope.freq_base", c.rope_theta));
  m.push_back(f32(a + "attention.layer_norm_rms_epsilon", c.rms_norm_eps));
  m.push_back(u32(a + "expert_count", c.num_experts));
  m.push_back(u32(a + "expert_used_count", c.experts_per_token));
  m.push_back(u32(a + "rope.dimension_count", c.head_dim));
  m.push_back(f32(a + "attention.scale", c.attention_multiplier));
  m.push_back(f32(a + "embedding_scale", c.embedding_multiplier));
  m.push_back(f32(a + "residual_scale", c.residual_multiplier));
  m.push_back(f32(a + "logit_scale", c.logits_scaling));
  if (c.shared_intermediate_size > 0) m.push_back(u32(a + "expert_shared_feed_forward_length", c.shared_intermediate_size));
  if (any_ssm) {
    m.push_back(u32(a + "ssm.conv_kernel", c.mamba_conv_kernel));
    m.push_back(u32(a + "ssm.state_size", c.mamba_state));
    m.push_back(u32(a + "ssm.group_count", c.mamba_groups));
    m.push_back(u32(a + "ssm.inner_size", c.mamba_inner()));
    m.push_back(u32(a + "ssm.time_step_rank", c.mamba_heads));
  }
  // Granite reuses this flag as "apply RoPE".
  m.push_back(boolean(a + "rope.scaling.finetuned", c.use_rope));

  auto& T = L.tensors;
  auto same = [&](const std::string& gguf, const std::string& hf, std::vector<int64_t> shape, bool f32 = false) {
    T.push_back({gguf, std::move(shape), f32, [hf](const Hf& get) { return get(hf); }});
  };
  const int64_t H = c.hidden_size, V = c.vocab_size;
  same("token_embd.weight", "model.embed_tokens.weight", {V, H});
  same("output_norm.weight", "model.norm.weight", {H}, true);
  if (!c.tie_word_embeddings) same("output.weight", "lm_head.weight", {V, H});

  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string b = "blk." + std::to_string(i) + ".", p = "model.layers." + std::to_string(i) + ".";
    same(b + "attn_norm.weight", p + "input_layernorm.weight", {H}, true);
    same(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", {H}, true);
    if (c.layer_kinds[static_cast<size_t>(i)] == LayerKind::Mamba) {
      const int64_t nh = c.mamba_heads, G = c.mamba_groups, Im = c.mamba_inner();
      same(b + "ssm_in.weight", p + "mamba.in_proj.weight", {c.in_proj_out(), H});
      T.push_back({b + "ssm_conv1d.weight", {c.conv_dim(), c.mamba_conv_kernel}, true,
                   [p](const Hf& get) { return get(p + "mamba.conv1d.weight").squeeze(1); }});
      if (c.mamba_conv_bias) same(b + "ssm_conv1d.bias", p + "mamba.conv1d.bias", {c.conv_dim()}, true);
      same(b + "ssm_dt.bias", p + "mamba.dt_bias", {nh}, true);
      T.push_back({b + "ssm_a", {nh, 1}, true,
                   [p](const Hf& get) { return (-torch::exp(get(p + "mamba.A_log"))).unsqueeze(1); }});
      T.push_back({b + "ssm_d", {nh, 1}, true, [p](const Hf& get) { return get(p + "mamba.D").unsqueeze(1); }});
      T.push_back({b + "ssm_norm.weight", {G, Im / G}, true,
                   [p, G](const Hf& get) { return get(p + "mamba.norm.weight").reshape({G, -1}); }});
      same(b + "ssm_out.weight", p + "mamba.out_proj.weight", {H, Im});
    } else {
      const int64_t hd = c.head_dim, nq = c.num_heads, nkv = c.num_kv_heads;
      T.push_back({b + "attn_q.weight", {nq * hd, H}, false,
                   [p, nq](const Hf& get) { return rope_permute(get(p + "self_attn.q_proj.weight"), nq); }});
      T.push_back({b + "attn_k.weight", {nkv * hd, H}, false,
                   [p, nkv](const Hf& get) { return rope_permute(get(p + "self_attn.k_proj.weight"), nkv); }});
      same(b + "attn_v.weight", p + "self_attn.v_proj.weight", {nkv * hd, H});
      same(b + "attn_output.weight", p + "self_attn.o_proj.weight", {H, nq * hd});
      if (c.attention_bias) {
        T.push_back({b + "attn_q.bias", {nq * hd}, true, [p, nq](const Hf& get) {
                       return rope_permute(get(p + "self_attn.q_proj.bias").unsqueeze(1), nq).squeeze(1); }});
        T.push_back({b + "attn_k.bias", {nkv * hd}, true, [p, nkv](const Hf& get) {
                       return rope_permute(get(p + "self_attn.k_proj.bias").unsqueeze(1), nkv).squeeze(1); }});
        same(b + "attn_v.bias", p + "self_attn.v_proj.bias", {nkv * hd}, true);
        same(b + "attn_output.bias", p + "self_attn.o_proj.bias", {H}, true);
      }
    }
    // Feed-forward: the shared MLP's merged [2F, H] input_linear splits into gate (first half) and up.
    const int64_t Fs = c.shared_intermediate_size;
    auto half = [](const std::string& name, int64_t which) {
      return [name, which](const Hf& get) {
        auto w = get(name);
        return w.narrow(-2, which * (w.size(-2) / 2), w.size(-2) / 2);
      };
    };
    const std::string sh = moe ? "_shexp" : "";
    if (Fs > 0) {
      T.push_back({b + "ffn_gate" + sh + ".weight", {Fs, H}, false, half(p + "shared_mlp.input_linear.weight", 0)});
      T.push_back({b + "ffn_up" + sh + ".weight", {Fs, H}, false, half(p + "shared_mlp.input_linear.weight", 1)});
      same(b + "ffn_down" + sh + ".weight", p + "shared_mlp.output_linear.weight", {H, Fs});
    }
    if (moe) {
      const int64_t E = c.num_experts, F = c.intermediate_size;
      same(b + "ffn_gate_inp.weight", p + "block_sparse_moe.router.layer.weight", {E, H}, true);
      T.push_back({b + "ffn_gate_exps.weight", {E, F, H}, false, half(p + "block_sparse_moe.input_linear.weight", 0)});
      T.push_back({b + "ffn_up_exps.weight", {E, F, H}, false, half(p + "block_sparse_moe.input_linear.weight", 1)});
      same(b + "ffn_down_exps.weight", p + "block_sparse_moe.output_linear.weight", {E, H, F});
    }
  }
  return L;
}

}  // namespace peftfw::granite
