// Architecture plugin interface: everything about one model family.
//
// The framework never names a model family; it asks the plugin whose
// model_types() contains the config's "model_type".
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "peftfw/model/inventory.hpp"

namespace peftfw {

namespace io {
class JsonConfig;
}
class CausalLM;

struct BuildOptions {
  std::string dtype = "float32";  // "float32" | "bfloat16" | "float16"
  std::string device = "cpu";     // "cpu" | "cuda" | "cuda:N"
  bool random_init = true;        // false: parameters are left for a checkpoint load
  uint64_t seed = 0;              // random init seed
};

class ArchitecturePlugin {
 public:
  virtual ~ArchitecturePlugin() = default;
  virtual std::string id() const = 0;
  // config.json "model_type" values this plugin handles.
  virtual std::vector<std::string> model_types() const = 0;
  // Validates the config and describes the model without allocating weights.
  // Throws InputError naming the offending field.
  virtual ModelInventory describe(const io::JsonConfig& config) const = 0;
  // Builds the module tree with checkpoint-identical parameter names.
  virtual std::shared_ptr<CausalLM> build(const io::JsonConfig& config,
                                          const BuildOptions& options) const = 0;
};

}  // namespace peftfw
