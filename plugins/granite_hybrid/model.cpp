// GraniteMoeHybrid modules other than the Mamba mixer, and the top-level
// forward (embedding, masks, RoPE tables, layers, head, loss).
#include "model.hpp"

#include "peftfw/kernels/mamba2.hpp"
#include "peftfw/nn/checkpoint.hpp"


namespace peftfw::granite {

namespace F = torch::nn::functional;

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", torch::ones({dim}));
}

// weight * (x * rsqrt(mean(x^2) + eps)) in float32, rounded to x's dtype before
// the weight (transformers' RMSNorm): the gated norm without a gate, so CUDA
// tensors get its fused kernel.
torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  return kernels::mamba2::gated_rms_norm(x, torch::Tensor(), weight, eps);
}

WeightsImpl::WeightsImpl(std::vector<int64_t> weight_shape, std::vector<int64_t> bias_shape) {
  weight = register_parameter("weight", torch::ones(weight_shape));
  if (!bias_shape.empty()) bias = register_parameter("bias", torch::zeros(bias_shape));
}

// ---------------------------------------------------------------- attention

AttentionImpl::AttentionImpl(const GraniteConfig& c) : c_(c) {
  const int64_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  q_proj = register_module("q_proj", nn::Linear(c.hidden_size, q, c.attention_bias));
  k_proj = register_module("k_proj", nn::Linear(c.hidden_size, kv, c.attention_bias));
  v_proj = register_module("v_proj", nn::Linear(c.hidden_size, kv, c.attention_bias));
  o_proj = register_module("o_proj", nn::Linear(q, c.hidden_size, c.attention_bias));
}

namespace {
torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}
}  // namespace

torch::Tensor AttentionImpl::forward(const torch::Tensor& h, const ForwardContext& ctx,
                                     LayerCache* cache) {
  const int64_t B = h.size(0), T = h.size(1), hd = c_.head_dim;
  auto q = q_proj(h).view({B, T, c_.num_heads, hd}).transpose(1, 2);
  auto k = k_proj(h).view({B, T, c_.num_kv_heads, hd}).transpose(1, 2);
  auto v = v_proj(h).view({B, T, c_.num_kv_heads, hd}).transpose(1, 2);
  if (ctx.cos.defined()) {
    auto cos = ctx.cos.unsqueeze(1), sin = ctx.sin.unsqueeze(1);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
  }
  if (cache) {
    if (cache->k.defined()) {
      k = torch::cat({cache->k, k}, 2);
      v = torch::cat({cache->v, v}, 2);
    }
    cache->k = k;
    cache->v = v;
  }
  const int64_t rep = c_.num_heads / c_.num_kv_heads;  // query head h uses kv head h / rep
  if (rep > 1) {
    k = k.repeat_interleave(rep, 1);
    v = v.repeat_interleave(rep, 1);
  }
  std::optional<torch::Tensor> mask;
  if (ctx.attn_bias.defined()) mask = ctx.attn_bias;
  const bool causal = !mask && T > 1;
  auto o = at::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, c_.attention_multiplier);
  // A query that sees no key (left padding) gets a zero output, as torch's SDPA gives
  // transformers; it matters because the last pad position predicts the first real token.
  if (ctx.attn_rows.defined()) o = o * ctx.attn_rows;
  return o_proj(o.transpose(1, 2).reshape({B, T, c_.num_heads * hd}));
}

// ---------------------------------------------------------------- MLPs

SharedMlpImpl::SharedMlpImpl(const GraniteConfig& c) {
  input_linear = register_module(
      "input_linear", nn::Linear(c.hidden_size, 2 * c.shared_intermediate_size, false));
  output_linear = register_module(
      "output_linear", nn::Linear(c.shared_intermediate_size, c.hidden_size, false));
}

torch::Tensor SharedMlpImpl::forward(const torch::Tensor& h) {
  // silu(gate) * up, the first half of input_linear's output being the gate.
  return output_linear(kernels::mamba2::silu_mul(input_linear(h)));
}

RouterImpl::RouterImpl(const GraniteConfig& c) {
  layer = register_module("layer", nn::Linear(c.hidden_size, c.num_experts, false));
}

MoeImpl::MoeImpl(const GraniteConfig& c) : c_(c) {
  router = register_module("router", Router(c));
  input_linear = register_module(
      "input_linear",
      Weights(std::vector<int64_t>{c.num_experts, 2 * c.intermediate_size, c.hidden_size}));
  output_linear = register_module(
      "output_linear",
      Weights(std::vector<int64_t>{c.num_experts, c.hidden_size, c.intermediate_size}));
}

