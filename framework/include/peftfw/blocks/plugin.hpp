// The common part of an architecture plugin whose model is built from blocks: describe()
// builds it under nn::MetaScope (shapes, no storage) and returns its inventory; build()
// builds it, initialises it when asked and moves it to the device and dtype. A plugin
// supplies make(): its config parser and builder.
#pragma once

#include <torch/torch.h>

#include "peftfw/blocks/decoder.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/nn/param_init.hpp"
#include "peftfw/plugin/architecture.hpp"

namespace peftfw::blocks {

class BlockArchitecture : public ArchitecturePlugin {
 public:
  ModelInventory describe(const io::JsonConfig& json) const override {
    nn::MetaScope meta;
    return make(json)->inventory();
  }

  std::shared_ptr<CausalLM> build(const io::JsonConfig& json, const BuildOptions& options) const override {
    auto model = make(json);
    if (options.random_init) model->init_random(options.seed, json.get_float("initializer_range", 0.02));
    model->to(torch::Device(options.device), dtype_of(options.dtype));
    return model;
  }

 protected:
  // Parses and validates the config (InputError naming the field) and wires the blocks.
  virtual std::shared_ptr<HybridLM> make(const io::JsonConfig& json) const = 0;
};

}  // namespace peftfw::blocks
