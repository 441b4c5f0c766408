// Peak GPU memory held by tensors (the caching allocator's max allocated
// bytes since the process started), for progress lines and benchmarks.
#pragma once

#include <torch/types.h>

#include <string>

namespace peftfw::train {

// GiB, or a negative value when `device` is not a CUDA device (or the build
// has no CUDA LibTorch).
double gpu_peak_gib(const torch::Device& device);

// Total memory of `device`: the host's physical memory for the CPU, the card's memory for
// a CUDA device; 0 when unknown.
int64_t device_memory_bytes(const torch::Device& device);

// A Kineto trace (chrome://tracing JSON) of the CPU ops and GPU kernels run
// between start_trace and save_trace; bench/profile_summary.py sums it by
// kernel. start_trace synchronises `device` first when it is a GPU.
void start_trace(const torch::Device& device);
void save_trace(const std::string& path);

}  // namespace peftfw::train
