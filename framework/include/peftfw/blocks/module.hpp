// The base of every building block: a module that tags the children and
// parameters it registers, so that a model's inventory (module types, roles,
// adaptability, SSM groups) is read off the module tree itself. A checkpoint
// name is spelled once, where the block registers it.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <map>
#include <string>
#include <vector>

namespace peftfw::blocks {

// What a registered child module is, for the inventory.
struct Tag {
  std::string type;      // "linear", "norm", "conv1d", "embedding", "experts"
  std::string role;      // e.g. "mamba.in_proj", "attention.q", "mlp.gate", "norm.input"
  std::string why_not;   // empty: adapters may wrap it (linear only); else why not
  std::string ssm_group; // its parameters belong to this SSM group (e.g. "conv1d")
};

Tag linear(const std::string& role);
// "float32" | "bfloat16" | "float16" -> the dtype (BuildOptions::dtype).
torch::Dtype dtype_of(const std::string& name);
Tag norm(const std::string& role);
// An SSM mixer's depthwise conv1d: not adaptable (it says why), in the SSM group "conv1d".
Tag ssm_conv1d(const std::string& role);

class BlockImpl : public torch::nn::Module {
 public:
  struct Entry {
    std::string name;
    Tag tag;
  };
  const std::vector<Entry>& tagged_children() const { return children_; }
  // Parameter name (own, or a child's as "child.param") -> SSM group (A_log, D, dt_bias).
  const std::map<std::string, std::string>& parameter_groups() const { return groups_; }

 protected:
  template <typename Holder>
  Holder add(const std::string& name, Holder holder, Tag tag) {
    children_.push_back({name, std::move(tag)});
    return register_module(name, std::move(holder));
  }
  torch::Tensor add_parameter(const std::string& name, torch::Tensor value,
                              const std::string& ssm_group = "");
  // Puts a parameter of a child (e.g. "dt_proj.bias") in an SSM group.
  void set_parameter_group(const std::string& path, const std::string& ssm_group) { groups_[path] = ssm_group; }

 private:
  std::vector<Entry> children_;
  std::map<std::string, std::string> groups_;
};

// Holds tensors under a module name (conv1d weights, expert weights, gated-norm weight, embedding).
class WeightsImpl : public torch::nn::Module {
 public:
  explicit WeightsImpl(std::vector<int64_t> weight_shape, std::vector<int64_t> bias_shape = {});
  torch::Tensor weight, bias;
};
TORCH_MODULE(Weights);

// weight * rmsnorm(x) (transformers' RMSNorm: float32 math, rounded to x's dtype before the weight).
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

}  // namespace peftfw::blocks
