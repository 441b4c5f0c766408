// Adapter plugin interface (plugin ABI 3): how a fine-tuning method declares itself, its recipe
// keys and its parameter count, and injects its trainable parameters into a model.
//
// The framework names no method. An adapter plugin declares:
// - its methods (the values of [adapter] method), each with what it attaches to;
// - its recipe keys: keys added to [adapter] and sections of its own, which join validation,
//   did-you-mean, `peftfw schema` and docs/recipes.md like the built-in ones;
// - how `plan` and the parameter report name it and count what it trains, from the inventory
//   alone (no weights);
// - apply(): the injection itself.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "peftfw/model/inventory.hpp"
#include "peftfw/recipe/schema.hpp"

namespace peftfw {

class CausalLM;
struct ModuleDesc;
struct ModelInventory;
struct ParamDesc;

// The built-in [adapter] method that adds nothing (only [ssm] train, if any, is trained).
inline constexpr char kNoAdapter[] = "none";

// What a method attaches to. kModules: the framework resolves [adapter] target_modules /
// roles / exclude_modules (or the architecture's default targets) against the inventory and
// hands the adapted modules to apply(); the other kinds get an empty module list.
enum class AdapterAttach {
  kModules,     // wraps linear modules (LoRA, DoRA)
  kParameters,  // trains or offsets existing parameters (BitFit, full, sparse deltas)
  kState,       // acts on the SSM state
};

struct AdapterMethod {
  std::string name;     // the [adapter] method value, e.g. "dora"
  std::string summary;  // one line, shown in `peftfw schema` and docs/recipes.md
  AdapterAttach attaches = AdapterAttach::kModules;
  // The default of [adapter] method. The first method flagged so, in plugin load order, wins.
  bool is_default = false;
};

// A configured method: its name, the adapter seed, and the values of the recipe keys its plugin
// declared (defaults included). Keys added to [adapter] are stored under their own name ("r");
// keys of the plugin's own sections as "section.key".
struct AdapterSpec {
  std::string method;
  uint64_t seed = 0;
  std::map<std::string, recipe::Value> options;
  // What the method's warm-up produced (AdapterPlugin::end_warmup), e.g. SDT's warm-up deltas of
  // A_log. `peftfw run` keeps it in the run folder (adapter_state.safetensors), so a resumed run
  // reuses it, and in the exported adapter folder (method_state.safetensors) for init_from.
  std::map<std::string, torch::Tensor> state;
  // apply() builds the tensors an adapter folder stores (saved_tensors) to load them into, not the
  // tensors training updates (the two differ for SDT: dense deltas vs. the selected entries).
  bool for_loading = false;

  // Typed reads of options; each throws std::logic_error naming the key when it is missing or
  // holds another type (a plugin reading a key it did not declare is a programming error).
  std::int64_t integer(const std::string& key) const;
  double real(const std::string& key) const;  // integers are accepted
  bool flag(const std::string& key) const;
  std::string text(const std::string& key) const;
};

// How `plan` and the parameter report name a configured method: e.g. {"LoRA", "r=16, alpha=32"}.
struct AdapterLabel {
  std::string name;
  std::string settings;  // may be empty
};

struct AdapterResult {
  std::vector<std::string> adapted_modules;  // full module names
  std::vector<std::string> added_tensors;    // full names of added_tensors() as created
  int64_t trainable_params = 0;
};

class AdapterPlugin {
 public:
  virtual ~AdapterPlugin() = default;
  virtual std::string id() const = 0;
  virtual std::vector<AdapterMethod> methods() const = 0;

  // Recipe keys. A section named "adapter" adds its keys to [adapter] (after method); any other
  // name is a section of this plugin's own. Names must not clash with built-in sections/keys or
  // another plugin's, nor methods with another plugin's: the registry refuses such a plugin and
  // `peftfw plugins` says why.
  virtual std::vector<recipe::SectionSpec> recipe_sections() const { return {}; }

  virtual AdapterLabel label(const AdapterSpec& spec) const { return {spec.method, ""}; }

  // Parameters the method adds for one adapted module (kModules methods), from its inventory
  // shape: the count `plan`, the parameter report and the memory preflight use before any
  // model exists. apply() must create exactly this many (tests check it).
  virtual int64_t added_parameters(const AdapterSpec& spec, const ModuleDesc& module) const {
    (void)spec;
    (void)module;
    return 0;
  }
  // Parameters the method adds that belong to no adapted module (e.g. a learned state per SSM
  // mixer, or a sparse delta of A_log), with the full names and shapes apply() gives them (tests
  // check it); layer and layer_kind place them in the parameter report.
  virtual std::vector<ParamDesc> added_tensors(const AdapterSpec& spec, const ModelInventory& inventory) const {
    (void)spec;
    (void)inventory;
    return {};
  }
  // Existing parameters the method makes trainable, by inventory name (e.g. every bias).
  virtual std::vector<std::string> trained_base_parameters(const AdapterSpec& spec,
                                                           const ModelInventory& inventory) const {
    (void)spec;
    (void)inventory;
    return {};
  }

  // Injects the adapter. `modules` are the resolved targets for kModules methods (already
  // checked against the inventory), empty otherwise. The base is frozen before this is called.
  virtual AdapterResult apply(CausalLM& model, const AdapterSpec& spec,
                              const std::vector<std::string>& modules) const = 0;

  // The spec, in the terms of a LoRA-style method, of the adapters this method puts on the target
  // modules, when it is not itself such a method (SDT wraps them in LoRA of its own rank): formats
  // that store module adapters (PEFT's adapter_config.json) describe them with it.
  virtual std::optional<AdapterSpec> module_adapter_spec(const AdapterSpec& spec) const {
    (void)spec;
    return std::nullopt;
  }

  // ---- training phases ----
  // A warm-up the method needs before its real training (SDT ranks dimensions by how far a dense
  // warm-up moves them), in optimizer steps; 0 when there is none or spec.state already holds its
  // result. `peftfw run` then trains a model apply() built (spec.state empty) for that many steps
  // at the run's learning-rate schedule, calls end_warmup(), puts what it returns in spec.state,
  // and builds the base model afresh for the real training, all in one run.
  virtual int64_t warmup_steps(const AdapterSpec& spec) const {
    (void)spec;
    return 0;
  }
  virtual std::map<std::string, torch::Tensor> end_warmup(CausalLM& model, const AdapterSpec& spec) const {
    (void)model;
    (void)spec;
    return {};
  }

  // ---- persistence ----
  // The tensors adapter folders store for the method besides LoRA-style module weights, by name:
  // by default the tensors apply() added, as they are. An apply() with spec.for_loading builds
  // parameters of exactly these names and shapes.
  virtual std::map<std::string, torch::Tensor> saved_tensors(CausalLM& model, const AdapterSpec& spec,
                                                             const AdapterResult& applied) const;
  // [adapter] init_from: the trained tensors (names of AdapterResult::added_tensors) that stored
  // ones (saved_tensors' names) start from. By default the same map.
  virtual std::map<std::string, torch::Tensor> trained_from_saved(const AdapterSpec& spec,
                                                                  std::map<std::string, torch::Tensor> saved) const {
    (void)spec;
    return saved;
  }
};

}  // namespace peftfw
