// Activation checkpointing: run `fn(input)` without keeping its activations,
// and run it again during backward (the "reentrant" scheme of
// torch.utils.checkpoint). The random-number state is saved and restored for
// the rerun, so dropout masks are the same both times.
#pragma once

#include <torch/types.h>

#include <functional>

namespace peftfw::nn {

using CheckpointFn = std::function<torch::Tensor(const torch::Tensor&)>;

// Only checkpoints when grad mode is on; otherwise it is fn(input).
torch::Tensor checkpoint(CheckpointFn fn, const torch::Tensor& input);

}  // namespace peftfw::nn
