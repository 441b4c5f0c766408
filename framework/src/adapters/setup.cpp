// Recipe [adapter]/[ssm] -> a planned and applied adapter.
#include "peftfw/adapters/setup.hpp"

#include <torch/torch.h>

#include <set>

#include "peftfw/error.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/plugin/registry.hpp"
#include "peftfw/recipe/recipe.hpp"

namespace peftfw {

AdapterRequest adapter_request_from_recipe(const recipe::Recipe& r) {
  AdapterRequest req;
  req.spec.method = r.get_string("adapter", "method");
  req.spec.r = r.get_int("adapter", "r");
  req.spec.alpha = r.get_float("adapter", "alpha");
  req.spec.dropout = r.get_float("adapter", "dropout");
  req.spec.use_rslora = r.get_bool("adapter", "use_rslora");
  req.spec.compute_dtype = r.get_string("adapter", "compute_dtype");
  req.spec.seed = static_cast<uint64_t>(r.get_int("adapter", "init_seed"));
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

namespace {
bool uses_targets(const std::string& method) { return method == "lora" || method == "dora"; }
}  // namespace

AdapterPlan plan_adapters(const ModelInventory& inv, const AdapterRequest& req) {
  AdapterPlan plan;
  std::vector<std::string> problems;  // targets and SSM groups are both reported
  bool targets_ok = true;
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
  if (uses_targets(req.spec.method) && targets_ok)
    plan.report = adapters::parameter_report(inv, plan.modules, req.spec.r, req.spec.method == "dora",
                                   req.ssm_groups);
  return plan;
}

AdapterResult apply_adapters(CausalLM& model, const AdapterRequest& req, const AdapterPlan& plan) {
  for (auto& p : model.parameters()) p.set_requires_grad(false);
  AdapterResult result;
  if (req.spec.method != "none")
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
