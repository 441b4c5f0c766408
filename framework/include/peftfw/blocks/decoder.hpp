// A decoder-only language model assembled from blocks: embedding, decoder
// layers, final norm and head. A plugin's builder fills the layers; the
// inventory (names, shapes, roles, layer kinds) is read off the module tree.
//
// A decoder layer is a sequence of residual units. Each unit normalises the
// stream, applies one or more sublayers in parallel (their outputs summed),
// and adds the result back, e.g.
//   input_layernorm -> mamba | self_attn;  post_attention_layernorm -> block_sparse_moe + shared_mlp
//   norm -> mixer                           (pure Mamba-2: one unit)
//   input_layernorm -> self_attn + mamba    (two mixers in parallel);  pre_ff_layernorm -> feed_forward
#pragma once

#include <torch/nn/modules/container/modulelist.h>

#include <functional>

#include "peftfw/blocks/context.hpp"
#include "peftfw/blocks/module.hpp"
#include "peftfw/blocks/sublayer.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/nn/linear.hpp"

namespace peftfw::blocks {

struct Branch {
  std::string name;  // checkpoint name inside the layer ("mamba", "self_attn", "feed_forward")
  std::shared_ptr<SublayerImpl> block;
  double input_multiplier = 1.0;
  double output_multiplier = 1.0;
};

struct LayerOptions {
  int64_t hidden_size = 0;
  double norm_eps = 1e-6;
  double residual_multiplier = 1.0;  // h + m * sublayer(norm(h))
  // Mamba-2's residual_in_fp32: the residual stream is kept in float32 and each norm sees it
  // cast to the norm weight's dtype.
  bool residual_in_fp32 = false;
};

class DecoderLayerImpl : public BlockImpl {
 public:
  DecoderLayerImpl(int64_t index, LayerOptions options);
  // Adds a residual unit: a norm registered as `norm_name` (role `norm_role`), then `branches`.
  void add_unit(const std::string& norm_name, const std::string& norm_role,
                std::vector<Branch> branches);
  torch::Tensor forward(const torch::Tensor& h, const ForwardContext& ctx, LayerCache* cache);
  // The layer kind: set by the builder (e.g. "mamba+moe" for Jamba), else the first unit's
  // parts, parallel ones joined by '|' ("mamba", "attention", "attention|mamba").
  std::string kind() const;
  void set_kind(std::string kind) { kind_ = std::move(kind); }
  // The parts of each unit, e.g. {{"mamba"}, {"moe", "mlp"}}.
  std::vector<std::vector<std::string>> parts() const;
  int64_t index() const { return index_; }

 private:
  struct Unit {
    RMSNorm norm{nullptr};
    std::vector<Branch> branches;
  };
  int64_t index_;
  std::string kind_;
  LayerOptions o_;
  std::vector<Unit> units_;
};

struct LMOptions {
  std::string architecture;  // plugin id
  std::string model_type;    // config's model_type
  // Checkpoint names.
  std::string backbone = "model";     // "backbone" for Mamba-2
  std::string embedding = "embed_tokens";
  std::string layers = "layers";
  std::string final_norm = "norm";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  double norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  int64_t padding_idx = -1;  // embedding row that gets no gradient (nn.Embedding padding_idx)
  double embedding_multiplier = 1.0;
  double logits_divisor = 1.0;  // logits = head(h) / logits_divisor
  double z_loss = 0.0;          // loss += z_loss * mean(logsumexp(logits)^2) (Bamba)
  // loss += coef * the Switch load-balancing loss over every MoE router that reports its logits
  // (Jamba's output_router_logits); 0: none.
  double router_aux_loss_coef = 0.0;
  RopeOptions rope;
  // Roles adapted when a recipe names no targets; empty: every adaptable projection in the
  // layers except a MoE router.
  std::vector<std::string> default_targets;
  // Checkpoint key aliases: a key some files use (e.g. "backbone.embedding.weight") -> the name.
  std::vector<std::pair<std::string, std::string>> checkpoint_aliases;
  // Where checkpoints store a parameter or buffer (ParamDesc::stored_as), given its name and
  // its first dimension; unset or empty: under its own name.
  std::function<std::vector<std::string>(const std::string& name, int64_t leading_dim)> stored_as;
  std::vector<std::string> ignored_checkpoint_prefixes;
};

class BackboneImpl : public BlockImpl {
 public:
  explicit BackboneImpl(const LMOptions& o);
  Weights embedding{nullptr};
  torch::nn::ModuleList layers;
  RMSNorm final_norm{nullptr};
};

class HybridLM : public CausalLM {
 public:
  explicit HybridLM(LMOptions options);
  void add_layer(std::shared_ptr<DecoderLayerImpl> layer);
  // Derives the inventory once every layer is added.
  void finish();

  ModelOutput forward(const ModelBatch& batch, GenerationCache* cache = nullptr) override;
  std::unique_ptr<GenerationCache> make_cache(int64_t batch_size) override;
  const ModelInventory& inventory() const override { return inventory_; }
  bool set_gradient_checkpointing(bool on) override {
    checkpointing_ = on;
    return true;
  }
  // Deterministic random initialisation for demo and test models.
  void init_random(uint64_t seed, double std);
  const LMOptions& options() const { return o_; }

 private:
  LMOptions o_;
  ModelInventory inventory_;
  bool checkpointing_ = false;
  std::shared_ptr<BackboneImpl> backbone_;
  nn::Linear lm_head_{nullptr};  // null when tied to the embedding
};

// The inventory of a block-built model, read off its module tree.
ModelInventory derive_inventory(HybridLM& model);

}  // namespace peftfw::blocks
