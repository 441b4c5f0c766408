// The LibTorch glue's one error path for a CUDA launch: a c10::Error naming the kernel and
// CUDA's message. Only for translation units built with a CUDA LibTorch.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace peftfw::kernels {

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

}  // namespace peftfw::kernels
