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

std::pair<torch::Tensor, torch::Tensor> states(const torch::Tensor& S_in, const torch::Tensor& dec_in,
                                               const torch::Tensor& init_in) {
  c10::cuda::CUDAGuard guard(S_in.device());
  auto S = S_in.contiguous(), dec = dec_in.to(torch::kFloat32).contiguous();
  const int64_t B = S.size(0), nc = S.size(1), H = S.size(2), PN = S.size(3) * S.size(4);
  auto prev = torch::empty_like(S);
  auto final_state = torch::empty({B, H, S.size(3), S.size(4)}, S.options().dtype(torch::kFloat32));
  torch::Tensor init = init_in.defined() ? init_in.to(torch::kFloat32).contiguous() : torch::Tensor();
  check(cuda::ssd_state_passing(dtype_code(S.scalar_type()), S.data_ptr(), dec.data_ptr<float>(),
                                init.defined() ? init.data_ptr<float>() : nullptr, prev.data_ptr(),
                                final_state.data_ptr<float>(), B, nc, H, PN, at::cuda::getCurrentCUDAStream()),
        "ssd_state_passing");
  return {prev, final_state};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> states_backward(const torch::Tensor& dH_in,
                                                                        const torch::Tensor& dec_in,
                                                                        const torch::Tensor& dfinal_in,
                                                                        const torch::Tensor& prev_in) {
  c10::cuda::CUDAGuard guard(dH_in.device());
  auto prev = prev_in.contiguous();
  auto dH = dH_in.to(prev.scalar_type()).contiguous(), dec = dec_in.to(torch::kFloat32).contiguous();
  const int64_t B = prev.size(0), nc = prev.size(1), H = prev.size(2), PN = prev.size(3) * prev.size(4);
  auto dS = torch::empty_like(prev);
  auto ddec = torch::zeros({B, nc, H}, prev.options().dtype(torch::kFloat32));
  auto dinit = torch::empty({B, H, prev.size(3), prev.size(4)}, prev.options().dtype(torch::kFloat32));
  torch::Tensor dfinal = dfinal_in.defined() ? dfinal_in.to(torch::kFloat32).contiguous() : torch::Tensor();
  check(cuda::ssd_state_passing_backward(dtype_code(prev.scalar_type()), dH.data_ptr(), dec.data_ptr<float>(),
                                         dfinal.defined() ? dfinal.data_ptr<float>() : nullptr, prev.data_ptr(),
                                         dS.data_ptr(), ddec.data_ptr<float>(), dinit.data_ptr<float>(), B, nc, H,
                                         PN, at::cuda::getCurrentCUDAStream()),
        "ssd_state_passing_backward");
  return {dS, ddec, dinit};
}

}  // namespace

void register_ssd_kernels() {
  fused::MaskKernels k;
  k.build = build;
  k.backward = backward;
  k.states = states;
  k.states_backward = states_backward;
  fused::register_mask_kernels(std::move(k));
}

}  // namespace peftfw::kernels::mamba2::cuda_ops
