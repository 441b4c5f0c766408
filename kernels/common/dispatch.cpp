// The kernels' one switch (peftfw/kernels/dispatch.hpp): CUDA kernels for CUDA tensors when
// they are built (PEFTFW_HAVE_CUDA), the LibTorch reference otherwise. PEFTFW_KERNELS=reference
// in the environment forces the reference (for comparisons and bisecting).
#include "peftfw/kernels/dispatch.hpp"
#include "peftfw/kernels/v2.hpp"

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
std::atomic<bool> g_v2{!env_is("PEFTFW_V2_KERNELS", "0")};

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

bool v2_kernels() { return g_v2.load(); }
void set_v2_kernels(bool on) { g_v2.store(on); }

const char* implementation_for(const torch::Device& device) {
  return use_cuda(device) ? "cuda" : "reference";
}

}  // namespace peftfw::kernels
