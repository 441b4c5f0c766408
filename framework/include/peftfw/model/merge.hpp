// The model's tensors with every adapter folded into its base weight, by
// checkpoint name: what "merged" and "gguf" exports write.
#pragma once

#include <torch/types.h>

#include <map>
#include <optional>
#include <string>

namespace peftfw {

class CausalLM;
struct ModelInventory;

// Adapter tensors (".lora_*") are left out; adapted weights are
// base + adapter (float32 math). Tensors are CPU and contiguous, in `dtype`
// or, when unset, in the model's parameter dtype.
// Persistent buffers (e.g. a router's selection bias) are included, in their own dtype.
std::map<std::string, torch::Tensor> merged_state_dict(CausalLM& model,
                                                       std::optional<torch::ScalarType> dtype = std::nullopt);

// The same tensors under the keys checkpoints of the family use (ParamDesc::stored_as): renamed,
// or split along dim 0 into one tensor per key.
std::map<std::string, torch::Tensor> to_checkpoint_keys(const ModelInventory& inventory,
                                                        std::map<std::string, torch::Tensor> tensors);

}  // namespace peftfw
