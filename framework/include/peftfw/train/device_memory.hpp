// Peak GPU memory held by tensors (the caching allocator's max allocated
// bytes since the process started), for progress lines and benchmarks.
#pragma once

#include <torch/types.h>

namespace peftfw::train {

// GiB, or a negative value when `device` is not a CUDA device (or the build
// has no CUDA LibTorch).
double gpu_peak_gib(const torch::Device& device);

}  // namespace peftfw::train
