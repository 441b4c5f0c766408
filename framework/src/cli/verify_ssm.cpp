// `peftfw verify-ssm ADAPTER --base MODEL`: did the adapter really carry
// trained SSM core tensors? (PEFT's save silently drops them; bf16 storage
// rounds small updates away.) Per tensor: share of elements changed and mean
// |delta| against the base checkpoint. Exit 1 when a claimed tensor is missing
// or identical to the base. The comparison only means something against the
// adapter's own base, so its recorded fingerprint is checked first: a warning,
// or a refusal under --strict.
#include <torch/torch.h>

#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/safetensors.hpp"
#include "peftfw/io/tensor_bridge.hpp"
#include "peftfw/model/fingerprint.hpp"
#include "peftfw/model/loader.hpp"

namespace fs = std::filesystem;

namespace peftfw::cli {

namespace {

// The base as a ModelSource for its fingerprint: the folder itself, or the folder
// holding the given .safetensors / index file. nullopt when it has no config.json.
std::optional<ModelSource> base_source(const std::string& base) {
  ModelSource source;
  source.dir = fs::is_directory(base) ? fs::path(base) : fs::path(base).parent_path();
  if (source.dir.empty()) source.dir = ".";
  if (!fs::exists(source.dir / "config.json")) return std::nullopt;
  return source;
}

}  // namespace

int cmd_verify_ssm(const Args& args) {
  std::string adapter, base;
  bool strict = false;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "-h" || args[i] == "--help") {
      std::cout << "Usage: peftfw verify-ssm ADAPTER_DIR --base MODEL_DIR [--strict]\n"
                   "  For every SSM core tensor the adapter carries (ssm_core_params.safetensors):\n"
                   "  share of elements changed and mean |delta| versus the base checkpoint; for the\n"
                   "  tensors of an SSM method (sdt, state_offset, initial_state: method_tensors.safetensors),\n"
                   "  share of nonzero entries (they start at zero). Exits 1 if one is all zero.\n"
                   "  Exits 1 if a tensor the adapter claims is missing or identical to the base.\n"
                   "  The adapter's recorded base (peftfw_manifest.json fingerprint) is\n"
                   "  compared with MODEL_DIR first: against another base every tensor\n"
                   "  'differs', so a mismatch is a loud warning.\n"
                   "  --strict   refuse (exit 2) when MODEL_DIR is not the adapter's base\n"
                   "Example:\n  peftfw verify-ssm runs/my_run/adapter --base /models/my-base\n";
      return 0;
    }
    if (args[i] == "--strict") {
      strict = true;
    } else if (args[i] == "--base") {
      if (i + 1 >= args.size()) throw UsageError{"--base needs a value"};
      base = args[++i];
    } else if (!args[i].empty() && args[i][0] == '-') {
      throw UsageError{"unknown option '" + args[i] + "'"};
    } else if (adapter.empty()) {
      adapter = args[i];
    } else {
      throw UsageError{"unexpected argument '" + args[i] + "'"};
    }
  }
  if (adapter.empty() || base.empty()) throw UsageError{"ADAPTER_DIR and --base MODEL_DIR are required"};

  auto match = BaseMatch::kUnverified;
  // Parameter name -> the key the family's checkpoints store it under, where that differs
  // (e.g. Nemotron-H's "backbone." for "model.").
  std::map<std::string, std::string> stored_as;
  if (auto source = base_source(base)) {
    match = check_adapter_base(adapter, *source, strict, std::cerr);
    try {
      const auto config = read_model_config(*source);
      for (const auto& p : find_architecture(config, source->architecture)->describe(config).params)
        if (p.stored_as.size() == 1) stored_as[p.name] = p.stored_as.front();
    } catch (const InputError&) {
      // No plugin for this config (or a config it refuses): compare under the tensors' own names.
    }
  } else {
    std::cerr << "note: " << base << " has no config.json beside it, so peftfw cannot check "
              << "that it is the adapter's base (give the checkpoint folder)\n";
  }

  std::vector<std::string> claimed, claimed_method;
  std::string method;
  const auto manifest_path = fs::path(adapter) / "peftfw_manifest.json";
  if (fs::exists(manifest_path)) {
    std::ifstream f(manifest_path);
    auto m = nlohmann::json::parse(f, nullptr, false);
    if (m.is_discarded() || !m.contains("ssm_tensors") || !m["ssm_tensors"].is_array())
      throw InputError(manifest_path.string() + ": not a valid peftfw manifest (no ssm_tensors list)");
    for (const auto& n : m["ssm_tensors"]) claimed.push_back(n.get<std::string>());
    if (m.contains("method_tensors") && m["method_tensors"].is_array())
      for (const auto& n : m["method_tensors"])
        if (n.is_string()) claimed_method.push_back(n.get<std::string>());
    if (m.contains("method") && m["method"].is_string()) method = m["method"].get<std::string>();
  }
  const auto ssm_path = fs::path(adapter) / "ssm_core_params.safetensors";
  const auto method_path = fs::path(adapter) / "method_tensors.safetensors";
  // A method that acts inside the SSM (sdt, state_offset, initial_state) keeps its own tensors.
  if (!claimed_method.empty() || fs::exists(method_path)) {
    if (!fs::exists(method_path)) {
      std::cerr << "peftfw verify-ssm: " << adapter << ": the manifest lists " << claimed_method.size()
                << " tensors of method '" << method << "' but method_tensors.safetensors is missing\n";
      return 1;
    }
    auto mt = io::Checkpoint::open(method_path.string());
    std::vector<std::string> problems;
    for (const auto& name : claimed_method)
      if (!mt.has(name)) problems.push_back(name + ": listed by the manifest but missing from " + method_path.string());
    std::cout << "method '" << method << "': its own tensors start at zero, so nonzero entries are what training put there\n";
    std::cout << std::left << std::setw(52) << "tensor" << std::right << std::setw(10) << "nonzero"
              << std::setw(14) << "mean |value|" << std::setw(14) << "max |value|" << "\n";
    for (const auto& name : mt.names()) {
      auto t = io::to_float_tensor(mt.view(name), method_path.string() + ": tensor '" + name + "'", "method")
                   .to(torch::kFloat64)
                   .abs();
      std::cout << std::left << std::setw(52) << name << std::right << std::setw(9) << std::fixed
                << std::setprecision(1) << 100.0 * t.ne(0).to(torch::kFloat64).mean().item<double>() << "%"
                << std::setw(14) << std::scientific << std::setprecision(3) << t.mean().item<double>()
                << std::setw(14) << t.max().item<double>() << "\n";
      if (t.max().item<double>() == 0.0) problems.push_back(name + ": all zero, never trained");
    }
    std::cout << std::defaultfloat;
    if (!problems.empty()) {
      std::cerr << "peftfw verify-ssm: " << problems.size() << " problem(s):\n";
      for (const auto& p : problems) std::cerr << "  " << p << "\n";
      return 1;
    }
    if (!fs::exists(ssm_path) && claimed.empty()) {
      std::cout << "all " << mt.size() << " tensors of method '" << method << "' were trained\n";
      return 0;
    }
  }
  if (!fs::exists(ssm_path)) {
    std::cerr << "peftfw verify-ssm: " << adapter << " has no ssm_core_params.safetensors"
              << (claimed.empty() ? " and its manifest claims no SSM tensors: nothing was co-trained "
                                    "or the saver dropped them (HF PEFT's save does)"
                                  : " but its manifest claims " + std::to_string(claimed.size()) +
                                        " SSM tensors")
              << "\n";
    return 1;
  }
  auto ssm = io::Checkpoint::open(ssm_path.string());
  auto ckpt = io::Checkpoint::open(base);
  std::vector<std::string> problems;
  for (const auto& name : claimed)
    if (!ssm.has(name)) problems.push_back(name + ": claimed by the manifest but missing from " + ssm_path.string());

  std::cout << std::left << std::setw(44) << "tensor" << std::right << std::setw(10) << "changed"
            << std::setw(14) << "mean |delta|" << std::setw(14) << "max |delta|" << "\n";
  for (const auto& name : ssm.names()) {
    auto key = name;
    if (auto s = stored_as.find(name); !ckpt.has(name) && s != stored_as.end()) key = s->second;
    if (!ckpt.has(key)) throw InputError(base + ": the base checkpoint has no tensor '" + name +
                                         "' (is this the adapter's base model?)");
    auto a = io::to_float_tensor(ssm.view(name), ssm_path.string() + ": tensor '" + name + "'",
                                 "SSM")
                 .to(torch::kFloat64);
    auto b = io::to_tensor(ckpt.view(key), key).to(torch::kFloat64);
    if (a.sizes() != b.sizes())
      throw InputError(name + ": adapter shape " + io::shape_to_string(a.sizes().vec()) +
                       " differs from the base's " + io::shape_to_string(b.sizes().vec()));
    // Compare at the base's precision: an update below its resolution did not survive.
    auto a_in_base = a.to(io::to_tensor(ckpt.view(key), key).scalar_type()).to(torch::kFloat64);
    auto delta = (a - b).abs();
    const double changed = a_in_base.ne(b).to(torch::kFloat64).mean().item<double>();
    std::cout << std::left << std::setw(44) << name << std::right << std::setw(9) << std::fixed
              << std::setprecision(1) << 100.0 * changed << "%" << std::setw(14) << std::scientific
              << std::setprecision(3) << delta.mean().item<double>() << std::setw(14)
              << delta.max().item<double>() << "\n";
    if (delta.max().item<double>() == 0.0) problems.push_back(name + ": identical to the base model");
  }
  if (!problems.empty()) {
    std::cerr << "peftfw verify-ssm: " << problems.size() << " problem(s):\n";
    for (const auto& p : problems) std::cerr << "  " << p << "\n";
    return 1;
  }
  if (match == BaseMatch::kMismatch) {
    std::cout << "all " << ssm.size() << " SSM tensors differ from " << base
              << ", which is NOT the base this adapter was made for (see the warning): this says "
                 "nothing about training\n";
    return 0;
  }
  std::cout << "all " << ssm.size() << " SSM tensors differ from the base\n";
  return 0;
}

}  // namespace peftfw::cli
