// Decoder layers, the block-built causal LM and its forward (embedding, masks,
// RoPE tables, layers, head, loss).
#include "peftfw/blocks/decoder.hpp"

#include <torch/torch.h>

#include <map>

#include <cmath>

#include "peftfw/nn/checkpoint.hpp"

namespace peftfw::blocks {

namespace F = torch::nn::functional;

// ---------------------------------------------------------------- layers

DecoderLayerImpl::DecoderLayerImpl(int64_t index, LayerOptions options)
    : index_(index), o_(options) {}

void DecoderLayerImpl::add_unit(const std::string& norm_name, const std::string& norm_role,
                                std::vector<Branch> branches) {
  Unit u;
  u.norm = add(norm_name, RMSNorm(o_.hidden_size, o_.norm_eps), norm(norm_role));
  for (auto& b : branches) register_module(b.name, b.block);
  u.branches = std::move(branches);
  units_.push_back(std::move(u));
}

std::vector<std::vector<std::string>> DecoderLayerImpl::parts() const {
  std::vector<std::vector<std::string>> out;
  for (const auto& u : units_) {
    std::vector<std::string> p;
    for (const auto& b : u.branches) p.push_back(b.block->part());
    out.push_back(std::move(p));
  }
  return out;
}

std::string DecoderLayerImpl::kind() const {
  if (!kind_.empty()) return kind_;
  std::string k;
  if (!units_.empty())
    for (const auto& b : units_.front().branches) k += (k.empty() ? "" : "|") + b.block->part();
  return k;
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& h_in, const ForwardContext& ctx,
                                        LayerCache* cache) {
  auto h = h_in;
  for (auto& u : units_) {
    torch::Tensor x, residual = h;
    if (o_.residual_in_fp32) {
      x = u.norm(h.to(u.norm->weight.scalar_type()));
      residual = h.to(torch::kFloat32);
    } else {
      x = u.norm(h);
    }
    torch::Tensor sum;
    for (auto& b : u.branches) {
      auto in = b.input_multiplier == 1.0 ? x : x * b.input_multiplier;
      auto y = b.block->forward(in, ctx, cache);
      if (b.output_multiplier != 1.0) y = y * b.output_multiplier;
      sum = sum.defined() ? sum + y : y;
    }
    // h + m * y in one kernel (transformers rounds m * y to the model dtype first).
    h = torch::add(residual, sum, o_.residual_multiplier);
  }
  return h;
}

// ---------------------------------------------------------------- model

BackboneImpl::BackboneImpl(const LMOptions& o) {
  embedding = add(o.embedding, Weights(std::vector<int64_t>{o.vocab_size, o.hidden_size}),
                  Tag{"embedding", "embedding", "embedding adapters are not supported yet", ""});
  register_module(o.layers, layers);
  final_norm = add(o.final_norm, RMSNorm(o.hidden_size, o.norm_eps), norm("norm.final"));
}

HybridLM::HybridLM(LMOptions options) : o_(std::move(options)) {
  backbone_ = register_module(o_.backbone, std::make_shared<BackboneImpl>(o_));
  if (!o_.tie_word_embeddings)
    lm_head_ = register_module("lm_head", nn::Linear(o_.hidden_size, o_.vocab_size, false));
}

void HybridLM::add_layer(std::shared_ptr<DecoderLayerImpl> layer) {
  backbone_->layers->push_back(std::move(layer));
}

void HybridLM::finish() { inventory_ = derive_inventory(*this); }

std::unique_ptr<GenerationCache> HybridLM::make_cache(int64_t batch_size) {
  auto cache = std::make_unique<HybridCache>();
  cache->layers.resize(backbone_->layers->size());
  (void)batch_size;  // states are shaped by the prefill
  return cache;
}

namespace {

// The Switch Transformer load-balancing loss as transformers' load_balancing_loss_func computes it:
// E * sum_e f_e * P_e, f_e the share of top-k picks that went to e, P_e the mean router probability of
// e, over the rows of every MoE layer together; padding rows (mask 0) do not count.
torch::Tensor load_balancing_loss(const std::vector<RouterRecord>& routers, const torch::Tensor& mask) {
  const int64_t E = routers.front().logits.size(-1);
  auto opts = routers.front().logits.options().dtype(torch::kFloat32);
  auto picks = torch::zeros({E}, opts), probs = torch::zeros({E}, opts), rows = torch::zeros({}, opts);
  for (const auto& r : routers) {
    auto p = torch::softmax(r.logits.to(torch::kFloat32), -1);  // [rows, E]
    auto chosen = torch::one_hot(std::get<1>(p.topk(r.top_k, -1)), E).to(torch::kFloat32).sum(1);  // [rows, E]
    auto w = mask.defined() ? mask.reshape({-1, 1}).to(opts) : torch::ones({p.size(0), 1}, opts);
    picks = picks + (chosen * w).sum(0);
    probs = probs + (p * w).sum(0);
    rows = rows + w.sum();
  }
  return (picks / rows * (probs / rows)).sum() * static_cast<double>(E);
}

}  // namespace

ModelOutput HybridLM::forward(const ModelBatch& batch, GenerationCache* gen_cache) {
  auto* cache = gen_cache ? dynamic_cast<HybridCache*>(gen_cache) : nullptr;
  TORCH_CHECK(!gen_cache || cache, o_.architecture, ": cache was made by another model");
  const auto& ids = batch.input_ids;
  TORCH_CHECK(ids.dim() == 2, "input_ids must be [batch, time], got ", ids.sizes());
  const int64_t B = ids.size(0), T = ids.size(1);
  const int64_t past = cache ? cache->seen : 0;
  TORCH_CHECK(past == 0 || T == 1, o_.architecture,
              ": after the prefill, decoding takes one token per step (got ", T, ")");
  TORCH_CHECK(!(cache && batch.seq_ids.defined()), "packed sequences cannot be used with a cache");
  const auto& embed = backbone_->embedding->weight;
  const auto opts = embed.options();

  auto emb_opts = F::EmbeddingFuncOptions();
  if (o_.padding_idx >= 0) emb_opts.padding_idx(o_.padding_idx);
  auto h = F::embedding(ids, embed, emb_opts);
  if (o_.embedding_multiplier != 1.0) h = h * o_.embedding_multiplier;

  ForwardContext ctx;
  ctx.decode_step = cache && past > 0;
  ctx.seq_ids = batch.seq_ids;
  torch::Tensor mask =
      batch.attention_mask.defined() ? batch.attention_mask.to(torch::kLong) : torch::Tensor();
  const bool padded = mask.defined() && !mask.eq(1).all().item<bool>();
  // transformers (5.x) masks padding inside SSM mixers whenever T > 1 and some token is padding.
  if (padded && T > 1) ctx.ssm_mask = mask.to(opts.dtype());

  // Attention: causal + key padding + same-sequence, as an additive bias.
  torch::Tensor key_mask = mask.defined() ? mask : torch::ones({B, T}, ids.options());
  if (cache) {
    key_mask = cache->mask_history.defined() ? torch::cat({cache->mask_history, key_mask}, 1)
                                             : key_mask;
    cache->mask_history = key_mask;
  }
  const bool key_padding = !key_mask.eq(1).all().item<bool>();
  if (key_padding || batch.seq_ids.defined()) {
    const int64_t S = key_mask.size(1);
    auto q_pos = torch::arange(past, past + T, ids.options()).view({1, T, 1});
    auto k_pos = torch::arange(S, ids.options()).view({1, 1, S});
    auto allowed = k_pos.le(q_pos) & key_mask.view({B, 1, S}).eq(1);
    if (batch.seq_ids.defined())
      allowed = allowed & batch.seq_ids.unsqueeze(2).eq(batch.seq_ids.unsqueeze(1));
    // Large but finite in every dtype (bf16 cannot hold float's lowest; fp16 tops out at 65504).
    const double lowest = opts.dtype() == torch::kFloat16 ? -65504.0 : -1e38;
    ctx.attn_bias = torch::zeros({B, 1, T, S}, opts).masked_fill(allowed.logical_not().unsqueeze(1), lowest);
    ctx.attn_rows = allowed.any(-1).to(opts.dtype()).view({B, 1, T, 1});
  }

  if (o_.rope.rotary_dim > 0) {
    auto pos = batch.seq_ids.defined()
                   ? positions_in_sequence(batch.seq_ids)
                   : torch::arange(past, past + T, ids.options()).unsqueeze(0).expand({B, T});
    std::tie(ctx.cos, ctx.sin) = rope_tables(pos, o_.rope, opts.dtype().toScalarType());
  }

  const bool use_checkpoint =
      checkpointing_ && is_training() && !cache && torch::GradMode::is_enabled();
  // The routers' logits, when the loss includes the load-balancing term.
  std::vector<RouterRecord> routers;
  const bool aux = o_.router_aux_loss_coef != 0.0 && batch.labels.defined();
  if (aux) ctx.router_logits = &routers;
  auto& layers = backbone_->layers;
  for (size_t i = 0; i < layers->size(); ++i) {
    auto layer = layers->ptr<DecoderLayerImpl>(i);
    // A MoE layer whose router logits feed the loss runs without checkpointing (a rerun would
    // report them again).
    bool reports_router = false;
    if (use_checkpoint && aux)
      for (const auto& unit : layer->parts())
        for (const auto& part : unit) reports_router = reports_router || part == "moe";
    if (use_checkpoint && !reports_router) {
      auto plain = ctx;
      plain.router_logits = nullptr;
      h = nn::checkpoint([layer, plain](const torch::Tensor& x) { return layer->forward(x, plain, nullptr); }, h);
    } else {
      h = layer->forward(h, ctx, cache ? &cache->layers[i] : nullptr);
    }
  }
  h = backbone_->final_norm(h);
  if (cache) cache->seen += T;
  const auto& head_weight = lm_head_ ? lm_head_->weight : embed;
  // A float32 residual stream (residual_in_fp32) meets the head in the head's dtype.
  if (h.scalar_type() != head_weight.scalar_type()) h = h.to(head_weight.scalar_type());
  ModelOutput out;
  if (batch.labels.defined() && !batch.want_logits && !(lm_head_ && lm_head_->adapter()) &&
      o_.z_loss == 0.0) {
    // Loss only: never materialise [B,T,V] logits.
    out.loss = causal_lm_loss_from_hidden(h, head_weight, o_.logits_divisor, batch.labels);
    if (!routers.empty()) out.loss = out.loss + o_.router_aux_loss_coef * load_balancing_loss(routers, mask);
    return out;
  }
  auto logits = lm_head_ ? lm_head_(h) : F::linear(h, embed);
  if (o_.logits_divisor != 1.0) logits = logits / o_.logits_divisor;
  out.logits = logits;
  if (batch.labels.defined()) {
    out.loss = causal_lm_loss(logits, batch.labels);
    if (o_.z_loss != 0.0) {
      // Bamba's z-loss: the mean over all positions of logsumexp(logits)^2.
      auto z = logits.to(torch::kFloat32).logsumexp(-1).to(out.loss.scalar_type()).pow(2).mean();
      out.loss = out.loss + o_.z_loss * z;
    }
    if (!routers.empty()) out.loss = out.loss + o_.router_aux_loss_coef * load_balancing_loss(routers, mask);
  }
  return out;
}

void HybridLM::init_random(uint64_t seed, double std) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(seed);
  std::map<std::string, std::string> group;  // SSM tensors by group, whatever their names
  for (const auto& p : inventory_.params)
    if (!p.ssm_group.empty()) group[p.name] = p.ssm_group;
  for (auto& p : named_parameters()) {
    const auto& name = p.key();
    auto& t = p.value();
    auto ends_with = [&](const std::string& s) {
      return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
    };
    const auto g = group.count(name) ? group.at(name) : std::string();
    if (g == "A_log") {
      // A = -(1, 2, ...) along the last dim: per head (Mamba-2) or per state (Mamba-1, S4D-real).
      t.copy_(torch::log(torch::arange(1, t.size(-1) + 1, t.options())).expand_as(t));
    } else if (g == "dt_bias") {
      // dt log-uniform in [1e-3, 1e-1], stored as its inverse softplus (Mamba's init).
      auto dt = torch::exp(torch::rand_like(t) * (std::log(0.1) - std::log(1e-3)) + std::log(1e-3));
      t.copy_(dt + torch::log(-torch::expm1(-dt)));
    } else if (g == "D" || ends_with("layernorm.weight") || ends_with("norm.weight") || ends_with("norm_f.weight")) {
      t.fill_(1.0);
    } else if (ends_with(".bias")) {
      t.zero_();
    } else {
      t.normal_(0.0, std);
    }
  }
}

}  // namespace peftfw::blocks
