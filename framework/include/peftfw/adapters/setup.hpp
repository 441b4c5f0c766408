// Applying a recipe's [adapter] and [ssm] sections to a model: freeze the base,
// resolve targets (an unmatched target or an uncovered layer kind is an error
// by default), attach the adapter through its plugin, and unfreeze the SSM
// core tensors as float32 master copies.
#pragma once

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

AdapterRequest adapter_request_from_recipe(const recipe::Recipe& recipe);

// What will be adapted, from the inventory alone (no model needed): used by `plan` and `run`.
struct AdapterPlan {
  std::vector<std::string> modules;      // adapted linear modules (LoRA / DoRA)
  std::vector<std::string> ssm_tensors;  // co-trained SSM core tensors (checkpoint names)
  std::vector<std::string> warnings;
  std::string coverage;                  // coverage table text
  bool default_targets_used = false;     // no targets named: the architecture's defaults
  std::string report;                    // PEFT-style parameter report text
};

AdapterPlan plan_adapters(const ModelInventory& inventory, const AdapterRequest& request);

// Freezes every base parameter, then applies the plan to the model.
AdapterResult apply_adapters(CausalLM& model, const AdapterRequest& request, const AdapterPlan& plan);

}  // namespace peftfw
