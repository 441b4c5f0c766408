// Test tool: attach a LoRA/DoRA adapter to a checkpoint, give it non-zero
// weights (B is zero after a fresh init, which would make every round-trip
// test pass trivially), perturb the SSM core tensors, and save it through
// persistence plugins.
//   make_adapter MODEL_DIR OUT_DIR METHOD SEED FORMAT[,FORMAT] TARGET[,TARGET...]
#include <torch/torch.h>

#include <iostream>
#include <sstream>

#include "peftfw/adapters/setup.hpp"
#include "peftfw/error.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/loader.hpp"
#include "peftfw/plugin/persistence.hpp"
#include "peftfw/plugin/registry.hpp"

namespace {
std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::cerr << "usage: make_adapter MODEL_DIR OUT_DIR METHOD SEED FORMATS TARGETS\n";
    return 2;
  }
  try {
    peftfw::ModelSource source;
    source.dir = argv[1];
    auto loaded = peftfw::load_model(source);
    auto& model = *loaded.model;
    peftfw::AdapterRequest req;
    req.spec = peftfw::adapter_spec(argv[3], {{"r", std::int64_t{4}}, {"alpha", 8.0}, {"dropout", 0.0}});
    req.spec.seed = std::stoull(argv[4]);
    peftfw::recipe::TargetPattern pattern;
    pattern.names = split(argv[6]);
    req.targets.target_modules = pattern;
    req.ssm_groups = {"A_log", "D", "dt_bias"};
    auto plan = peftfw::plan_adapters(model.inventory(), req);
    auto result = peftfw::apply_adapters(model, req, plan);
    {
      torch::NoGradGuard ng;
      torch::manual_seed(req.spec.seed + 1);
      for (auto& p : model.named_parameters()) {
        if (!p.value().requires_grad()) continue;
        const auto& n = p.key();
        if (n.find("lora_B") != std::string::npos) p.value().normal_(0.0, 0.05);
        else if (n.find("lora_magnitude_vector") != std::string::npos) p.value().mul_(1.0 + 0.1 * torch::rand_like(p.value()));
        else if (n.find("lora_") == std::string::npos) p.value().add_(0.05 * torch::randn_like(p.value()));
      }
    }
    peftfw::SaveRequest save;
    save.model = &model;
    save.adapter = &req.spec;
    save.adapted_modules = result.adapted_modules;
    save.ssm_tensors = plan.ssm_tensors;
    save.base_model_dir = argv[1];
    save.base_model_name = argv[1];
    save.config_json = loaded.config_json;
    for (const auto& format : split(argv[5]))
      peftfw::PluginRegistry::instance().persistence(format)->save(
          save, std::filesystem::path(argv[2]) / format);
    std::cout << "adapted " << result.adapted_modules.size() << " modules, " << plan.ssm_tensors.size()
              << " SSM tensors\n";
    return 0;
  } catch (const peftfw::Error& e) {
    std::cerr << "make_adapter: " << e.what() << "\n";
    return e.exit_code();
  }
}
