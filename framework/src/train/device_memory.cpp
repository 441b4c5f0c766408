#include "peftfw/train/device_memory.hpp"

#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/cuda.h>

#include <unistd.h>

#include <set>

#ifdef PEFTFW_HAVE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
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

int64_t device_memory_bytes(const torch::Device& device) {
  if (device.is_cpu()) {
    const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : 0;
  }
#ifdef PEFTFW_HAVE_CUDA
  if (device.is_cuda() && torch::cuda::is_available()) {
    c10::cuda::CUDAGuard guard(device.has_index() ? device.index() : 0);
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) return static_cast<int64_t>(total_bytes);
  }
#endif
  return 0;
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
