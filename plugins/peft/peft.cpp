// Persistence plugin "peft": adapter folders that HF PEFT loads with
// PeftModel.from_pretrained, plus the co-trained SSM core tensors that PEFT's
// own save drops (ssm_core_params.safetensors) and a manifest. Also reads
// adapter folders written by PEFT (LoRA and DoRA).
#include <torch/torch.h>
#include <torch/version.h>

#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "adapter_config.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/io/safetensors.hpp"
#include "peftfw/io/tensor_bridge.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/fingerprint.hpp"
#include "peftfw/model/loader.hpp"
#include "peftfw/adapters/setup.hpp"
#include "peftfw/plugin/adapter.hpp"
#include "peftfw/plugin/persistence.hpp"
#include "peftfw/plugin/registrar.hpp"
#include "peftfw/plugin/registry.hpp"

namespace fs = std::filesystem;

namespace peftfw::peft {
namespace {

constexpr const char* kPrefix = "base_model.model.";
constexpr const char* kAdapterFile = "adapter_model.safetensors";
constexpr const char* kConfigFile = "adapter_config.json";
constexpr const char* kSsmFile = "ssm_core_params.safetensors";
constexpr const char* kManifestFile = "peftfw_manifest.json";
// The tensors a method adds outside adapted modules (a learned state, a sparse delta), under their
// full names; the manifest's method_options rebuild the method that reads them.
constexpr const char* kMethodFile = "method_tensors.safetensors";
// The method's warm-up result (AdapterSpec::state), for [adapter] init_from.
constexpr const char* kMethodStateFile = "method_state.safetensors";

nlohmann::ordered_json to_json(const recipe::Value& v) {
  return std::visit([](const auto& x) { return nlohmann::ordered_json(x); }, v);
}

recipe::Value from_json(const nlohmann::json& j, const std::string& where) {
  if (j.is_boolean()) return j.get<bool>();
  if (j.is_number_integer()) return j.get<std::int64_t>();
  if (j.is_number()) return j.get<double>();
  if (j.is_string()) return j.get<std::string>();
  if (j.is_array()) {
    std::vector<std::string> out;
    for (const auto& e : j) {
      if (!e.is_string()) throw InputError(where + ": expected a list of strings, found " + j.dump());
      out.push_back(e.get<std::string>());
    }
    return out;
  }
  throw InputError(where + ": expected a boolean, number, string or list of strings, found " + j.dump());
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The layer-relative names ("mamba.in_proj") of the adapted modules when, read
// with PEFT's suffix rule, they select exactly the adapted set; else full names.
std::vector<std::string> target_modules_for(const CausalLM& model,
                                            const std::vector<std::string>& adapted) {
  std::set<std::string> local;
  for (const auto& name : adapted) {
    auto pos = name.find(".layers.");
    if (pos == std::string::npos) return adapted;
    auto dot = name.find('.', pos + 8);
    if (dot == std::string::npos) return adapted;
    local.insert(name.substr(dot + 1));
  }
  std::set<std::string> want(adapted.begin(), adapted.end()), got;
  for (const auto& m : model.inventory().modules)
    for (const auto& l : local)
      if (m.name == l || ends_with(m.name, "." + l)) got.insert(m.name);
  if (got != want) return adapted;
  return {local.begin(), local.end()};
}

// HF PEFT (0.17 and later, checked with 0.21) refuses LoRA on `out_proj` and `conv1d` for these
// model types, because transformers' fused Mamba kernel reads those weights directly
// (peft/tuners/tuners_utils.py, _check_lora_target_modules_mamba): PeftModel.from_pretrained
// raises ValueError on such a folder. peftfw's LoRA goes through every projection, so it
// writes the folder anyway and says so.
// transformers' Mamba-1 mixers (mamba, falcon_mamba, jamba; 5.17) multiply by dt_proj.weight
// directly, on every path, and their fused CUDA training path reads x_proj.weight too: PEFT loads a
// LoRA on those layers without a word, and transformers' forward leaves it out.
std::optional<std::string> transformers_ignoring(const SaveRequest& req) {
  static const std::set<std::string> kTypes = {"mamba", "falcon_mamba", "jamba"};
  std::string model_type;
  try {
    model_type = nlohmann::json::parse(req.config_json).value("model_type", "");
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;
  }
  if (!kTypes.count(model_type)) return std::nullopt;
  bool dt = false, x = false;
  for (const auto& m : req.adapted_modules) {
    const auto leaf = m.substr(m.rfind('.') + 1);
    dt = dt || leaf == "dt_proj";
    x = x || leaf == "x_proj";
  }
  if (!dt && !x) return std::nullopt;
  std::string msg = "transformers' Mamba-1 mixer (model_type '" + model_type + "') ";
  if (dt) msg += "multiplies by dt_proj.weight directly, so PEFT loads the dt_proj LoRA without error but it "
                 "changes nothing in transformers' forward";
  if (x) msg += std::string(dt ? "; " : "") + "its fused CUDA training path also reads x_proj.weight directly";
  return msg + ". The \"merged\" format gives a checkpoint transformers runs with the adapter applied.";
}

std::optional<std::string> peft_refusal(const SaveRequest& req) {
  static const std::set<std::string> kTypes = {"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"};
  std::string model_type;
  try {
    model_type = nlohmann::json::parse(req.config_json).value("model_type", "");
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;
  }
  if (!kTypes.count(model_type)) return std::nullopt;
  std::set<std::string> refused;
  for (const auto& m : req.adapted_modules) {
    const auto leaf = m.substr(m.rfind('.') + 1);
    if (leaf == "out_proj" || leaf == "conv1d") refused.insert(leaf);
  }
  if (refused.empty()) return std::nullopt;
  std::string names;
  for (const auto& r : refused) names += (names.empty() ? "" : ", ") + r;
  return "HF PEFT refuses LoRA on " + names + " for model_type '" + model_type +
         "' (PeftModel.from_pretrained raises ValueError: \"Module '" + *refused.begin() +
         "' is incompatible with Mamba-based models\"), because transformers' fused Mamba kernel "
         "bypasses those layers. The folder is complete: peftfw forward/eval/run init_from load it, "
         "and the \"merged\" format gives a checkpoint transformers loads with the adapter applied.";
}

class PeftFormat final : public PersistencePlugin {
 public:
  std::string id() const override { return "peft"; }
  bool can_load() const override { return true; }

  void save(const SaveRequest& req, const fs::path& dir) const override {
    TORCH_CHECK(req.model && req.adapter, "peft save needs a model and an adapter spec");
    auto& model = *req.model;
    const auto& spec = *req.adapter;
    // The LoRA-style spec of the module adapters: the method's own, or the one it wraps modules with.
    std::optional<AdapterSpec> wrapped;
    if (spec.method != "lora" && spec.method != "dora" && spec.method != kNoAdapter)
      wrapped = PluginRegistry::instance().adapter_for_method(spec.method)->module_adapter_spec(spec);
    const AdapterSpec& lspec = wrapped ? *wrapped : spec;
    if (lspec.method != "lora" && lspec.method != "dora" && !req.adapted_modules.empty())
      throw InputError("format 'peft' stores LoRA/DoRA adapters; method '" + spec.method +
                       "' has none (use format 'merged')");
    auto params = model.named_parameters();
    std::map<std::string, torch::Tensor> adapter_tensors, ssm_tensors;
    for (const auto& module : req.adapted_modules) {
      for (const char* leaf : {".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"}) {
        const auto name = module + leaf;
        if (auto* p = params.find(name)) adapter_tensors[kPrefix + name] = p->detach().to(torch::kFloat32);
      }
    }
    for (const auto& name : req.ssm_tensors) {
      auto* p = params.find(name);
      if (!p) throw RuntimeError("SSM tensor '" + name + "' is not a parameter of the model");
      ssm_tensors[name] = p->detach().to(torch::kFloat32);
    }
    std::map<std::string, torch::Tensor> method_tensors, method_state;
    std::vector<std::string> method_names;
    for (const auto& [name, t] : req.method_tensors) {
      method_tensors[name] = t.detach().to(torch::kCPU, torch::kFloat32).contiguous();
      method_names.push_back(name);
    }
    for (const auto& [name, t] : req.method_state) method_state[name] = t.detach().to(torch::kCPU, torch::kFloat32).contiguous();

    // Another method (SSM tensors only): PEFT's LoraConfig defaults around an empty adapter.
    const bool lora_like = lspec.method == "lora" || lspec.method == "dora";
    nlohmann::ordered_json cfg;  // only keys PEFT >= 0.13 accepts
    cfg["alpha_pattern"] = nlohmann::json::object();
    cfg["auto_mapping"] = nullptr;
    cfg["base_model_name_or_path"] = req.base_model_name.empty() ? nlohmann::json(nullptr)
                                                                 : nlohmann::json(req.base_model_name);
    cfg["bias"] = "none";
    cfg["fan_in_fan_out"] = false;
    cfg["inference_mode"] = true;
    cfg["init_lora_weights"] = true;
    cfg["layer_replication"] = nullptr;
    cfg["layers_pattern"] = nullptr;
    cfg["layers_to_transform"] = nullptr;
    cfg["loftq_config"] = nlohmann::json::object();
    cfg["lora_alpha"] = lora_like ? lspec.real("alpha") : 8.0;
    cfg["lora_dropout"] = lora_like ? lspec.real("dropout") : 0.0;
    cfg["megatron_config"] = nullptr;
    cfg["megatron_core"] = "megatron.core";
    cfg["modules_to_save"] = nullptr;
    cfg["peft_type"] = "LORA";
    cfg["r"] = lora_like ? lspec.integer("r") : int64_t{8};
    cfg["rank_pattern"] = nlohmann::json::object();
    cfg["revision"] = nullptr;
    cfg["target_modules"] = target_modules_for(model, req.adapted_modules);
    cfg["task_type"] = "CAUSAL_LM";
    cfg["use_dora"] = lspec.method == "dora";
    cfg["use_rslora"] = lora_like && lspec.flag("use_rslora");

    nlohmann::ordered_json manifest;
    manifest["format"] = "peftfw-adapter";
    manifest["format_version"] = 1;
    manifest["method"] = spec.method;
    manifest["adapted_modules"] = req.adapted_modules;
    manifest["ssm_tensors"] = req.ssm_tensors;
    manifest["ssm_file"] = req.ssm_tensors.empty() ? nlohmann::json(nullptr) : nlohmann::json(kSsmFile);
    // The method's settings, so that a reader rebuilds it (the method's own tensors need them).
    nlohmann::ordered_json options = nlohmann::ordered_json::object();
    for (const auto& [key, value] : spec.options) options[key] = to_json(value);
    manifest["method_options"] = options;
    manifest["method_tensors"] = method_names;
    manifest["method_file"] = method_names.empty() ? nlohmann::json(nullptr) : nlohmann::json(kMethodFile);
    manifest["method_state_file"] = method_state.empty() ? nlohmann::json(nullptr) : nlohmann::json(kMethodStateFile);
    // The base's fingerprint (peftfw forward/eval/verify-ssm compare it with the base they are
    // given): from the trainer when it sets one, else from the source checkpoint folder.
    std::optional<BaseFingerprint> base = req.base_fingerprint;
    if (!base && !req.base_model_dir.empty()) {
      ModelSource source;
      source.dir = req.base_model_dir;
      base = fingerprint_base(source);
    }
    manifest["base"] = base
                           ? nlohmann::ordered_json(base_manifest_entry(*base, req.base_model_name))
                           : nlohmann::ordered_json(nullptr);
    manifest["note"] =
        method_names.empty()
            ? "adapter_model.safetensors + adapter_config.json load with PEFT; the co-trained SSM core "
              "tensors are in ssm_core_params.safetensors under their checkpoint names (PEFT does not "
              "save them): load them into the base model too, or use the 'merged' format."
            : "method '" + spec.method + "' keeps its own tensors in method_tensors.safetensors (settings in "
              "method_options), which PEFT cannot read: peftfw forward/eval/generate and [adapter] init_from "
              "load this folder whole. adapter_model.safetensors + adapter_config.json hold only its LoRA "
              "part, if any, for PEFT.";

    if (auto refusal = peft_refusal(req)) {
      // The folder is still complete and valid; say who cannot read it, and what can.
      std::cerr << "peftfw: note: " << dir.string() << ": " << *refusal << "\n";
      manifest["consumers_refusing"] = nlohmann::ordered_json::array({*refusal});
    }
    if (auto ignoring = transformers_ignoring(req)) {
      std::cerr << "peftfw: note: " << dir.string() << ": " << *ignoring << "\n";
      manifest["consumers_ignoring"] = nlohmann::ordered_json::array({*ignoring});
    }

    write_folder_atomic(dir, [&](const fs::path& tmp) {
      io::save_tensors((tmp / kAdapterFile).string(), adapter_tensors, {{"format", "pt"}});
      if (!ssm_tensors.empty())
        io::save_tensors((tmp / kSsmFile).string(), ssm_tensors,
                         {{"format", "pt"}, {"producer", "peftfw"}});
      if (!method_tensors.empty())
        io::save_tensors((tmp / kMethodFile).string(), method_tensors,
                         {{"format", "pt"}, {"producer", "peftfw"}, {"method", spec.method}});
      if (!method_state.empty())
        io::save_tensors((tmp / kMethodStateFile).string(), method_state,
                         {{"format", "pt"}, {"producer", "peftfw"}, {"method", spec.method}});
      io::write_file_atomic((tmp / kConfigFile).string(), cfg.dump(2) + "\n");
      io::write_file_atomic((tmp / kManifestFile).string(), manifest.dump(2) + "\n");
    });
  }

  LoadedAdapter load(CausalLM& model, const fs::path& dir) const override {
    const auto cfg_path = dir / kConfigFile;
    if (!fs::exists(cfg_path))
      throw InputError(dir.string() + ": not an adapter folder (no " + kConfigFile + ")");
    auto cfg = io::JsonConfig::load(cfg_path.string());
    const AdapterConfig parsed = parse_adapter_config(cfg);
    AdapterSpec spec;
    spec.method = parsed.method;
    spec.options["r"] = parsed.r;
    spec.options["alpha"] = parsed.alpha;
    spec.options["use_rslora"] = parsed.use_rslora;
    spec.options["dropout"] = 0.0;  // inference
    spec.options["compute_dtype"] = std::string("model");
    // A peftfw folder names its method and settings in the manifest: a method other than LoRA/DoRA
    // (its own tensors in method_tensors.safetensors) is rebuilt from them.
    std::vector<std::string> method_tensor_names;
    const auto manifest_path = dir / kManifestFile;
    if (fs::exists(manifest_path)) {
      nlohmann::json manifest;
      try {
        manifest = nlohmann::json::parse(io::read_text_file(manifest_path.string()));
      } catch (const nlohmann::json::exception& e) {
        throw InputError(manifest_path.string() + ": not valid JSON (" + e.what() + ")");
      }
      if (manifest.contains("method_options") && manifest.contains("method") && manifest["method"].is_string() &&
          manifest["method"].get<std::string>() != parsed.method) {
        const auto method = manifest["method"].get<std::string>();
        std::map<std::string, recipe::Value> values;
        for (const auto& [key, value] : manifest["method_options"].items())
          values[key] = from_json(value, manifest_path.string() + ": method_options." + key);
        try {
          spec = adapter_spec(method, values);
        } catch (const InputError& e) {
          throw InputError(manifest_path.string() + ": the adapter's method '" + method +
                           "' cannot be rebuilt here: " + e.what());
        }
      }
      if (manifest.contains("method_tensors") && manifest["method_tensors"].is_array())
        for (const auto& n : manifest["method_tensors"])
          if (n.is_string()) method_tensor_names.push_back(n.get<std::string>());
    }

    const auto file = dir / kAdapterFile;
    if (!fs::exists(file))
      throw InputError(dir.string() + ": no " + kAdapterFile + " (legacy adapter_model.bin is "
                       "not supported; re-save it with safe_serialization=True)");
    auto st = io::Checkpoint::open(file.string());
    std::set<std::string> modules;
    std::vector<std::string> unknown;
    for (const auto& key : st.names()) {
      std::string k = key;
      if (k.rfind(kPrefix, 0) != 0) {
        unknown.push_back(key);
        continue;
      }
      k = k.substr(std::string(kPrefix).size());
      bool ok = false;
      for (const char* leaf : {".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"})
        if (ends_with(k, leaf)) {
          modules.insert(k.substr(0, k.size() - std::string(leaf).size()));
          ok = true;
        }
      if (!ok) unknown.push_back(key);
    }
    if (!unknown.empty()) {
      std::string list;
      for (size_t i = 0; i < unknown.size() && i < 10; ++i) list += "\n  " + unknown[i];
      throw InputError(file.string() + ": " + std::to_string(unknown.size()) +
                       " tensor(s) are not LoRA/DoRA weights peftfw understands:" + list);
    }
    // PEFT attaches by target_modules, not by the tensors: the two must agree.
    check_target_modules(cfg.raw(), cfg_path.string(), modules, file.string());
    std::vector<std::string> module_list(modules.begin(), modules.end());
    auto adapter = PluginRegistry::instance().adapter_for_method(spec.method);
    spec.for_loading = true;
    adapter->apply(model, spec, module_list);

    torch::NoGradGuard no_grad;
    auto params = model.named_parameters();
    std::vector<std::string> problems, bad_values;
    // A float parameter needs a float tensor (copy_ would cast integers silently) and finite
    // values.
    auto checked = [&](const io::TensorView& view, const torch::Tensor& param,
                       const std::string& where) -> std::optional<torch::Tensor> {
      if (!io::is_floating_point(view.dtype)) {
        bad_values.push_back(where + ": stored as " + io::dtype_name(view.dtype) +
                             ", expected a floating-point type (F32, BF16, F16 or F64) for this " +
                             io::dtype_label(param) + " parameter");
        return std::nullopt;
      }
      auto value = io::to_tensor(view, where);
      const auto bad = io::count_non_finite(value);
      if (bad.any()) {
        bad_values.push_back(where + ": " + io::describe_non_finite(bad));
        return std::nullopt;
      }
      return value;
    };
    for (const auto& key : st.names()) {
      const auto name = key.substr(std::string(kPrefix).size());
      auto* p = params.find(name);
      if (!p) {
        problems.push_back(name + ": no such parameter after attaching the adapter");
        continue;
      }
      auto view = st.view(key);
      if (view.shape != p->sizes().vec()) {
        problems.push_back(name + ": expected " + io::shape_to_string(p->sizes().vec()) +
                           ", found " + io::shape_to_string(view.shape));
        continue;
      }
      if (auto value = checked(view, *p, file.string() + ": tensor '" + key + "'"))
        p->copy_(*value);
    }
    LoadedAdapter out;
    out.method = spec.method;
    out.modules = module_list;
    if (!method_tensor_names.empty()) {
      const auto method_file = dir / kMethodFile;
      if (!fs::exists(method_file))
        throw InputError(dir.string() + ": the manifest lists " + std::to_string(method_tensor_names.size()) +
                         " tensor(s) of method '" + spec.method + "' but " + kMethodFile + " is missing");
      auto mt = io::Checkpoint::open(method_file.string());
      const auto stored = mt.names();
      const std::set<std::string> in_file(stored.begin(), stored.end());
      for (const auto& name : method_tensor_names) {
        auto* p = params.find(name);
        if (!in_file.count(name)) {
          problems.push_back(name + " (" + kMethodFile + "): listed in the manifest but not in the file");
          continue;
        }
        if (!p) {
          problems.push_back(name + " (" + kMethodFile + "): method '" + spec.method +
                             "' has no such tensor on this model");
          continue;
        }
        auto view = mt.view(name);
        if (view.shape != p->sizes().vec()) {
          problems.push_back(name + " (" + kMethodFile + "): expected " + io::shape_to_string(p->sizes().vec()) +
                             ", found " + io::shape_to_string(view.shape));
          continue;
        }
        if (auto value = checked(view, *p, method_file.string() + ": tensor '" + name + "'")) p->copy_(*value);
        out.added_tensors.push_back(name);
      }
    }
    const auto ssm_file = dir / kSsmFile;
    if (fs::exists(ssm_file)) {
      auto ssm = io::Checkpoint::open(ssm_file.string());
      for (const auto& name : ssm.names()) {
        auto* p = params.find(name);
        if (!p) {
          problems.push_back(name + " (" + kSsmFile + "): no such parameter in the model");
          continue;
        }
        auto view = ssm.view(name);
        if (view.shape != p->sizes().vec()) {
          problems.push_back(name + " (" + kSsmFile + "): expected " +
                             io::shape_to_string(p->sizes().vec()) + ", found " +
                             io::shape_to_string(view.shape));
          continue;
        }
        if (auto value = checked(view, *p, ssm_file.string() + ": tensor '" + name + "'"))
          p->copy_(*value);
        out.ssm_tensors.push_back(name);
      }
    }
    if (!problems.empty()) {
      std::string list;
      for (const auto& p : problems) list += "\n  " + p;
      throw InputError(dir.string() + ": adapter does not fit this model:" + list);
    }
    if (!bad_values.empty()) {
      std::string list;
      for (const auto& b : bad_values) list += "\n  " + b;
      throw InputError(dir.string() + ": adapter tensors peftfw refuses to load:" + list +
                       "\n  NaN/Inf values make every output NaN (the run that saved them "
                       "diverged, or the file is damaged); an integer tensor in place of a weight "
                       "is an export bug. Use an earlier checkpoint or re-export the adapter.");
    }
    return out;
  }
};

void register_peft(PluginRegistrar& registrar) {
  registrar.add_persistence(std::make_shared<PeftFormat>());
}

}  // namespace
}  // namespace peftfw::peft

PEFTFW_DEFINE_PLUGIN("peft", "persistence", "0.1.0",
                     "HF PEFT adapter folders (LoRA/DoRA) plus the co-trained SSM tensors",
                     peftfw::peft::register_peft)
