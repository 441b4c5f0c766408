#include "peftfw/model/merge.hpp"

#include <torch/torch.h>

#include <set>

#include "peftfw/blocks/ssm_slots.hpp"
#include "peftfw/error.hpp"
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
  for (const auto& m : blocks::named_ssm_mixers(model)) {
    const auto terms = m.mixer->state_adapter() ? m.mixer->state_adapter()->terms() : blocks::SsmStateTerms{};
    if (terms.initial_state.defined() || terms.initial_conv.defined() || terms.state_offset.defined() ||
        terms.output_offset.defined())
      throw InputError(m.name + " carries a learned SSM state (initial state or offset): no weight of a "
                       "checkpoint holds it exactly, so it cannot be merged; save the adapter instead "
                       "(format \"peft\")");
    // A parameter adapter (e.g. a sparse delta of A_log) folds exactly: its effective tensor.
    if (auto* pa = m.mixer->parameter_adapter()) {
      auto own = m.module->named_parameters(/*recurse=*/false);
      for (const auto& group : m.mixer->slot_groups())
        if (auto* base = own.find(group)) merged[m.name + "." + group] = pa->effective(group, *base).to(base->scalar_type());
    }
  }
  // The base model's tensors only: what adapters added is folded in above.
  std::set<std::string> base_names;
  for (const auto& d : model.inventory().params) base_names.insert(d.name);
  std::map<std::string, torch::Tensor> tensors;
  for (auto& p : params) {
    const auto& name = p.key();
    if (!base_names.count(name)) continue;
    auto it = merged.find(name);
    auto value = it != merged.end() ? it->second : p.value().detach();
    tensors[name] = value.to(torch::kCPU, out_dtype).contiguous();
  }
  for (const auto& b : model.named_buffers()) tensors[b.key()] = b.value().detach().to(torch::kCPU).contiguous();
  return tensors;
}

std::vector<int64_t> stored_slices(const std::vector<int64_t>& shape, int64_t keys) {
  if (shape.empty() || keys <= 0 || keys % shape[0] != 0) return {};
  const int64_t per = keys / shape[0];
  std::vector<int64_t> out = {keys};
  if (per == 1) {
    out.insert(out.end(), shape.begin() + 1, shape.end());
  } else {
    if (shape.size() < 2 || shape[1] % per != 0) return {};
    out.push_back(shape[1] / per);
    out.insert(out.end(), shape.begin() + 2, shape.end());
  }
  return out;
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
      const auto sliced = stored_slices(value.sizes().vec(), static_cast<int64_t>(d.stored_as.size()));
      TORCH_CHECK(!sliced.empty(), d.name, ": ", value.sizes(), " does not split into ", d.stored_as.size(),
                  " checkpoint keys");
      auto slices = value.contiguous().view(sliced);
      for (size_t i = 0; i < d.stored_as.size(); ++i)
        tensors[d.stored_as[i]] = slices[static_cast<int64_t>(i)].contiguous();
    }
  return tensors;
}

}  // namespace peftfw