torch::Tensor MoeImpl::forward(const torch::Tensor& h) {
  const auto sizes = h.sizes().vec();
  auto x = h.reshape({-1, c_.hidden_size});
  // Top-k on raw router logits (float32), softmax over the k selected only.
  auto logits = router->layer(x).to(torch::kFloat32);
  auto top = logits.topk(c_.experts_per_token, -1);
  auto top_w = torch::softmax(std::get<0>(top), -1).to(x.scalar_type());
  auto top_i = std::get<1>(top);
  auto out = torch::zeros_like(x);
  for (int64_t e = 0; e < c_.num_experts; ++e) {
    auto hit = top_i.eq(e).nonzero();  // [n,2]: (token, slot)
    if (hit.size(0) == 0) continue;
    auto tok = hit.select(1, 0), slot = hit.select(1, 1);
    auto gu = F::linear(x.index_select(0, tok), input_linear->weight[e]).chunk(2, -1);
    auto y = F::linear(F::silu(gu[0]) * gu[1], output_linear->weight[e]);
    y = y * top_w.index({tok, slot}).unsqueeze(-1);
    out = out.index_add(0, tok, y.to(out.scalar_type()));
  }
  return out.view(sizes);
}

// ---------------------------------------------------------------- layers

DecoderLayerImpl::DecoderLayerImpl(const GraniteConfig& c, int64_t index)
    : kind(c.layer_kinds[index]), c_(c) {
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  if (kind == LayerKind::Mamba) {
    mamba = register_module("mamba", MambaMixer(c));
  } else {
    self_attn = register_module("self_attn", Attention(c));
  }
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  if (c.num_experts > 0) block_sparse_moe = register_module("block_sparse_moe", Moe(c));
  shared_mlp = register_module("shared_mlp", SharedMlp(c));
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& h_in, const ForwardContext& ctx,
                                        LayerCache* cache, bool decode_step) {
  auto x = input_layernorm(h_in);
  x = kind == LayerKind::Mamba ? mamba->forward(x, ctx, cache, decode_step)
                               : self_attn->forward(x, ctx, cache);
  // h + m * x in one kernel (transformers rounds m * x to the model dtype first).
  auto h = torch::add(h_in, x, c_.residual_multiplier);
  x = post_attention_layernorm(h);
  x = block_sparse_moe ? block_sparse_moe->forward(x) + shared_mlp(x) : shared_mlp(x);
  return torch::add(h, x, c_.residual_multiplier);
}

GraniteBackboneImpl::GraniteBackboneImpl(const GraniteConfig& c) {
  embed_tokens = register_module("embed_tokens",
                                 Weights(std::vector<int64_t>{c.vocab_size, c.hidden_size}));
  for (int64_t i = 0; i < c.num_layers; ++i) layers->push_back(DecoderLayer(c, i));
  register_module("layers", layers);
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
}

// ---------------------------------------------------------------- top level

GraniteForCausalLM::GraniteForCausalLM(GraniteConfig config, ModelInventory inventory)
    : config_(std::move(config)), inventory_(std::move(inventory)) {
  model = register_module("model", GraniteBackbone(config_));
  if (!config_.tie_word_embeddings)
    lm_head = register_module("lm_head", nn::Linear(config_.hidden_size, config_.vocab_size, false));
}

std::unique_ptr<GenerationCache> GraniteForCausalLM::make_cache(int64_t batch_size) {
  auto cache = std::make_unique<GraniteCache>();
  cache->layers.resize(static_cast<size_t>(config_.num_layers));
  (void)batch_size;  // states are shaped by the prefill
  return cache;
}

namespace {

// Position of each token within its own sequence (restarts where the id changes).
torch::Tensor positions_in_sequence(const torch::Tensor& seq_ids) {
  const int64_t T = seq_ids.size(1);
  auto t = torch::arange(T, seq_ids.options()).unsqueeze(0).expand_as(seq_ids);
  auto boundary = torch::ones_like(seq_ids, torch::kBool);
  if (T > 1) boundary.narrow(1, 1, T - 1).copy_(seq_ids.narrow(1, 1, T - 1).ne(seq_ids.narrow(1, 0, T - 1)));
  auto start = torch::where(boundary, t, torch::zeros_like(t));
  return t - std::get<0>(start.cummax(1));
}

}  // namespace

