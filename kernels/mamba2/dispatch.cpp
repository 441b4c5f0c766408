// The dispatch point of the Mamba-2 family (peftfw/kernels/mamba2.hpp): the fused SSD scan
// (ssd_fused.cpp, with the per-chunk CUDA kernels registered on first use) and the CUDA
// decoding step for CUDA tensors when the kernels are built and the switch allows
// (peftfw/kernels/dispatch.hpp), the LibTorch reference otherwise.
#include <torch/torch.h>

#include "peftfw/kernels/mamba2.hpp"
#include "peftfw/kernels/ssd_fused.hpp"

#ifdef PEFTFW_HAVE_CUDA
#include <mutex>

#include "cuda/ssd_cuda.hpp"
#endif

namespace peftfw::kernels::mamba2 {
namespace {

// Whether t takes the CUDA path; the family's kernels are registered with the fused scan
// the first time it is asked.
bool fast(const torch::Tensor& t) {
#ifdef PEFTFW_HAVE_CUDA
  static std::once_flag once;
  std::call_once(once, [] { cuda_ops::register_ssd_kernels(); });
#endif
  return use_cuda(t);
}

}  // namespace

SsdResult ssd_chunk_scan(const SsdArgs& args) {
  if (fast(args.x)) return fused::ssd_chunk_scan(args);
  return reference::ssd_chunk_scan(args);
}

torch::Tensor ssd_step(SsdStepArgs& args) {
#ifdef PEFTFW_HAVE_CUDA
  if (fast(args.x)) return cuda_ops::ssd_step(args);
#endif
  return reference::ssd_step(args);
}

}  // namespace peftfw::kernels::mamba2
