// LibTorch entry points for the SSD's CUDA kernels (ssd_cuda.cpp), called by the family's
// dispatch (dispatch.cpp).
#pragma once

#include <torch/types.h>

#include "peftfw/kernels/mamba2.hpp"

namespace peftfw::kernels::mamba2::cuda_ops {

// Registers the fused scan's CUDA kernels with ssd_fused.cpp (fused::register_mask_kernels).
void register_ssd_kernels();

// Same signature and result as reference::ssd_step. Updates args.state in place when it is a
// contiguous float32 tensor on the device (otherwise args.state is replaced by the updated
// float32 copy, as the reference does); returns y [B,H,P] float32. Inputs the kernel does not
// cover (CPU tensors, mixed dtypes, N > 6144, inputs that would need autograd) fall back to
// the reference.
torch::Tensor ssd_step(SsdStepArgs& args);

}  // namespace peftfw::kernels::mamba2::cuda_ops