ModelOutput GraniteForCausalLM::forward(const ModelBatch& batch, GenerationCache* gen_cache) {
  auto* cache = gen_cache ? dynamic_cast<GraniteCache*>(gen_cache) : nullptr;
  TORCH_CHECK(!gen_cache || cache, "granite_hybrid: cache was made by another model");
  const auto& ids = batch.input_ids;
  TORCH_CHECK(ids.dim() == 2, "input_ids must be [batch, time], got ", ids.sizes());
  const int64_t B = ids.size(0), T = ids.size(1);
  const int64_t past = cache ? cache->seen : 0;
  TORCH_CHECK(past == 0 || T == 1,
              "granite_hybrid: after the prefill, decoding takes one token per step (got ", T, ")");
  TORCH_CHECK(!(cache && batch.seq_ids.defined()), "packed sequences cannot be used with a cache");
  const bool decode_step = cache && past > 0;
  const auto& embed = model->embed_tokens->weight;
  const auto opts = embed.options();

  auto emb_opts = F::EmbeddingFuncOptions();
  if (config_.pad_token_id >= 0) emb_opts.padding_idx(config_.pad_token_id);
  auto h = F::embedding(ids, embed, emb_opts) * config_.embedding_multiplier;

  ForwardContext ctx;
  ctx.seq_ids = batch.seq_ids;
  torch::Tensor mask = batch.attention_mask.defined() ? batch.attention_mask.to(torch::kLong)
                                                      : torch::Tensor();
  const bool padded = mask.defined() && !mask.eq(1).all().item<bool>();
  // transformers (5.x) masks padding inside the mixer whenever T > 1 and some token is padding.
  if (padded && T > 1) ctx.mamba_mask = mask.to(opts.dtype());

  // Attention: causal + key padding + same-sequence, as an additive bias.
  torch::Tensor key_mask = mask.defined() ? mask : torch::ones({B, T}, ids.options());
  if (cache) {
    key_mask = cache->mask_history.defined() ? torch::cat({cache->mask_history, key_mask}, 1) : key_mask;
    cache->mask_history = key_mask;
  }
  const bool key_padding = !key_mask.eq(1).all().item<bool>();
  if (key_padding || batch.seq_ids.defined()) {
    const int64_t S = key_mask.size(1);
    auto q_pos = torch::arange(past, past + T, ids.options()).view({1, T, 1});
    auto k_pos = torch::arange(S, ids.options()).view({1, 1, S});
    auto allowed = k_pos.le(q_pos) & key_mask.view({B, 1, S}).eq(1);
    if (batch.seq_ids.defined()) allowed = allowed & batch.seq_ids.unsqueeze(2).eq(batch.seq_ids.unsqueeze(1));
    // Large but finite in every dtype (bf16 cannot hold float's lowest; fp16 tops out at 65504).
    const double lowest = opts.dtype() == torch::kFloat16 ? -65504.0 : -1e38;
    ctx.attn_bias = torch::zeros({B, 1, T, S}, opts).masked_fill(allowed.logical_not().unsqueeze(1), lowest);
    ctx.attn_rows = allowed.any(-1).to(opts.dtype()).view({B, 1, T, 1});
  }

  if (config_.use_rope) {
    auto pos = batch.seq_ids.defined()
                   ? positions_in_sequence(batch.seq_ids)
                   : torch::arange(past, past + T, ids.options()).unsqueeze(0).expand({B, T});
    const int64_t hd = config_.head_dim;
    auto idx = torch::arange(0, hd, 2, torch::TensorOptions().dtype(torch::kLong).device(ids.device()))
                   .to(torch::kFloat32);
    auto inv_freq = 1.0 / torch::pow(config_.rope_theta, idx / static_cast<double>(hd));
    auto freqs = pos.to(torch::kFloat32).unsqueeze(-1) * inv_freq;  // [B,T,hd/2]
    auto emb = torch::cat({freqs, freqs}, -1);
    ctx.cos = emb.cos().to(opts.dtype());
    ctx.sin = emb.sin().to(opts.dtype());
  }

  const bool use_checkpoint = checkpointing_ && is_training() && !cache && torch::GradMode::is_enabled();
  for (size_t i = 0; i < model->layers->size(); ++i) {
    auto layer = model->layers->ptr<DecoderLayerImpl>(i);
    if (use_checkpoint) {
      h = nn::checkpoint([layer, ctx](const torch::Tensor& x) { return layer->forward(x, ctx, nullptr, false); }, h);
    } else {
      h = layer->forward(h, ctx, cache ? &cache->layers[i] : nullptr, decode_step);
    }
  }
  h = model->norm(h);
  if (cache) cache->seen += T;
  ModelOutput out;
  if (batch.labels.defined() && !batch.want_logits && !(lm_head && lm_head->adapter())) {
    // Loss only: never materialise [B,T,V] logits.
    out.loss = causal_lm_loss_from_hidden(h, lm_head ? lm_head->weight : embed, config_.logits_scaling,
                                          batch.labels);
    return out;
  }
  auto logits = lm_head ? lm_head(h) : F::linear(h, embed);
  logits = logits / config_.logits_scaling;
  out.logits = logits;
  if (batch.labels.defined()) out.loss = causal_lm_loss(logits, batch.labels);
  return out;
}

void GraniteForCausalLM::init_random(uint64_t seed, double std) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(seed);
  for (auto& p : named_parameters()) {
    const auto& name = p.key();
    auto& t = p.value();
    auto ends_with = [&](const std::string& s) {
      return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
    };
    if (ends_with("layernorm.weight") || ends_with("norm.weight") || ends_with(".D")) {
      t.fill_(1.0);
    } else if (ends_with(".bias")) {
      t.zero_();
    } else if (ends_with(".A_log")) {
      t.copy_(torch::log(torch::arange(1, t.size(0) + 1, t.options())));
    } else if (ends_with(".dt_bias")) {
      // dt log-uniform in [1e-3, 1e-1], stored as its inverse softplus (Mamba's init).
      auto dt = torch::exp(torch::rand_like(t) * (std::log(0.1) - std::log(1e-3)) + std::log(1e-3));
      t.copy_(dt + torch::log(-torch::expm1(-dt)));
    } else {
      t.normal_(0.0, std);
    }
  }
}

}  // namespace peftfw::granite
