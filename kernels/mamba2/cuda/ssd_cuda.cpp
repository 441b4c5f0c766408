// LibTorch glue for ssd_masks.cu: registers the CUDA versions of the fast
// SSD scan's two elementwise passes (see ssd_fused.cpp).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/torch.h>

#include "peftfw/kernels/ssd_fused.hpp"
#include "ssd_masks.hpp"

namespace peftfw::kernels::mamba2::cuda_ops {
namespace {

int dtype_code(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return 0;
    case torch::kHalf: return 1;
    case torch::kBFloat16: return 2;
    default: TORCH_CHECK(false, "ssd kernels: unsupported dtype ", t, " (expected float32, float16 or bfloat16)");
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

torch::Tensor build(const torch::Tensor& CB, const torch::Tensor& cum, const torch::Tensor& seg,
                    int64_t Hg, torch::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(CB.device());
  const int64_t B = CB.size(0), nc = CB.size(1), G = CB.size(2), Lc = CB.size(3);
  auto M = torch::empty({B, nc, G * Hg, Lc, Lc}, CB.options().dtype(dtype));
  check(cuda::ssd_build_decay_cb(dtype_code(dtype), CB.contiguous().data_ptr<float>(),
                                 cum.contiguous().data_ptr<float>(), seg.contiguous().data_ptr<int32_t>(),
                                 M.data_ptr(), B * nc, G, Hg, Lc, at::cuda::getCurrentCUDAStream()),
        "ssd_build_decay_cb");
  return M;
}

std::pair<torch::Tensor, torch::Tensor> backward(const torch::Tensor& dM, const torch::Tensor& CB,
                                                 const torch::Tensor& cum, const torch::Tensor& seg,
                                                 int64_t Hg) {
  c10::cuda::CUDAGuard guard(CB.device());
  const int64_t B = CB.size(0), nc = CB.size(1), G = CB.size(2), Lc = CB.size(3);
  auto dCB = torch::zeros_like(CB);
  auto dcum = torch::empty({B, nc, G * Hg, Lc}, CB.options());
  auto dMc = dM.contiguous();
  check(cuda::ssd_build_decay_cb_backward(
            dtype_code(dMc.scalar_type()), dMc.data_ptr(), CB.contiguous().data_ptr<float>(),
            cum.contiguous().data_ptr<float>(), seg.contiguous().data_ptr<int32_t>(),
            dCB.data_ptr<float>(), dcum.data_ptr<float>(), B * nc, G, Hg, Lc,
            at::cuda::getCurrentCUDAStream()),
        "ssd_build_decay_cb_backward");
  return {dCB, dcum};
}

}  // namespace

void register_ssd_kernels() {
  fused::MaskKernels k;
  k.build = build;
  k.backward = backward;
  fused::register_mask_kernels(std::move(k));
}

}  // namespace peftfw::kernels::mamba2::cuda_ops
