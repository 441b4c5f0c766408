// Recipe [adapter]/[ssm] -> a planned and applied adapter.
#include "peftfw/adapters/setup.hpp"

#include <torch/torch.h>

#include <set>
#include <type_traits>
#include <variant>

#include "peftfw/error.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/plugin/registry.hpp"
#include "peftfw/recipe/recipe.hpp"

namespace peftfw {

namespace {
// A plugin key's name in AdapterSpec::options: [adapter] keys by their own name, others "section.key".
std::string option_name(const recipe::SectionSpec& section, const recipe::KeySpec& key) {
  return section.name == "adapter" ? key.name : section.name + "." + key.name;
}
}  // namespace

AdapterRequest adapter_request_from_recipe(const recipe::Recipe& r) {
  AdapterRequest req;
  req.spec.method = r.get_string("adapter", "method");
  req.spec.seed = static_cast<uint64_t>(r.get_int("adapter", "init_seed"));
  if (req.spec.method != kNoAdapter) {
    const auto plugin = PluginRegistry::instance().adapter_for_method(req.spec.method);
    for (const auto& section : plugin->recipe_sections())
      for (const auto& key : section.keys)
        if (r.has_value(section.name, key.name))
          req.spec.options[option_name(section, key)] = r.get_value(section.name, key.name);
  }
  if (r.has_value("adapter", "target_modules"))
    req.targets.target_modules = r.get_pattern("adapter", "target_modules");
  if (r.has_value("adapter", "exclude_modules"))
    req.targets.exclude_modules = r.get_pattern("adapter", "exclude_modules");
  if (r.has_value("adapter", "roles")) req.targets.roles = r.get_strings("adapter", "roles");
  req.targets.on_unmatched = r.get_string("adapter", "on_unmatched");
  req.targets.source = r.source_name() + " [adapter]";
  req.ssm_groups = r.get_strings("ssm", "train");
  return req;
}

AdapterSpec adapter_spec(const std::string& method, const std::map<std::string, recipe::Value>& values) {
  AdapterSpec spec;
  spec.method = method;
  std::map<std::string, recipe::ValueType> declared;
  if (method != kNoAdapter)
    for (const auto& section : PluginRegistry::instance().adapter_for_method(method)->recipe_sections())
      for (const auto& key : section.keys) {
        const auto name = option_name(section, key);
        declared[name] = key.type;
        if (key.default_value) spec.options[name] = *key.default_value;
      }
  for (const auto& [name, value] : values) {
    const auto it = declared.find(name);
    if (it == declared.end()) throw InputError("adapter method '" + method + "' has no option '" + name + "'");
    const auto t = it->second;
    const bool ok = std::visit(
        [&](const auto& v) {
          using V = std::decay_t<decltype(v)>;
          if constexpr (std::is_same_v<V, bool>) return t == recipe::ValueType::kBoolean;
          else if constexpr (std::is_same_v<V, std::int64_t>) return t == recipe::ValueType::kInteger || t == recipe::ValueType::kFloat;
          else if constexpr (std::is_same_v<V, double>) return t == recipe::ValueType::kFloat;
          else if constexpr (std::is_same_v<V, std::string>) return t == recipe::ValueType::kString || t == recipe::ValueType::kPath || t == recipe::ValueType::kStringOrArray;
          else return t == recipe::ValueType::kStringArray || t == recipe::ValueType::kStringOrArray;
        },
        value);
    if (!ok)
      throw InputError("adapter method '" + method + "': option '" + name + "' must be a " + recipe::type_name(t));
    spec.options[name] = value;
  }
  return spec;
}

namespace {
bool uses_targets(const std::string& method) {
  return method != kNoAdapter && PluginRegistry::instance().adapter_method(method).attaches == AdapterAttach::kModules;
}
}  // namespace

AdapterPlan plan_adapters(const ModelInventory& inv, const AdapterRequest& req) {
  AdapterPlan plan;
  std::vector<std::string> problems;  // targets and SSM groups are both reported
  bool targets_ok = true;
  auto names_some = [](const std::optional<recipe::TargetPattern>& p) {
    return p && (p->is_regex ? !p->regex.empty() : !p->names.empty());
  };
  if (!uses_targets(req.spec.method) && req.spec.method != kNoAdapter &&
      (names_some(req.targets.target_modules) || names_some(req.targets.exclude_modules) ||
       !req.targets.roles.empty()))
    problems.push_back(req.targets.source + ": method '" + req.spec.method +
                       "' does not wrap modules, so target_modules, exclude_modules and roles have no effect; "
                       "remove them or set them to [] (or use a method that wraps the target modules)");
  if (uses_targets(req.spec.method)) {
    try {
      auto resolved = adapters::resolve_targets(inv, req.targets);
      plan.modules = resolved.modules;
      plan.warnings = resolved.warnings;
      plan.coverage = adapters::coverage_table(inv, plan.modules);
      if (!resolved.default_roles.empty()) {
        std::string roles;
        for (const auto& r : resolved.default_roles) roles += (roles.empty() ? "\"" : ", \"") + r + "\"";
        plan.coverage = "Default targets: [adapter] names no target_modules or roles, so every adaptable "
                        "projection " + inv.architecture + " lists is adapted:\n  roles = [" + roles +
                        "]\nSet target_modules or roles to choose.\n" + plan.coverage;
        plan.default_targets_used = true;
      }
    } catch (const InputError& e) {
      problems.push_back(e.what());
      targets_ok = false;
    }
  }
  std::set<std::string> known;
  for (const auto& g : inv.ssm_groups) known.insert(g.name);
  for (const auto& group : req.ssm_groups) {
    if (!known.count(group)) {
      std::string list;
      for (const auto& g : inv.ssm_groups) list += (list.empty() ? "" : ", ") + g.name;
      problems.push_back("[ssm] train: '" + group + "' is not an SSM parameter group of " + inv.architecture +
                         (list.empty() ? " (it has none)" : "; its groups are: " + list));
      continue;
    }
    for (const auto& p : inv.params)
      if (p.ssm_group == group) plan.ssm_tensors.push_back(p.name);
  }
  if (!problems.empty()) {
    std::string msg = problems[0];
    for (size_t i = 1; i < problems.size(); ++i) msg += "\n" + problems[i];
    throw InputError(msg);
  }
  if (!targets_ok) return plan;
  adapters::CountRule rule;
  if (req.spec.method == kNoAdapter) {
    plan.label = {"no adapter", ""};
    rule.name = "adapter";
  } else {
    const auto plugin = PluginRegistry::instance().adapter_for_method(req.spec.method);
    plan.label = plugin->label(req.spec);
    rule.name = plan.label.name;
    rule.settings = plan.label.settings;
    rule.added_per_module = [&](const ModuleDesc& m) { return plugin->added_parameters(req.spec, m); };
    rule.base_params = plugin->trained_base_parameters(req.spec, inv);
    rule.added_tensors = plugin->added_tensors(req.spec, inv);
  }
  plan.count = adapters::count_parameters(inv, plan.modules, rule, req.ssm_groups);
  if (req.spec.method != kNoAdapter || !req.ssm_groups.empty())
    plan.report = adapters::parameter_report(inv, plan.modules, rule, req.ssm_groups);
  return plan;
}

AdapterResult apply_adapters(CausalLM& model, const AdapterRequest& req, const AdapterPlan& plan) {
  for (auto& p : model.parameters()) p.set_requires_grad(false);
  AdapterResult result;
  if (req.spec.method != kNoAdapter)
    result = PluginRegistry::instance().adapter_for_method(req.spec.method)->apply(model, req.spec,
                                                                                   plan.modules);
  // SSM co-training: float32 master copies, whatever the model's dtype, so that small updates
  // (e.g. 2e-4 on a dt_bias of -4, below bf16's resolution there) are not rounded away.
  auto params = model.named_parameters();
  for (const auto& name : plan.ssm_tensors) {
    auto* p = params.find(name);
    if (!p) throw RuntimeError("SSM tensor '" + name + "' is not a parameter of the built model");
    torch::NoGradGuard no_grad;
    if (p->scalar_type() != torch::kFloat32) p->set_data(p->to(torch::kFloat32));
    if (!p->requires_grad()) result.trainable_params += p->numel();  // "full" already counted it
    p->set_requires_grad(true);
  }
  return result;
}

}  // namespace peftfw
