// The kernels' one switch (peftfw/kernels/dispatch.hpp): CUDA kernels for CUDA tensors when
// they are built (PEFTFW_HAVE_CUDA), the LibTorch reference otherwise. PEFTFW_KERNELS=reference
// in the environment forces the reference (for comparisons and bisecting).
#include "peftfw/kernels/dispatch.hpp"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace peftfw::kernels {
namespace {

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

std::atomic<bool> g_force_reference{env_is("PEFTFW_KERNELS", "reference")};

}  // namespace

void set_force_reference(bool on) { g_force_reference.store(on); }

bool use_cuda(const torch::Device& device) {
#ifdef PEFTFW_HAVE_CUDA
  return device.is_cuda() && !g_force_reference.load();
#else
  (void)device;
  return false;
#endif
}

const char* implementation_for(const torch::Device& device) {
  return use_cuda(device) ? "cuda" : "reference";
}

}  // namespace peftfw::kernels
