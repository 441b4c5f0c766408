// Architecture plugin interface: everything about one model family.
//
// The framework never names a model family; it asks the plugin whose
// model_types() contains the config's "model_type".
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "peftfw/data/chat_format.hpp"
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

// How a model family is laid out in a GGUF file for llama.cpp: the arch name,
// its hyperparameter keys, and every tensor's GGUF name, shape and how it is
// made from the merged HF tensors. Persistence plugins write it; only the
// architecture plugin knows it.
struct GgufValue {
  enum class Type { u32, f32, boolean, string, i32_array };
  std::string key;  // full key, e.g. "mamba2.ssm.state_size"
  Type type = Type::u32;
  double number = 0;               // u32, f32, boolean
  std::string text;                // string
  std::vector<int32_t> integers;   // i32_array
};

struct GgufTensor {
  std::string name;            // e.g. "blk.0.ssm_in.weight"
  std::vector<int64_t> shape;  // row-major (outermost first), as numpy sees it
  bool keep_f32 = false;       // norms, SSM core tensors, router: float32 in every file type
  // Makes the float32 CPU tensor of `shape` from merged HF tensors, looked up
  // by checkpoint name through `hf`.
  std::function<torch::Tensor(const std::function<torch::Tensor(const std::string&)>& hf)> make;
};

struct GgufLayout {
  std::string arch;  // general.architecture
  std::vector<GgufValue> metadata;
  std::vector<GgufTensor> tensors;
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
  // The family's chat templates, selectable by name with [data] template.
  virtual std::vector<data::ChatFormat> chat_formats() const { return {}; }
  // The GGUF layout of this config, or nullopt when the family has none.
  // Throws InputError for a config llama.cpp cannot run, naming the field.
  virtual std::optional<GgufLayout> gguf_layout(const io::JsonConfig& config) const {
    (void)config;
    return std::nullopt;
  }
};

}  // namespace peftfw
