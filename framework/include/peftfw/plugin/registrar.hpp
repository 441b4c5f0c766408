// What a plugin sees while registering: it adds the factories it provides.
// Include this (and the interface headers) from plugin code; then define the
// entry point with PEFTFW_DEFINE_PLUGIN.
#pragma once

#include <cstring>
#include <exception>
#include <memory>
#include <string>

#include "peftfw/plugin/abi.hpp"

namespace peftfw {

class ArchitecturePlugin;
class AdapterPlugin;
class PersistencePlugin;

class PluginRegistrar {
 public:
  virtual ~PluginRegistrar() = default;
  virtual void add_architecture(std::shared_ptr<ArchitecturePlugin> plugin) = 0;
  virtual void add_adapter(std::shared_ptr<AdapterPlugin> plugin) = 0;
  virtual void add_persistence(std::shared_ptr<PersistencePlugin> plugin) = 0;
};

namespace detail {
// Runs a registration function, turning any exception into an error message,
// so no exception crosses the shared-library boundary.
template <typename Fn>
int guarded_register(Fn&& fn, void* registrar, char* error, size_t error_size) {
  try {
    fn(*static_cast<PluginRegistrar*>(registrar));
    return 0;
  } catch (const std::exception& e) {
    if (error && error_size) {
      std::strncpy(error, e.what(), error_size - 1);
      error[error_size - 1] = '\0';
    }
  } catch (...) {
    if (error && error_size) {
      std::strncpy(error, "unknown exception during registration", error_size - 1);
      error[error_size - 1] = '\0';
    }
  }
  return 1;
}
}  // namespace detail
}  // namespace peftfw

// Defines the plugin's one exported entry point. REGISTER_FN is a function
// `void fn(peftfw::PluginRegistrar&)`. Requires <torch/version.h> for
// TORCH_VERSION (every plugin is built against LibTorch).
#define PEFTFW_DEFINE_PLUGIN(ID, KIND, VERSION, DESCRIPTION, REGISTER_FN)                 \
  namespace {                                                                           \
  int peftfw_register_trampoline(void* registrar, char* error, size_t error_size) {     \
    return ::peftfw::detail::guarded_register(REGISTER_FN, registrar, error, error_size); \
  }                                                                                     \
  }                                                                                     \
  extern "C" PEFTFW_PLUGIN_EXPORT const peftfw_plugin_manifest* peftfw_plugin_entry_v1( \
      void) {                                                                           \
    static const peftfw_plugin_manifest manifest = {                                    \
        PEFTFW_PLUGIN_ABI_VERSION, ID,          KIND,           VERSION,                \
        TORCH_VERSION,             PEFTFW_COMPILER_ID, DESCRIPTION,                     \
        &peftfw_register_trampoline};                                                   \
    return &manifest;                                                                   \
  }
