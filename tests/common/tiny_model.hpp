// A tiny float32 model of any registered architecture from an inline config, with random weights
// (A_log = log of U(0.5, 3.5), the rest N(0, 0.2^2)) from `seed`: what the adapter-method tests
// train, save and reload.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "peftfw/io/json_config.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/registry.hpp"

namespace peftfw::testing {

inline std::shared_ptr<CausalLM> tiny_random_model(const nlohmann::json& config, uint64_t seed) {
  const auto model_type = config.at("model_type").get<std::string>();
  auto parsed = io::JsonConfig::parse(config.dump(), model_type);
  BuildOptions o;
  o.dtype = "float32";
  auto model = PluginRegistry::instance().architecture_for_model_type(model_type)->build(parsed, o);
  torch::manual_seed(seed);
  torch::NoGradGuard ng;
  for (auto& p : model->named_parameters()) {
    if (p.key().find("A_log") != std::string::npos) p.value().copy_(torch::log(torch::rand_like(p.value()) * 3 + 0.5));
    else p.value().copy_(torch::randn_like(p.value()) * 0.2);
  }
  return model;
}

}  // namespace peftfw::testing
