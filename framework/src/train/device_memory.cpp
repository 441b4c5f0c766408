#include "peftfw/train/device_memory.hpp"

#ifdef PEFTFW_HAVE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace peftfw::train {

double gpu_peak_gib(const torch::Device& device) {
#ifdef PEFTFW_HAVE_CUDA
  if (device.is_cuda()) {
    const auto index = device.has_index() ? device.index() : 0;
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
    const auto& peak = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
    return static_cast<double>(peak) / (1024.0 * 1024.0 * 1024.0);
  }
#endif
  (void)device;
  return -1.0;
}

}  // namespace peftfw::train
