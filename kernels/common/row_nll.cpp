// row_nll: the LibTorch reference, the CUDA glue, and the choice between them (the kernels'
// one switch, peftfw/kernels/dispatch.hpp: CUDA tensors take the kernels when built, unless
// PEFTFW_KERNELS=reference).
#include "peftfw/kernels/row_nll.hpp"

#include <torch/torch.h>

#include "peftfw/kernels/dispatch.hpp"

#ifdef PEFTFW_HAVE_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/row_nll.hpp"
#include "peftfw/kernels/check_launch.hpp"
#endif

namespace peftfw::kernels {
namespace {

void check_args(const torch::Tensor& logits, const torch::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "row_nll: logits must be [m, V] and targets [m], got ", logits.sizes(), " and ", targets.sizes());
}

#ifdef PEFTFW_HAVE_CUDA
// The kernels' dtype code, or -1 where they do not apply.
int kernel_dtype(const torch::Tensor& logits, const torch::Tensor& targets) {
  if (!use_cuda(logits)) return -1;
  if (logits.stride(1) != 1 || targets.scalar_type() != torch::kInt64) return -1;
  switch (logits.scalar_type()) {
    case torch::kFloat32: return 0;
    case torch::kHalf: return 1;
    case torch::kBFloat16: return 2;
    default: return -1;
  }
}

#endif

}  // namespace

namespace reference {

RowNll row_nll(const torch::Tensor& logits, const torch::Tensor& targets, double divisor) {
  check_args(logits, targets);
  auto z = logits.to(torch::kFloat32) / divisor;
  auto lse = torch::logsumexp(z, -1);
  return {lse - z.gather(1, targets.unsqueeze(1)).squeeze(1), lse};
}

torch::Tensor row_nll_backward(const torch::Tensor& logits, const torch::Tensor& targets,
                               const torch::Tensor& lse, double divisor, const torch::Tensor& scale) {
  check_args(logits, targets);
  auto p = torch::exp(logits.to(torch::kFloat32) / divisor - lse.unsqueeze(1));
  p.scatter_add_(1, targets.unsqueeze(1), torch::full({p.size(0), 1}, -1.0f, p.options()));
  return (p * scale).to(logits.scalar_type());
}

}  // namespace reference

bool row_nll_kernel_applies(const torch::Tensor& logits, const torch::Tensor& targets) {
#ifdef PEFTFW_HAVE_CUDA
  return kernel_dtype(logits, targets) >= 0;
#else
  (void)logits, (void)targets;
  return false;
#endif
}

RowNll row_nll(const torch::Tensor& logits, const torch::Tensor& targets, double divisor) {
#ifdef PEFTFW_HAVE_CUDA
  if (const int code = kernel_dtype(logits, targets); code >= 0) {
    check_args(logits, targets);
    c10::cuda::CUDAGuard guard(logits.device());
    const auto f32 = logits.options().dtype(torch::kFloat32);
    RowNll r{torch::empty({logits.size(0)}, f32), torch::empty({logits.size(0)}, f32)};
    auto t = targets.contiguous();
    check_launch(cuda::row_nll_fwd(code, logits.data_ptr(), logits.stride(0), t.data_ptr<int64_t>(), logits.size(0),
                            logits.size(1), static_cast<float>(divisor), r.loss.data_ptr<float>(),
                            r.lse.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
          "row_nll");
    return r;
  }
#endif
  return reference::row_nll(logits, targets, divisor);
}

torch::Tensor row_nll_backward(const torch::Tensor& logits, const torch::Tensor& targets,
                               const torch::Tensor& lse, double divisor, const torch::Tensor& scale) {
#ifdef PEFTFW_HAVE_CUDA
  if (const int code = kernel_dtype(logits, targets); code >= 0) {
    check_args(logits, targets);
    c10::cuda::CUDAGuard guard(logits.device());
    auto out = torch::empty(logits.sizes(), logits.options());
    auto t = targets.contiguous();
    auto l = lse.to(torch::kFloat32).contiguous();
    auto s = scale.to(logits.device(), torch::kFloat32).reshape({1}).contiguous();
    check_launch(cuda::row_nll_bwd(code, logits.data_ptr(), logits.stride(0), t.data_ptr<int64_t>(), l.data_ptr<float>(),
                            s.data_ptr<float>(), logits.size(0), logits.size(1), static_cast<float>(divisor),
                            out.data_ptr(), at::cuda::getCurrentCUDAStream()),
          "row_nll backward");
    return out;
  }
#endif
  return reference::row_nll_backward(logits, targets, lse, divisor, scale);
}

}  // namespace peftfw::kernels
