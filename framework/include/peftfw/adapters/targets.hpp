// Which modules an adapter wraps, and what that costs.
//
// resolve_targets() reads PEFT-style target_modules / exclude_modules and
// peftfw's role selectors against the architecture's inventory. Unlike PEFT,
// which errors only when *nothing* matches, it reports every entry that
// matches nothing and every layer kind left without any adapted module, so
// Transformer targets on a hybrid (q/k/v/o + gate/up/down_proj, which adapt
// only the attention layers of a Mamba/attention hybrid) fail loudly.
// coverage_table() and parameter_report() show the result; the latter ends
// with PEFT's print_trainable_parameters() line, digit for digit.
//
// Torch-free: everything here works from the config-derived inventory.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "peftfw/model/inventory.hpp"
#include "peftfw/recipe/recipe.hpp"

namespace peftfw::adapters {

// What the recipe's [adapter] section asks for.
//
// Matching rules (PEFT's, plus roles):
// - target_modules as a list: an entry matches a module whose full name
//   equals it or ends with "." + entry ("q_proj", "shared_mlp.input_linear";
//   "proj" matches nothing, since the '.' boundary is required).
// - target_modules as a string: a regex that must match the whole full name
//   (PEFT's re.fullmatch; here std::regex ECMAScript syntax). The string
//   "all-linear" instead selects every module of type "linear" except the one
//   with role "lm_head".
// - exclude_modules: the same forms (no "all-linear" shorthand, as in PEFT);
//   matching modules are removed from the selection.
// - roles: an entry matches a module role equal to it or starting with
//   entry + "." ("mamba" matches "mamba.in_proj"); it selects the adaptable
//   modules among those (so "mamba" skips mamba.conv1d), and is an error when
//   it matches only modules that cannot be adapted.
// target_modules and roles are united; at least one must be given.
struct TargetRequest {
  std::optional<recipe::TargetPattern> target_modules;
  std::optional<recipe::TargetPattern> exclude_modules;
  std::vector<std::string> roles;
  // What to do with an entry that matches nothing or a layer kind left
  // without adapted modules: "error" (throw), "warn" (return warnings),
  // "ignore". Selecting a module that cannot be adapted is always an error,
  // and so is selecting nothing at all.
  std::string on_unmatched = "error";
  // Names the request in messages, e.g. "recipes/x.toml [adapter]".
  std::string source = "[adapter]";
};

struct TargetResolution {
  std::vector<std::string> modules;   // adapted module full names, inventory order
  std::vector<std::string> warnings;  // on_unmatched = "warn": the problems found
  // Set when the request named no target_modules and no roles: the architecture's default
  // targets (roles) that were adapted instead.
  std::vector<std::string> default_roles;
};

// Throws InputError listing every problem at once.
TargetResolution resolve_targets(const ModelInventory& inventory, const TargetRequest& request);

// Per layer kind and adaptable module (names relative to the layer, e.g.
// "mamba / mamba.in_proj"): how many are adapted of how many there are, a
// summary line per kind, and adaptable modules outside the layers (lm_head).
// Throws InputError if `adapted` names a module that is not in the inventory
// or cannot be adapted.
std::string coverage_table(const ModelInventory& inventory,
                           const std::vector<std::string>& adapted);

// Parameter counts as PEFT's print_trainable_parameters() reports them.
struct ParameterCount {
  int64_t trainable = 0;
  int64_t all = 0;
};

// What an adapter method trains, for counting from the inventory alone: the name the report
// gives it, the parameters it adds per adapted module (its plugin's added_parameters) and the
// existing parameters it makes trainable (by inventory name).
struct CountRule {
  std::string name = "adapter";  // "LoRA": the report's "<name> params" column
  std::string settings;          // "r=16, alpha=32": shown beside the name; may be empty
  std::function<int64_t(const ModuleDesc&)> added_per_module;  // unset: adds nothing
  std::vector<std::string> base_params;                        // trained base tensors
  std::vector<ParamDesc> added_tensors;                        // added outside adapted modules
};

// "trainable" is what the rule adds, plus the base tensors it trains, plus every inventory
// tensor of the SSM groups trained (e.g. {"A_log", "D", "dt_bias"}; a tensor in both counts
// once). "all" is the base model plus what the rule adds (PEFT counts adapter weights in all
// params). Sums saturate at INT64_MAX instead of overflowing. Throws InputError for an unknown
// module or SSM group name.
ParameterCount count_parameters(const ModelInventory& inventory, const std::vector<std::string>& adapted,
                                const CountRule& rule, const std::vector<std::string>& ssm_groups_trained);

// Trainable parameters per layer kind (added and base together, SSM separately), then
// PEFT's line exactly, e.g.
// "trainable params: 28,823,552 || all params: 3,220,219,648 || trainable%: 0.8951".
std::string parameter_report(const ModelInventory& inventory, const std::vector<std::string>& adapted,
                             const CountRule& rule, const std::vector<std::string>& ssm_groups_trained);

// PEFT's print_trainable_parameters() line for a count.
std::string peft_parameter_line(const ParameterCount& count);

}  // namespace peftfw::adapters
