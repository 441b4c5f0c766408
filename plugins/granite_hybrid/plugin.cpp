// Architecture plugin for IBM Granite 4.0-H (transformers GraniteMoeHybridForCausalLM).
#include <torch/torch.h>
#include <torch/version.h>

#include "builder.hpp"
#include "peftfw/blocks/plugin.hpp"
#include "gguf_layout.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/nn/param_init.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/registrar.hpp"

namespace peftfw::granite {
namespace {

class GranitePlugin final : public blocks::BlockArchitecture {
 public:
  std::string id() const override { return "granite_hybrid"; }
  std::vector<std::string> model_types() const override { return {"granitemoehybrid"}; }

  std::shared_ptr<blocks::HybridLM> make(const io::JsonConfig& json) const override {
    return build_granite(parse_config(json));
  }

  // Granite 4.0's role tokens (the study's template, §1.3).
  std::vector<data::ChatFormat> chat_formats() const override {
    return {{"granite", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>\n",
             "Granite 4.0 role tokens"}};
  }

  std::optional<GgufLayout> gguf_layout(const io::JsonConfig& json) const override {
    return gguf_layout_of(json);
  }
};

void register_granite(PluginRegistrar& registrar) {
  registrar.add_architecture(std::make_shared<GranitePlugin>());
}

}  // namespace
}  // namespace peftfw::granite

PEFTFW_DEFINE_PLUGIN("granite_hybrid", "architecture", "0.1.0",
                     "IBM Granite 4.0-H hybrid Mamba-2/attention (model_type granitemoehybrid)",
                     peftfw::granite::register_granite)
