#include "peftfw/model/merge.hpp"

#include <torch/torch.h>

#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/inventory.hpp"
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
  for (const auto& b : model.named_buffers()) tensors[b.key()] = b.value().detach().to(torch::kCPU).contiguous();
  return tensors;
}

std::map<std::string, torch::Tensor> to_checkpoint_keys(const ModelInventory& inventory,
                                                        std::map<std::string, torch::Tensor> tensors) {
  for (const auto* list : {&inventory.params, &inventory.buffers})
    for (const auto& d : *list) {
      auto it = tensors.find(d.name);
      if (d.stored_as.empty() || it == tensors.end()) continue;
      auto value = it->second;
      tensors.erase(it);
      if (d.stored_as.size() == 1) {
        tensors[d.stored_as.front()] = value;
        continue;
      }
      TORCH_CHECK(value.size(0) == static_cast<int64_t>(d.stored_as.size()), d.name, ": ", value.size(0),
                  " slices for ", d.stored_as.size(), " checkpoint keys");
      for (size_t i = 0; i < d.stored_as.size(); ++i)
        tensors[d.stored_as[i]] = value[static_cast<int64_t>(i)].contiguous();
    }
  return tensors;
}

}  // namespace peftfw
