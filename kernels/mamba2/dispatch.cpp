// The one dispatch point for Mamba-2 ops: CUDA kernels for CUDA tensors when
// they are built (PEFTFW_HAVE_CUDA), the LibTorch reference otherwise.
// PEFTFW_KERNELS=reference in the environment forces the reference (for
// comparisons and bisecting).
#include <torch/torch.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "peftfw/kernels/mamba2.hpp"
#include "peftfw/kernels/v2.hpp"
#include "peftfw/kernels/ssd_fused.hpp"

#ifdef PEFTFW_HAVE_CUDA
#include "cuda/ops_cuda.hpp"
namespace peftfw::kernels::mamba2::cuda_ops {
void register_ssd_kernels();
}
#endif

namespace peftfw::kernels::mamba2 {
namespace {

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

std::atomic<bool> g_force_reference{env_is("PEFTFW_KERNELS", "reference")};

bool fast(const torch::Device& device) {
#ifdef PEFTFW_HAVE_CUDA
  static std::once_flag once;
  std::call_once(once, [] { cuda_ops::register_ssd_kernels(); });
  return device.is_cuda() && !g_force_reference.load();
#else
  (void)device;
  return false;
#endif
}

bool fast(const torch::Tensor& t) { return fast(t.device()); }

}  // namespace

void set_force_reference(bool on) { g_force_reference.store(on); }

const char* implementation_for(const torch::Device& device) {
  return fast(device) ? "cuda" : "reference";
}

torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, const torch::Tensor& seq_ids, bool silu) {
#ifdef PEFTFW_HAVE_CUDA
  if (fast(x)) return cuda_ops::causal_conv1d(x, weight, bias, seq_ids, silu);
#endif
  return reference::causal_conv1d(x, weight, bias, seq_ids, silu);
}

SsdResult ssd_chunk_scan(const SsdArgs& args) {
  if (fast(args.x)) return fused::ssd_chunk_scan(args);
  return reference::ssd_chunk_scan(args);
}

torch::Tensor gated_rms_norm(const torch::Tensor& y, const torch::Tensor& z,
                             const torch::Tensor& weight, double eps,
                             std::optional<torch::ScalarType> out_dtype) {
#ifdef PEFTFW_HAVE_CUDA
  if (fast(y)) return cuda_ops::gated_rms_norm(y, z, weight, eps, out_dtype);
#endif
  return reference::gated_rms_norm(y, z, weight, eps, out_dtype);
}

torch::Tensor silu_mul(const torch::Tensor& gu) {
#ifdef PEFTFW_HAVE_CUDA
  if (fast(gu)) return cuda_ops::silu_mul(gu);
#endif
  return reference::silu_mul(gu);
}

torch::Tensor ssd_step(SsdStepArgs& args) {
#ifdef PEFTFW_HAVE_CUDA
  if (fast(args.x)) return cuda_ops::ssd_step(args);
#endif
  return reference::ssd_step(args);
}

torch::Tensor causal_conv1d_step(torch::Tensor& conv_state, const torch::Tensor& x_t,
                                 const torch::Tensor& weight, const torch::Tensor& bias, bool silu) {
#ifdef PEFTFW_HAVE_CUDA
  if (fast(x_t)) return cuda_ops::causal_conv1d_step(conv_state, x_t, weight, bias, silu);
#endif
  return reference::causal_conv1d_step(conv_state, x_t, weight, bias, silu);
}

}  // namespace peftfw::kernels::mamba2

namespace peftfw::kernels {
namespace {
std::atomic<bool> g_v2{!mamba2::env_is("PEFTFW_V2_KERNELS", "0")};
}  // namespace

bool v2_kernels() { return g_v2.load(); }
void set_v2_kernels(bool on) { g_v2.store(on); }

}  // namespace peftfw::kernels
