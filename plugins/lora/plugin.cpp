// Adapter plugin "lora": LoRA, DoRA, and the BitFit / full fine-tuning baselines.
#include <torch/torch.h>
#include <torch/version.h>

#include <map>

#include "lora.hpp"
#include "peftfw/error.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/plugin/adapter.hpp"
#include "peftfw/plugin/registrar.hpp"

namespace peftfw::lora {
namespace {

class LoraPlugin final : public AdapterPlugin {
 public:
  std::string id() const override { return "lora"; }
  std::vector<std::string> methods() const override { return {"lora", "dora", "bitfit", "full"}; }

  AdapterResult apply(CausalLM& model, const AdapterSpec& spec,
                      const std::vector<std::string>& modules) const override {
    AdapterResult result;
    if (spec.method == "bitfit" || spec.method == "full") {
      for (auto& p : model.named_parameters()) {
        const auto& name = p.key();
        const bool bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
        if (spec.method == "full" || bias) {
          p.value().set_requires_grad(true);
          result.trainable_params += p.value().numel();
        }
      }
      if (result.trainable_params == 0)
        throw InputError("[adapter] method = \"bitfit\": this model has no bias parameters, so "
                         "BitFit would train nothing; use \"lora\" or \"full\"");
      return result;
    }
    if (spec.method != "lora" && spec.method != "dora")
      throw InputError("adapter plugin 'lora' does not provide method '" + spec.method + "'");
    std::map<std::string, std::shared_ptr<nn::LinearImpl>> linears;
    for (auto& [name, lin] : nn::named_linears(model)) linears[name] = lin;
    LoraOptions options;
    options.r = spec.r;
    options.alpha = spec.alpha;
    options.dropout = spec.dropout;
    options.use_rslora = spec.use_rslora;
    options.dora = spec.method == "dora";
    options.float32_math = spec.compute_dtype == "float32";
    torch::manual_seed(spec.seed);  // adapter init is reproducible from [adapter] init_seed
    for (const auto& name : modules) {
      auto it = linears.find(name);
      if (it == linears.end())
        throw InputError("cannot attach LoRA to '" + name + "': it is not a linear module of this model");
      LoraAdapter::attach(*it->second, options);
      result.adapted_modules.push_back(name);
      result.trainable_params += options.r * (it->second->in_features() + it->second->out_features()) +
                                 (options.dora ? it->second->out_features() : 0);
    }
    return result;
  }
};

void register_lora(PluginRegistrar& registrar) {
  registrar.add_adapter(std::make_shared<LoraPlugin>());
}

}  // namespace
}  // namespace peftfw::lora

PEFTFW_DEFINE_PLUGIN("lora", "adapter", "0.1.0",
                     "LoRA (incl. rsLoRA), DoRA, BitFit and full fine-tuning",
                     peftfw::lora::register_lora)
