// Helpers the LibTorch glue of every family shares (common/cuda/ops_cuda.cpp,
// mamba2/cuda/ssd_cuda.cpp, ...): the kernels' element type code of a tensor, the current
// stream, device and autograd checks. Only for translation units built with a CUDA LibTorch.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <torch/torch.h>

#include <initializer_list>
#include <optional>

#include "launch.hpp"

namespace peftfw::kernels::glue {

// The kernels' element type for t, or nullopt for anything but float32, float16, bfloat16.
inline std::optional<cuda::DType> kernel_dtype(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return cuda::DType::f32;
    case torch::kFloat16: return cuda::DType::f16;
    case torch::kBFloat16: return cuda::DType::bf16;
    default: return std::nullopt;
  }
}

inline cuda::DType dtype_of(const torch::Tensor& t) {
  auto d = kernel_dtype(t.scalar_type());
  TORCH_CHECK(d.has_value(), "CUDA kernels: expected float32, float16 or bfloat16, got ", t.scalar_type());
  return *d;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// t (when defined) must be on `device`, the device of the op's first input.
inline void check_device(const torch::Tensor& t, const torch::Device& device, const char* op, const char* name) {
  if (!t.defined()) return;
  TORCH_CHECK(t.device() == device, op, ": expected ", name, " on ", device, " (the device of the ",
              "first input), got ", t.device());
}

inline const void* ptr_or_null(const torch::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Whether autograd would record an op on these tensors (grad mode on and one of them requires grad).
inline bool needs_grad(std::initializer_list<const torch::Tensor*> ts) {
  if (!torch::GradMode::is_enabled()) return false;
  for (const auto* t : ts)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

}  // namespace peftfw::kernels::glue
