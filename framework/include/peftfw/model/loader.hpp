// Turning a recipe's [model] section (or a checkpoint folder) into a model:
// read the config, pick the architecture plugin, build, load weights.
#pragma once

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "peftfw/io/json_config.hpp"
#include "peftfw/plugin/architecture.hpp"

namespace peftfw {

namespace recipe {
class Recipe;
}

struct ModelSource {
  std::filesystem::path dir;          // HF checkpoint folder (config.json + safetensors)
  std::filesystem::path config_file;  // an explicit config.json (random init or planning)
  nlohmann::json inline_config;       // [model.config_inline]
  std::string architecture = "auto";  // plugin id, or "auto" = by config model_type
  bool random_init = false;
  uint64_t seed = 0;
  std::string dtype = "float32";
  std::string device = "cpu";
};

ModelSource model_source_from_recipe(const recipe::Recipe& recipe);

// The config.json the source describes. InputError when there is none.
io::JsonConfig read_model_config(const ModelSource& source);

std::shared_ptr<ArchitecturePlugin> find_architecture(const io::JsonConfig& config,
                                                      const std::string& architecture);

struct LoadedModel {
  std::shared_ptr<CausalLM> model;
  std::shared_ptr<ArchitecturePlugin> architecture;
  std::string config_json;  // the config the model was built from (written with merged output)
};

// Builds the model; loads the checkpoint's weights unless source.random_init.
LoadedModel load_model(const ModelSource& source);

// Copies a checkpoint folder's tensors into the model by name. Every model
// parameter must be present with the right shape (tied aliases excepted), a
// float parameter must be stored as a float type (never an integer one), every
// value must be finite (no NaN/Inf), and every checkpoint tensor must be used;
// otherwise InputError listing each offending tensor with its file.
void load_weights(CausalLM& model, const std::filesystem::path& dir);

}  // namespace peftfw
