// GraniteMoeHybridForCausalLM in LibTorch: the module tree with
// checkpoint-identical names, following transformers' pure-PyTorch forward.
#pragma once

#include <torch/torch.h>

#include "config.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/nn/linear.hpp"

namespace peftfw::granite {

// Per-call context shared by all layers of one forward.
struct ForwardContext {
  torch::Tensor attention_mask;  // [B,T] 0/1 for the new tokens, undefined = all tokens
  torch::Tensor seq_ids;         // [B,T] or undefined
  torch::Tensor mamba_mask;      // [B,T] float mask for padding, undefined = none applied
  torch::Tensor attn_bias;       // [B,1,T,S] additive attention mask, undefined = plain causal
  torch::Tensor attn_rows;       // [B,1,T,1] 0 for query rows with no visible key, else 1
  torch::Tensor cos, sin;        // RoPE tables [B,T,hd] (undefined without RoPE)
};

struct LayerCache {
  torch::Tensor conv_state;  // [B,convdim,K]
  torch::Tensor ssm_state;   // [B,H,P,N] float32
  torch::Tensor k, v;        // [B,nkv,S,hd]
};

class GraniteCache : public GenerationCache {
 public:
  int64_t seen_tokens() const override { return seen; }
  int64_t seen = 0;
  torch::Tensor mask_history;  // [B,S] 0/1 attention mask of all cached tokens
  std::vector<LayerCache> layers;
};

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

// Holds a tensor parameter under a module name (conv1d, expert weights, gated norm).
class WeightsImpl : public torch::nn::Module {
 public:
  WeightsImpl(std::vector<int64_t> weight_shape, std::vector<int64_t> bias_shape = {});
  torch::Tensor weight, bias;
};
TORCH_MODULE(Weights);

class MambaMixerImpl : public torch::nn::Module {
 public:
  explicit MambaMixerImpl(const GraniteConfig& c);
  torch::Tensor forward(const torch::Tensor& h, const ForwardContext& ctx, LayerCache* cache,
                        bool decode_step);
  nn::Linear in_proj{nullptr}, out_proj{nullptr};
  Weights conv1d{nullptr}, norm{nullptr};
  torch::Tensor dt_bias, A_log, D;

 private:
  const GraniteConfig& c_;
};
TORCH_MODULE(MambaMixer);

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const GraniteConfig& c);
  torch::Tensor forward(const torch::Tensor& h, const ForwardContext& ctx, LayerCache* cache);
  nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};

 private:
  const GraniteConfig& c_;
};
TORCH_MODULE(Attention);

class SharedMlpImpl : public torch::nn::Module {
 public:
  explicit SharedMlpImpl(const GraniteConfig& c);
  torch::Tensor forward(const torch::Tensor& h);
  nn::Linear input_linear{nullptr}, output_linear{nullptr};
};
TORCH_MODULE(SharedMlp);

class RouterImpl : public torch::nn::Module {
 public:
  explicit RouterImpl(const GraniteConfig& c);
  nn::Linear layer{nullptr};
};
TORCH_MODULE(Router);

class MoeImpl : public torch::nn::Module {
 public:
  explicit MoeImpl(const GraniteConfig& c);
  torch::Tensor forward(const torch::Tensor& h);
  Router router{nullptr};
  Weights input_linear{nullptr}, output_linear{nullptr};

 private:
  const GraniteConfig& c_;
};
TORCH_MODULE(Moe);

class DecoderLayerImpl : public torch::nn::Module {
 public:
  DecoderLayerImpl(const GraniteConfig& c, int64_t index);
  torch::Tensor forward(const torch::Tensor& h, const ForwardContext& ctx, LayerCache* cache,
                        bool decode_step);
  LayerKind kind;
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  MambaMixer mamba{nullptr};
  Attention self_attn{nullptr};
  SharedMlp shared_mlp{nullptr};
  Moe block_sparse_moe{nullptr};

 private:
  const GraniteConfig& c_;
};
TORCH_MODULE(DecoderLayer);

class GraniteBackboneImpl : public torch::nn::Module {
 public:
  explicit GraniteBackboneImpl(const GraniteConfig& c);
  Weights embed_tokens{nullptr};
  torch::nn::ModuleList layers;
  RMSNorm norm{nullptr};
};
TORCH_MODULE(GraniteBackbone);

class GraniteForCausalLM : public CausalLM {
 public:
  GraniteForCausalLM(GraniteConfig config, ModelInventory inventory);
  ModelOutput forward(const ModelBatch& batch, GenerationCache* cache = nullptr) override;
  std::unique_ptr<GenerationCache> make_cache(int64_t batch_size) override;
  const ModelInventory& inventory() const override { return inventory_; }
  bool set_gradient_checkpointing(bool on) override {
    checkpointing_ = on;
    return true;
  }

  // Deterministic random initialisation for demo / test models.
  void init_random(uint64_t seed, double std);

  const GraniteConfig& config() const { return config_; }

 private:
  GraniteConfig config_;
  ModelInventory inventory_;
  bool checkpointing_ = false;
  GraniteBackbone model{nullptr};
  nn::Linear lm_head{nullptr};  // null when tied to the embeddings
};

}  // namespace peftfw::granite
