// An adapter plugin built outside the peftfw tree (docs/writing_plugins.md shows this file):
// LayerNorm tuning, as HF PEFT's LNTuningConfig, which trains the weights of the model's norm
// layers. It declares one method, its own recipe section [ln_tuning], and its count from the
// inventory alone, so `peftfw schema`, `plan` and `run` handle it like a built-in method.
// Built a second time with LN_TUNING_METHOD="lora" as a plugin the registry must refuse.
#include <torch/version.h>

#include <set>

#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/inventory.hpp"
#include "peftfw/plugin/adapter.hpp"
#include "peftfw/plugin/registrar.hpp"

#ifndef LN_TUNING_METHOD
#define LN_TUNING_METHOD "ln_tuning"
#endif

namespace {

class LnTuning final : public peftfw::AdapterPlugin {
 public:
  std::string id() const override { return LN_TUNING_METHOD "_plugin"; }

  std::vector<peftfw::AdapterMethod> methods() const override {
    return {{LN_TUNING_METHOD, "trains the weights of the norm layers (LN tuning).",
             peftfw::AdapterAttach::kParameters}};
  }

  // [ln_tuning] final_norm = true|false; the spec holds it as "ln_tuning.final_norm".
  std::vector<peftfw::recipe::SectionSpec> recipe_sections() const override {
    using namespace peftfw::recipe::keys;
    return {{"ln_tuning", "LN tuning: which norm layers train.",
             {flag("final_norm", true, "Also train the norm after the last decoder layer.")}}};
  }

  peftfw::AdapterLabel label(const peftfw::AdapterSpec& spec) const override {
    return {"LN tuning", spec.flag("ln_tuning.final_norm") ? "with the final norm" : "decoder layers only"};
  }

  // The norm layers' tensors, by inventory name: `plan` counts them, apply() trains them.
  std::vector<std::string> trained_base_parameters(const peftfw::AdapterSpec& spec,
                                                   const peftfw::ModelInventory& inventory) const override {
    const bool final_norm = spec.flag("ln_tuning.final_norm");
    std::set<std::string> norms;
    for (const auto& m : inventory.modules)
      if (m.type == "norm" && (m.layer >= 0 || final_norm)) norms.insert(m.name);
    std::vector<std::string> out;
    for (const auto& p : inventory.params)
      if (norms.count(p.module)) out.push_back(p.name);
    return out;
  }

  peftfw::AdapterResult apply(peftfw::CausalLM& model, const peftfw::AdapterSpec& spec,
                              const std::vector<std::string>&) const override {
    peftfw::AdapterResult result;
    auto params = model.named_parameters();
    for (const auto& name : trained_base_parameters(spec, model.inventory())) {
      auto* p = params.find(name);
      if (!p) throw std::runtime_error("ln_tuning: the model has no parameter '" + name + "'");
      p->set_requires_grad(true);
      result.trainable_params += p->numel();
    }
    return result;
  }
};

void register_ln_tuning(peftfw::PluginRegistrar& registrar) {
  registrar.add_adapter(std::make_shared<LnTuning>());
}

}  // namespace

PEFTFW_DEFINE_PLUGIN(LN_TUNING_METHOD "_plugin", "adapter", "0.1.0", "LayerNorm tuning (example adapter plugin)",
                     register_ln_tuning)
