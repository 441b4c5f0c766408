// The kernels' one switch, shared by every family's dispatch (peftfw/kernels/ops.hpp,
// peftfw/kernels/mamba2.hpp, ...): CUDA tensors take a family's CUDA kernels when they are
// built (PEFTFW_HAVE_CUDA), everything else the LibTorch reference. PEFTFW_KERNELS=reference
// in the environment, or set_force_reference(true), forces the reference everywhere (for
// comparisons and bisecting).
#pragma once

#include <torch/types.h>

namespace peftfw::kernels {

// Which implementation the dispatch picks for tensors on `device`:
// "cuda" (kernels built, CUDA device, reference not forced) or "reference".
const char* implementation_for(const torch::Device& device);

// Forces the reference everywhere (comparisons, bisecting). Also set by the
// environment variable PEFTFW_KERNELS=reference.
void set_force_reference(bool on);

// Whether the CUDA kernels take tensors on `device`: implementation_for(device) is "cuda".
// Each family's dispatch asks this (for its first input) before it calls its kernels' glue;
// the glue may still fall back to the reference for shapes and dtypes its kernels lack.
bool use_cuda(const torch::Device& device);
inline bool use_cuda(const torch::Tensor& t) { return use_cuda(t.device()); }

}  // namespace peftfw::kernels
