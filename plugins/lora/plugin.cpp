// Adapter plugin "lora": LoRA, DoRA, and the BitFit / full fine-tuning baselines.
#include <torch/torch.h>
#include <torch/version.h>

#include <map>
#include <sstream>

#include "lora.hpp"
#include "peftfw/error.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/inventory.hpp"
#include "peftfw/plugin/adapter.hpp"
#include "peftfw/plugin/registrar.hpp"

namespace peftfw::lora {
namespace {

bool is_bias(const std::string& name) {
  return name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
}

class LoraPlugin final : public AdapterPlugin {
 public:
  std::string id() const override { return "lora"; }
  std::vector<AdapterMethod> methods() const override {
    return {
        {"lora", "low-rank adapters on the target modules (LoRA; rsLoRA with use_rslora).", AdapterAttach::kModules, true},
        {"dora", "LoRA plus a learned magnitude per output feature (DoRA).", AdapterAttach::kModules, false},
        {"bitfit", "trains every bias of the base model (BitFit).", AdapterAttach::kParameters, false},
        {"full", "trains every weight of the base model.", AdapterAttach::kParameters, false},
    };
  }

  std::vector<recipe::SectionSpec> recipe_sections() const override {
    using namespace recipe::keys;
    // One line per key, as the built-in table.
    // clang-format off
    return {{"adapter", "", {
      integer("r", 16, "LoRA rank.").at_least(1).at_most(65536).known_as({"lora_r", "rank", "lora_rank"}),
      real   ("alpha", 32, "LoRA scale numerator: scale = alpha / r (alpha / sqrt(r) with use_rslora).").known_as({"lora_alpha"}),
      real   ("dropout", 0.05, "Dropout on the adapter's input while training.").between(0, 1).known_as({"lora_dropout"}),
      flag   ("use_rslora", false, "Rank-stabilized LoRA: scale by alpha / sqrt(r)."),
      choice ("compute_dtype", "model", {"model", "float32"}, "LoRA forward math in the base model's dtype (16-bit GEMMs on GPU; weights stay float32), or float32 as PEFT does."),
    }}};
    // clang-format on
  }

  AdapterLabel label(const AdapterSpec& spec) const override {
    if (spec.method == "bitfit") return {"BitFit", ""};
    if (spec.method == "full") return {"full fine-tuning", ""};
    std::ostringstream settings;
    settings << "r=" << spec.integer("r") << ", alpha=" << spec.real("alpha");
    if (spec.flag("use_rslora")) settings << ", rsLoRA";
    return {spec.method == "dora" ? "DoRA" : "LoRA", settings.str()};
  }

  int64_t added_parameters(const AdapterSpec& spec, const ModuleDesc& m) const override {
    if (spec.method != "lora" && spec.method != "dora") return 0;
    return spec.integer("r") * (m.in_features + m.out_features) + (spec.method == "dora" ? m.out_features : 0);
  }

  std::vector<std::string> trained_base_parameters(const AdapterSpec& spec,
                                                   const ModelInventory& inventory) const override {
    std::vector<std::string> out;
    if (spec.method != "bitfit" && spec.method != "full") return out;
    for (const auto& p : inventory.params)
      if (spec.method == "full" || is_bias(p.name)) out.push_back(p.name);
    return out;
  }

  AdapterResult apply(CausalLM& model, const AdapterSpec& spec,
                      const std::vector<std::string>& modules) const override {
    AdapterResult result;
    if (spec.method == "bitfit" || spec.method == "full") {
      for (auto& p : model.named_parameters()) {
        if (spec.method == "full" || is_bias(p.key())) {
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
    options.r = spec.integer("r");
    options.alpha = spec.real("alpha");
    options.dropout = spec.real("dropout");
    options.use_rslora = spec.flag("use_rslora");
    options.dora = spec.method == "dora";
    options.float32_math = spec.text("compute_dtype") == "float32";
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
