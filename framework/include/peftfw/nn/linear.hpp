// The linear layer every architecture plugin builds its projections from.
//
// It owns the frozen base weight under its checkpoint name ("weight", "bias")
// and an optional adapter. An adapter installs its own parameters directly on
// this module (e.g. "lora_A.weight"), so full parameter names match HF PEFT's
// keys with no translation. Every caller goes through forward(), so no fused
// path can bypass an attached adapter.
#pragma once

#include <torch/nn/module.h>

#include <memory>

namespace peftfw::nn {

class LinearImpl;

class LinearAdapter {
 public:
  virtual ~LinearAdapter() = default;
  // Output of the adapted layer given its input and the frozen base output.
  virtual torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& base_out,
                                const LinearImpl& base) = 0;
  // Output of the adapted layer from its input alone; what LinearImpl::forward calls.
  // The default computes the frozen base output and hands it to forward(); an adapter
  // may override this to fuse its branch into the base product.
  virtual torch::Tensor forward_from_input(const torch::Tensor& x, const LinearImpl& base);
  // The single weight matrix equivalent to base + adapter (float32 math, base dtype).
  virtual torch::Tensor merged_weight(const LinearImpl& base) const = 0;
};

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, bool bias);

  torch::Tensor forward(const torch::Tensor& x);
  // The frozen projection alone, ignoring any adapter.
  torch::Tensor base_forward(const torch::Tensor& x) const;

  void set_adapter(std::shared_ptr<LinearAdapter> adapter) { adapter_ = std::move(adapter); }
  LinearAdapter* adapter() const { return adapter_.get(); }

  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  // The bias added to the rounded product, in the input's dtype (x W^T, then + b), as transformers'
  // Mamba-1 mixers form dt; the default adds it inside the product (one rounding). Same in float32.
  bool bias_after_product() const { return bias_after_product_; }
  void set_bias_after_product(bool on) { bias_after_product_ = on; }

  torch::Tensor weight;
  torch::Tensor bias;  // undefined when the layer has no bias

 private:
  int64_t in_features_;
  int64_t out_features_;
  bool bias_after_product_ = false;
  std::shared_ptr<LinearAdapter> adapter_;
};

// Module holder, like torch::nn::Linear.
class Linear : public torch::nn::ModuleHolder<LinearImpl> {
 public:
  using torch::nn::ModuleHolder<LinearImpl>::ModuleHolder;
};

// Finds every Linear in a module tree, with its full dotted name.
std::vector<std::pair<std::string, std::shared_ptr<LinearImpl>>> named_linears(
    torch::nn::Module& root);

}  // namespace peftfw::nn
