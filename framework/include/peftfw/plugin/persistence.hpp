// Persistence plugin interface: how results are written (and read back).
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/types.h>

#include "peftfw/model/fingerprint.hpp"

namespace peftfw {

class CausalLM;
struct AdapterSpec;
struct AdapterMethod;

struct SaveRequest {
  CausalLM* model = nullptr;
  const AdapterSpec* adapter = nullptr;
  std::vector<std::string> adapted_modules;  // modules carrying an adapter (full names)
  std::vector<std::string> ssm_tensors;      // co-trained SSM core tensors (checkpoint names)
  // The method's own tensors (AdapterPlugin::saved_tensors), e.g. a learned initial state per
  // mixer, saved under their names with the method's settings; and its warm-up result
  // (AdapterSpec::state), which [adapter] init_from reuses.
  std::map<std::string, torch::Tensor> method_tensors;
  std::map<std::string, torch::Tensor> method_state;
  std::filesystem::path base_model_dir;      // source checkpoint folder, if any
  std::string base_model_name;               // for adapter_config.json base_model_name_or_path
  std::string config_json;                   // the model's config.json text
  // fingerprint_base(source) of the base the adapter was trained on, recorded in the adapter's
  // manifest. Unset: the peft format computes it from base_model_dir (none for a random init).
  std::optional<BaseFingerprint> base_fingerprint;
  std::vector<std::string> gguf_types = {"f16"};  // [output] gguf_types: one .gguf file per type
};

struct LoadedAdapter {
  std::string method;
  std::vector<std::string> modules;
  std::vector<std::string> ssm_tensors;
  std::vector<std::string> added_tensors;
};

class PersistencePlugin {
 public:
  virtual ~PersistencePlugin() = default;
  virtual std::string id() const = 0;  // value used in [output] formats
  // Writes `dir` atomically: a reader sees the old folder or the complete new one.
  virtual void save(const SaveRequest& request, const std::filesystem::path& dir) const = 0;
  // Called before training: checks what save() will need besides the trained model (files in
  // the source checkpoint folder `base_model_dir`, empty for a random init) and throws
  // InputError naming what is missing, so a long run cannot end in a failed export.
  virtual void preflight(const std::filesystem::path& base_model_dir) const { (void)base_model_dir; }
  // Called before training with the recipe's method: throws InputError when this format cannot
  // hold what the method trains (e.g. a learned SSM state in a plain checkpoint), saying why and
  // which format can.
  virtual void check_method(const AdapterMethod& method) const { (void)method; }
  // Whether load() is implemented (adapter formats).
  virtual bool can_load() const { return false; }
  // Attaches the adapter stored in `dir` to `model` and loads its tensors.
  virtual LoadedAdapter load(CausalLM& model, const std::filesystem::path& dir) const {
    throw std::logic_error("format '" + id() + "' cannot be loaded");
  }
};

// Formats that write plain model weights (merged, gguf) cannot hold a learned SSM state: the
// refusal check_method() throws for such a method, naming `format`. No-op for other methods.
void refuse_if_weights_cannot_hold(const AdapterMethod& method, const std::string& format);

// Writes a folder atomically: `fill` writes into a temporary sibling folder,
// which then replaces `dir` by rename. A failure leaves `dir` as it was.
void write_folder_atomic(const std::filesystem::path& dir,
                         const std::function<void(const std::filesystem::path&)>& fill);

}  // namespace peftfw
