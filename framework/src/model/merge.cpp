#include "peftfw/model/merge.hpp"

#include <torch/torch.h>

#include "peftfw/model/causal_lm.hpp"
#include "peftfw/nn/linear.hpp"

namespace peftfw {

std::map<std::string, torch::Tensor> merged_state_dict(CausalLM& model, std::optional<torch::ScalarType> dtype) {
  torch::NoGradGuard no_grad;
  auto params = model.named_parameters();
  const auto out_dtype = dtype.value_or(params.front().value().scalar_type());
  std::map<std::string, torch::Tensor> merged;
  for (auto& [name, lin] : nn::named_linears(model))
    if (lin->adapter()) merged[name + ".weight"] = lin->adapter()->merged_weight(*lin);
  std::map<std::string, torch::Tensor> tensors;
  for (auto& p : params) {
    const auto& name = p.key();
    if (name.find(".lora_") != std::string::npos) continue;  // adapter tensors are folded in
    auto it = merged.find(name);
    auto value = it != merged.end() ? it->second : p.value().detach();
    tensors[name] = value.to(torch::kCPU, out_dtype).contiguous();
  }
  return tensors;
}

}  // namespace peftfw
