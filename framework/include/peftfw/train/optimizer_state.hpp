// AdamW's state in a checkpoint, without pickle: the moment tensors in
// optimizer.safetensors and the step counts in optimizer.json, keyed by the
// trainable parameters' names (so a reader needs no code of ours to inspect it).
// A checkpoint written before this format (optimizer.pt, LibTorch's
// pickle-based archive) can still be read.
#pragma once

#include <torch/torch.h>

#include <filesystem>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace peftfw::train {

using NamedParameters = std::vector<std::pair<std::string, torch::Tensor>>;

// Writes optimizer.safetensors and optimizer.json into `dir`.
void save_adamw_state(const std::filesystem::path& dir, const torch::optim::AdamW& optimizer,
                      const NamedParameters& params);

// Reads them back into `optimizer` (built over the same parameters). Falls back to a
// legacy optimizer.pt, saying so on `log`. InputError naming the file when a file is
// missing, unreadable, or does not fit the parameters.
void load_adamw_state(const std::filesystem::path& dir, torch::optim::AdamW& optimizer,
                      const NamedParameters& params, std::ostream& log);

}  // namespace peftfw::train
