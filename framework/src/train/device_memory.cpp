#include "peftfw/train/device_memory.hpp"

#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/cuda.h>

#include <set>

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

void start_trace(const torch::Device& device) {
  namespace prof = torch::autograd::profiler;
  const std::set<torch::profiler::impl::ActivityType> activities = {torch::profiler::impl::ActivityType::CPU,
                                                                    torch::profiler::impl::ActivityType::CUDA};
  const prof::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  if (device.is_cuda()) torch::cuda::synchronize();
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
}

void save_trace(const std::string& path) { torch::autograd::profiler::disableProfiler()->save(path); }

}  // namespace peftfw::train
