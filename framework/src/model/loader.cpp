// From a recipe's [model] section or a checkpoint folder to a built model.
#include "peftfw/model/loader.hpp"

#include <torch/torch.h>

#include <map>
#include <set>

#include "peftfw/error.hpp"
#include "peftfw/io/safetensors.hpp"
#include "peftfw/io/tensor_bridge.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/plugin/registry.hpp"
#include "peftfw/recipe/recipe.hpp"

namespace fs = std::filesystem;

namespace peftfw {

ModelSource model_source_from_recipe(const recipe::Recipe& r) {
  ModelSource s;
  if (r.has_value("model", "path")) s.dir = r.get_path("model", "path");
  if (r.has_value("model", "config")) s.config_file = r.get_path("model", "config");
  if (r.has_value("model", "config_inline")) s.inline_config = r.get_table_json("model", "config_inline");
  s.architecture = r.get_string("model", "architecture");
  s.random_init = r.get_string("model", "init") == "random";
  s.seed = static_cast<uint64_t>(r.get_int("model", "seed"));
  s.dtype = r.get_string("model", "dtype");
  const auto device = r.get_string("model", "device");
  s.device = device == "auto" ? (torch::cuda::is_available() ? "cuda" : "cpu") : device;
  if (!s.random_init && s.dir.empty())
    throw InputError(r.source_name() +
                     ": [model] path is not set; give an HF checkpoint folder (model.path=DIR), "
                     "or set [model] init = \"random\" with a config");
  return s;
}

io::JsonConfig read_model_config(const ModelSource& s) {
  // Precedence: a checkpoint folder, then an explicit config file, then the inline table.
  if (!s.dir.empty()) {
    const auto file = s.dir / "config.json";
    if (!fs::exists(file))
      throw InputError(s.dir.string() + ": no config.json in this folder; [model] path must be an "
                       "HF checkpoint folder (config.json + *.safetensors)");
    return io::JsonConfig::load(file.string());
  }
  if (!s.config_file.empty()) return io::JsonConfig::load(s.config_file.string());
  if (!s.inline_config.is_null() && !s.inline_config.empty())
    return io::JsonConfig::parse(s.inline_config.dump(), "[model.config_inline]");
  throw InputError("[model]: no model config; set [model] path, config or config_inline");
}

std::shared_ptr<ArchitecturePlugin> find_architecture(const io::JsonConfig& config,
                                                      const std::string& architecture) {
  auto& registry = PluginRegistry::instance();
  if (architecture != "auto") return registry.architecture(architecture);
  return registry.architecture_for_model_type(config.require_string("model_type"));
}

LoadedModel load_model(const ModelSource& s) {
  auto config = read_model_config(s);
  LoadedModel out;
  out.architecture = find_architecture(config, s.architecture);
  out.config_json = config.raw().dump(2) + "\n";
  BuildOptions options;
  options.dtype = s.dtype;
  options.device = s.device;
  options.random_init = s.random_init;
  options.seed = s.seed;
  if (s.random_init) {
    out.model = out.architecture->build(config, options);
  } else {
    options.dtype = "float32";  // load in float32, then cast once
    options.device = "cpu";
    out.model = out.architecture->build(config, options);
    load_weights(*out.model, s.dir);
    torch::Dtype dtype = s.dtype == "bfloat16" ? torch::kBFloat16
                         : s.dtype == "float16" ? torch::kFloat16
                                                : torch::kFloat32;
    out.model->to(torch::Device(s.device), dtype);
  }
  return out;
}

void load_weights(CausalLM& model, const fs::path& dir) {
  auto ckpt = io::Checkpoint::open(dir.string());
  const auto& inv = model.inventory();
  std::set<std::string> optional(inv.optional_checkpoint_keys.begin(),
                                 inv.optional_checkpoint_keys.end());
  std::set<std::string> used;
  std::vector<std::string> missing, wrong_shape, wrong_dtype, non_finite;
  torch::NoGradGuard no_grad;
  // A tensor may be stored under an alias the architecture accepts (e.g. a legacy name), or
  // where the architecture stores it (renamed, or one key per slice of its first dimension).
  std::map<std::string, std::string> alias_of;
  for (const auto& [alias, target] : inv.checkpoint_aliases) alias_of.emplace(target, alias);
  std::map<std::string, const std::vector<std::string>*> stored_as;
  for (const auto* list : {&inv.params, &inv.buffers})
    for (const auto& d : *list)
      if (!d.stored_as.empty()) stored_as[d.name] = &d.stored_as;
  auto keys_of = [&](const std::string& name) -> std::vector<std::string> {
    if (ckpt.has(name)) return {name};
    if (auto a = alias_of.find(name); a != alias_of.end() && ckpt.has(a->second)) return {a->second};
    if (auto s = stored_as.find(name); s != stored_as.end()) {
      bool all = true;
      for (const auto& k : *s->second) all = all && ckpt.has(k);
      if (all) return *s->second;
    }
    return {};
  };
  auto load_one = [&](const std::string& param, torch::Tensor& target) {
    const auto keys = keys_of(param);
    if (keys.empty()) {
      auto s = stored_as.find(param);
      if (s == stored_as.end()) {
        missing.push_back(param);
        return;
      }
      // Name the stored keys that are absent; the present ones belong to this tensor (not "unexpected").
      std::vector<std::string> absent;
      for (const auto& k : *s->second) {
        if (ckpt.has(k)) used.insert(k);
        else absent.push_back(k);
      }
      std::string list;
      for (size_t i = 0; i < absent.size() && i < 4; ++i) list += (i ? ", " : "") + absent[i];
      if (absent.size() > 4) list += ", ... (" + std::to_string(absent.size()) + " keys)";
      missing.push_back(param + " (stored as " + list + ")");
      return;
    }
    // One key holds the whole tensor; several hold equal slices of it in order (stored_slices).
    auto want = target.sizes().vec();
    std::vector<int64_t> sliced;
    if (keys.size() > 1) {
      sliced = stored_slices(want, static_cast<int64_t>(keys.size()));
      if (sliced.empty()) {
        wrong_shape.push_back(param + ": stored as " + std::to_string(keys.size()) + " slices, which do not divide " +
                              io::shape_to_string(want));
        return;
      }
      want.assign(sliced.begin() + 1, sliced.end());
    }
    // The slices of a stacked tensor are claimed by it whatever their state (not "unexpected").
    if (keys.size() > 1) used.insert(keys.begin(), keys.end());
    std::vector<torch::Tensor> values;
    for (const auto& name : keys) {
      auto view = ckpt.view(name);
      const auto where = name + " (" + ckpt.file_of(name).path() + ")";
      if (view.shape != want) {
        wrong_shape.push_back(name + ": expected " + io::shape_to_string(want) + ", found " +
                              io::shape_to_string(view.shape));
        return;
      }
      used.insert(name);
      // copy_ would silently turn integers into floats: a float parameter needs a float tensor.
      if (target.is_floating_point() && !io::is_floating_point(view.dtype)) {
        wrong_dtype.push_back(where + ": stored as " + io::dtype_name(view.dtype) +
                              ", expected a floating-point type (F32, BF16, F16 or F64) for this " +
                              io::dtype_label(target) + " parameter");
        return;
      }
      auto value = io::to_tensor(view, name);
      // One isfinite pass per tensor: NaN or Inf weights make every logit NaN downstream.
      const auto bad = io::count_non_finite(value);
      if (bad.any()) {
        non_finite.push_back(where + ": " + io::describe_non_finite(bad));
        return;
      }
      values.push_back(std::move(value));
    }
    if (values.size() == 1) {
      target.copy_(values.front());
    } else {
      auto slices = target.view(sliced);
      for (size_t i = 0; i < values.size(); ++i) slices[static_cast<int64_t>(i)].copy_(values[i]);
    }
  };
  for (auto& p : model.named_parameters()) load_one(p.key(), p.value());
  for (auto& b : model.named_buffers()) load_one(b.key(), b.value());
  std::vector<std::string> unexpected;
  auto ignored = [&](const std::string& n) {
    for (const auto& prefix : inv.ignored_checkpoint_prefixes)
      if (n.compare(0, prefix.size(), prefix) == 0) return true;
    return false;
  };
  for (const auto& n : ckpt.names())
    if (!used.count(n) && !optional.count(n) && !ignored(n)) unexpected.push_back(n);
  if (missing.empty() && wrong_shape.empty() && unexpected.empty() && wrong_dtype.empty() &&
      non_finite.empty())
    return;

  const bool structural = !missing.empty() || !wrong_shape.empty() || !unexpected.empty();
  std::string msg =
      ckpt.path() + (structural ? ": checkpoint does not match the model built from its config"
                                : ": checkpoint holds tensors peftfw refuses to load");
  auto list = [&](const char* what, const std::vector<std::string>& items) {
    if (items.empty()) return;
    msg += std::string("\n  ") + what + " (" + std::to_string(items.size()) + "):";
    for (size_t i = 0; i < items.size() && i < 20; ++i) msg += "\n    " + items[i];
    if (items.size() > 20) msg += "\n    ... and " + std::to_string(items.size() - 20) + " more";
  };
  list("tensors with the wrong shape", wrong_shape);
  list("missing tensors", missing);
  list("unexpected tensors", unexpected);
  list("integer tensors where float weights belong", wrong_dtype);
  list("tensors with non-finite values (NaN/Inf)", non_finite);
  if (structural) msg += "\n  Check that config.json belongs to these weights.";
  if (!wrong_dtype.empty())
    msg += "\n  An integer tensor in place of a weight is a conversion or export bug; re-export "
           "the checkpoint with float tensors.";
  if (!non_finite.empty())
    msg += "\n  Non-finite weights make every output NaN: the file is damaged or was saved after "
           "training diverged; use an earlier or re-exported copy.";
  throw InputError(msg);
}

}  // namespace peftfw
