// lora_down: the CUDA glue (peftfw/kernels/lora_down.hpp). There is no LibTorch reference
// here: the mask is the kernels' own counter-based draw, and callers without the kernels
// keep their composed dropout and GEMM.
#include "peftfw/kernels/lora_down.hpp"

#include <torch/torch.h>

#include "peftfw/kernels/dispatch.hpp"

#ifdef PEFTFW_HAVE_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>

#include "cuda/lora_down.hpp"
#include "peftfw/kernels/check_launch.hpp"
#endif

namespace peftfw::kernels {
namespace {

#ifdef PEFTFW_HAVE_CUDA
int dtype_code(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kHalf: return 1;
    case torch::kBFloat16: return 2;
    default: return -1;
  }
}

bool rows_aligned(const torch::Tensor& t) {
  return t.dim() == 2 && t.stride(1) == 1 && (t.stride(0) * t.element_size()) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

cuda::DropDraw draw_of(const DropMask& m) { return {m.p, m.seed, m.offset}; }
#endif

}  // namespace

bool lora_down_kernel_applies(const torch::Tensor& x, const torch::Tensor& a) {
#ifdef PEFTFW_HAVE_CUDA
  if (!use_cuda(x)) return false;
  const int code = dtype_code(x);
  // A's fragments are read straight from global memory: 32-byte alignment.
  return code > 0 && rows_aligned(x) && a.scalar_type() == x.scalar_type() && a.device() == x.device() &&
         a.dim() == 2 && a.is_contiguous() && reinterpret_cast<uintptr_t>(a.data_ptr()) % 32 == 0 &&
         a.size(1) == x.size(1) && cuda::lora_down_supported(code, a.size(0), x.size(1));
#else
  (void)x, (void)a;
  return false;
#endif
}

DropMask draw_drop_mask(const torch::Device& device, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
  DropMask m;
  m.p = p;
  if (p == 0.0) return m;
#ifdef PEFTFW_HAVE_CUDA
  TORCH_CHECK(device.is_cuda(), "draw_drop_mask: needs a CUDA device");
  at::Generator gen = at::cuda::detail::getDefaultCUDAGenerator(device.has_index() ? device.index() : -1);
  std::lock_guard<std::mutex> lock(gen.mutex());
  // Four words of offset per draw: one step of curand's counter (see cuda/lora_down.hpp).
  std::tie(m.seed, m.offset) = gen.get<at::CUDAGeneratorImpl>()->philox_engine_inputs(4);
  return m;
#else
  (void)device;
  TORCH_CHECK(false, "draw_drop_mask: built without CUDA");
#endif
}

void lora_down(const torch::Tensor& x, const torch::Tensor& a, const DropMask& mask, const torch::Tensor& h,
               const torch::Tensor& x_copy, const torch::Tensor& x_dropped) {
  TORCH_CHECK(lora_down_kernel_applies(x, a), "lora_down: unsupported inputs x ", x.sizes(), " ", x.scalar_type(),
              ", a ", a.sizes());
#ifdef PEFTFW_HAVE_CUDA
  const int64_t M = x.size(0), K = x.size(1), r = a.size(0);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == M && h.size(1) == r && h.stride(1) == 1 &&
                  h.scalar_type() == x.scalar_type(), "lora_down: h must be [", M, ", ", r, "] with unit column stride");
  if (x_copy.defined())
    TORCH_CHECK(x_copy.sizes() == x.sizes() && x_copy.scalar_type() == x.scalar_type() && rows_aligned(x_copy),
                "lora_down: x_copy must be [M, K] in x's dtype with 16-byte aligned rows");
  if (x_dropped.defined())
    TORCH_CHECK(x_dropped.sizes() == x.sizes() && x_dropped.scalar_type() == x.scalar_type() &&
                    x_dropped.is_contiguous() && rows_aligned(x_dropped),
                "lora_down: x_dropped must be a contiguous [M, K] in x's dtype");
  c10::cuda::CUDAGuard guard(x.device());
  check_launch(cuda::lora_down(dtype_code(x), x.data_ptr(), x.stride(0), a.data_ptr(), r, M, K, draw_of(mask), h.data_ptr(),
                        h.stride(0), x_copy.defined() ? x_copy.data_ptr() : nullptr,
                        x_copy.defined() ? x_copy.stride(0) : 0, x_dropped.defined() ? x_dropped.data_ptr() : nullptr,
                        c10::cuda::getCurrentCUDAStream()),
        "lora_down");
#else
  (void)mask, (void)h, (void)x_copy, (void)x_dropped;
#endif
}

void dropout_backward_(const torch::Tensor& g, const DropMask& mask) {
#ifdef PEFTFW_HAVE_CUDA
  TORCH_CHECK(g.is_cuda() && g.dim() == 2 && g.is_contiguous() && dtype_code(g) > 0 && g.size(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(g.data_ptr()) % 16 == 0,
              "dropout_backward_: g must be a contiguous 16-bit CUDA [M, K] with K % 8 == 0, got ", g.sizes());
  c10::cuda::CUDAGuard guard(g.device());
  check_launch(cuda::dropout_scale(dtype_code(g), g.data_ptr(), g.size(0), g.size(1), draw_of(mask),
                            c10::cuda::getCurrentCUDAStream()),
        "dropout backward");
#else
  (void)g, (void)mask;
  TORCH_CHECK(false, "dropout_backward_: built without CUDA");
#endif
}

}  // namespace peftfw::kernels
