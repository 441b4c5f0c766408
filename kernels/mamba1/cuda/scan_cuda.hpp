// LibTorch entry points for the Mamba-1 selective scan's CUDA kernels (scan_cuda.cpp), called by
// the family's dispatch (dispatch.cpp).
#pragma once

#include <torch/types.h>

#include "peftfw/kernels/mamba1.hpp"

namespace peftfw::kernels::mamba1::cuda_ops {

// Same signature and result as reference::selective_scan, differentiable through one autograd
// node whose backward runs the CUDA backward (gradients only for the inputs that need them).
// Inputs the kernels do not cover (CPU tensors, u / delta / z / B / C of different dtypes or
// not float32 / float16 / bfloat16, N > 256, T = 0) fall back to the reference.
ScanResult selective_scan(const ScanArgs& args);

// Same signature and result as reference::selective_scan_step. Updates args.state in place when
// it is a contiguous float32 tensor on the device (otherwise args.state is replaced by the
// updated float32 copy, as the reference does); returns y [B,D] float32. Inputs that would
// need autograd, or that the kernel does not cover, fall back to the reference.
torch::Tensor selective_scan_step(StepArgs& args);

}  // namespace peftfw::kernels::mamba1::cuda_ops
