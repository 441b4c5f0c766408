// Adapter plugin interface: how trainable parameters are injected into a model.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace peftfw {

class CausalLM;

struct AdapterSpec {
  std::string method = "lora";  // "lora" | "dora" | ...
  int64_t r = 16;
  double alpha = 32.0;
  double dropout = 0.0;
  bool use_rslora = false;
  uint64_t seed = 0;
  // Dtype of the adapter's forward math: "float32" (PEFT: the input is cast to the
  // float32 adapter weights) or "model" (the base model's dtype; the float32
  // adapter weights are cast, gradients still reach them in float32).
  std::string compute_dtype = "model";
};

struct AdapterResult {
  std::vector<std::string> adapted_modules;  // full module names
  int64_t trainable_params = 0;
};

class AdapterPlugin {
 public:
  virtual ~AdapterPlugin() = default;
  virtual std::string id() const = 0;
  // [adapter] method values this plugin provides.
  virtual std::vector<std::string> methods() const = 0;
  // Injects the adapter into the named modules (already resolved and checked).
  virtual AdapterResult apply(CausalLM& model, const AdapterSpec& spec,
                              const std::vector<std::string>& modules) const = 0;
};

}  // namespace peftfw
