// Attention block: GQA, partial RoPE, biases, KV cache, SDPA with the context's masks.
#include "peftfw/blocks/attention.hpp"

#include <torch/torch.h>

#include <cmath>

namespace peftfw::blocks {

AttentionImpl::AttentionImpl(AttentionOptions o) : o_(o) {
  const int64_t q = o_.num_heads * o_.head_dim, kv = o_.num_kv_heads * o_.head_dim;
  q_proj = add("q_proj", nn::Linear(o_.hidden_size, q, o_.bias), linear("attention.q"));
  k_proj = add("k_proj", nn::Linear(o_.hidden_size, kv, o_.bias), linear("attention.k"));
  v_proj = add("v_proj", nn::Linear(o_.hidden_size, kv, o_.bias), linear("attention.v"));
  o_proj = add("o_proj", nn::Linear(q, o_.hidden_size, o_.bias), linear("attention.o"));
  if (o_.scale == 0) o_.scale = 1.0 / std::sqrt(static_cast<double>(o_.head_dim));
}

namespace {

torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

// RoPE on the first cos.size(-1) channels of each head; the rest pass through.
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t d = cos.size(-1), hd = x.size(-1);
  if (d == hd) return x * cos + rotate_half(x) * sin;
  auto rot = x.narrow(-1, 0, d);
  return torch::cat({rot * cos + rotate_half(rot) * sin, x.narrow(-1, d, hd - d)}, -1);
}

}  // namespace

torch::Tensor AttentionImpl::forward(const torch::Tensor& h, const ForwardContext& ctx,
                                     LayerCache* cache) {
  const int64_t B = h.size(0), T = h.size(1), hd = o_.head_dim;
  auto q = q_proj(h).view({B, T, o_.num_heads, hd}).transpose(1, 2);
  auto k = k_proj(h).view({B, T, o_.num_kv_heads, hd}).transpose(1, 2);
  if (o_.key_multiplier != 1.0) k = k * o_.key_multiplier;
  auto v = v_proj(h).view({B, T, o_.num_kv_heads, hd}).transpose(1, 2);
  if (ctx.cos.defined()) {
    auto cos = ctx.cos.unsqueeze(1), sin = ctx.sin.unsqueeze(1);
    q = apply_rope(q, cos, sin);
    k = apply_rope(k, cos, sin);
  }
  if (cache) {
    if (cache->k.defined()) {
      k = torch::cat({cache->k, k}, 2);
      v = torch::cat({cache->v, v}, 2);
    }
    cache->k = k;
    cache->v = v;
  }
  const int64_t rep = o_.num_heads / o_.num_kv_heads;  // query head h uses kv head h / rep
  if (rep > 1) {
    k = k.repeat_interleave(rep, 1);
    v = v.repeat_interleave(rep, 1);
  }
  std::optional<torch::Tensor> mask;
  if (ctx.attn_bias.defined()) mask = ctx.attn_bias;
  const bool causal = !mask && T > 1;
  auto o = at::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, o_.scale);
  // A query that sees no key (left padding) gets a zero output, as torch's SDPA gives
  // transformers; it matters because the last pad position predicts the first real token.
  if (ctx.attn_rows.defined()) o = o * ctx.attn_rows;
  return o_proj(o.transpose(1, 2).reshape({B, T, o_.num_heads * hd}));
}

}  // namespace peftfw::blocks
