// AdapterSpec's typed reads of a method's options.
#include "peftfw/plugin/adapter.hpp"

#include <torch/torch.h>

#include <stdexcept>

#include "peftfw/model/causal_lm.hpp"

namespace peftfw {
namespace {

template <typename T>
const T& option(const AdapterSpec& spec, const std::string& key, const char* type) {
  const auto it = spec.options.find(key);
  if (it == spec.options.end())
    throw std::logic_error("AdapterSpec: method '" + spec.method + "' has no option '" + key +
                           "' (its plugin reads a key it did not declare, or the spec was not made "
                           "from a recipe loaded with PluginRegistry::recipe_schema())");
  if (const T* value = std::get_if<T>(&it->second)) return *value;
  throw std::logic_error("AdapterSpec: option '" + key + "' of method '" + spec.method + "' is not " + type);
}

}  // namespace

std::int64_t AdapterSpec::integer(const std::string& key) const {
  return option<std::int64_t>(*this, key, "an integer");
}

double AdapterSpec::real(const std::string& key) const {
  const auto it = options.find(key);
  if (it != options.end())
    if (const auto* i = std::get_if<std::int64_t>(&it->second)) return static_cast<double>(*i);
  return option<double>(*this, key, "a number");
}

bool AdapterSpec::flag(const std::string& key) const { return option<bool>(*this, key, "a boolean"); }

std::string AdapterSpec::text(const std::string& key) const {
  return option<std::string>(*this, key, "a string");
}

}  // namespace peftfw

namespace peftfw {

std::map<std::string, torch::Tensor> AdapterPlugin::saved_tensors(CausalLM& model, const AdapterSpec& spec,
                                                                  const AdapterResult& applied) const {
  (void)spec;
  std::map<std::string, torch::Tensor> out;
  auto params = model.named_parameters();
  for (const auto& name : applied.added_tensors) {
    auto* p = params.find(name);
    if (!p) throw std::logic_error("adapter '" + id() + "': added tensor '" + name + "' is not a parameter of the model");
    out[name] = p->detach();
  }
  return out;
}

}  // namespace peftfw
