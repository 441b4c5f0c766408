// Applying a recipe's [adapter] and [ssm] sections to a model: freeze the base,
// resolve targets for methods that wrap modules (an unmatched target or an
// uncovered layer kind is an error by default), attach the adapter through the
// plugin that provides the method, and unfreeze the SSM core tensors as float32
// master copies. The method's own keys come from its plugin's recipe sections.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "peftfw/adapters/targets.hpp"
#include "peftfw/model/inventory.hpp"
#include "peftfw/plugin/adapter.hpp"

namespace peftfw {

class CausalLM;
namespace recipe {
class Recipe;
}

struct AdapterRequest {
  AdapterSpec spec;
  adapters::TargetRequest targets;
  std::vector<std::string> ssm_groups;  // [ssm] train
};

// A spec for `method` outside a recipe (tests, tools): its plugin's declared defaults, then
// `values` (names as in AdapterSpec::options; each must be a key the plugin declares, of the
// declared type). InputError naming the key otherwise.
AdapterSpec adapter_spec(const std::string& method, const std::map<std::string, recipe::Value>& values = {});

// The recipe must have been loaded with PluginRegistry::recipe_schema(), which declares the
// method's keys. Method "none" (nothing added) needs no plugin.
AdapterRequest adapter_request_from_recipe(const recipe::Recipe& recipe);

// What will be adapted, from the inventory alone (no model needed): used by `plan` and `run`.
struct AdapterPlan {
  std::vector<std::string> modules;      // adapted modules (methods that attach to modules)
  std::vector<std::string> ssm_tensors;  // co-trained SSM core tensors (checkpoint names)
  std::vector<std::string> warnings;
  std::string coverage;                  // coverage table text
  bool default_targets_used = false;     // no targets named: the architecture's defaults
  AdapterLabel label;                    // the method as `plan` and the report name it
  adapters::ParameterCount count;        // trainable / all, as the report's last line
  std::string report;                    // PEFT-style parameter report text ("" for "none")
};

AdapterPlan plan_adapters(const ModelInventory& inventory, const AdapterRequest& request);

// Freezes every base parameter, then applies the plan to the model.
AdapterResult apply_adapters(CausalLM& model, const AdapterRequest& request, const AdapterPlan& plan);

}  // namespace peftfw
