// The model's tensors with every adapter folded into its base weight, by
// checkpoint name: what "merged" and "gguf" exports write.
#pragma once

#include <torch/types.h>

#include <map>
#include <optional>
#include <string>

namespace peftfw {

class CausalLM;

// Adapter tensors (".lora_*") are left out; adapted weights are
// base + adapter (float32 math). Tensors are CPU and contiguous, in `dtype`
// or, when unset, in the model's parameter dtype.
std::map<std::string, torch::Tensor> merged_state_dict(CausalLM& model,
                                                       std::optional<torch::ScalarType> dtype = std::nullopt);

}  // namespace peftfw
