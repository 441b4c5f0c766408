// The dispatch point of the Mamba-1 family (peftfw/kernels/mamba1.hpp): the CUDA selective scan
// and its decoding step for CUDA tensors when the kernels are built and the switch allows
// (peftfw/kernels/dispatch.hpp), the LibTorch reference otherwise.
#include <torch/torch.h>

#include "peftfw/kernels/mamba1.hpp"

#ifdef PEFTFW_HAVE_CUDA
#include "cuda/scan_cuda.hpp"
#endif

namespace peftfw::kernels::mamba1 {

ScanResult selective_scan(const ScanArgs& args) {
#ifdef PEFTFW_HAVE_CUDA
  if (use_cuda(args.u)) return cuda_ops::selective_scan(args);
#endif
  return reference::selective_scan(args);
}

torch::Tensor selective_scan_step(StepArgs& args) {
#ifdef PEFTFW_HAVE_CUDA
  if (use_cuda(args.u)) return cuda_ops::selective_scan_step(args);
#endif
  return reference::selective_scan_step(args);
}

}  // namespace peftfw::kernels::mamba1
