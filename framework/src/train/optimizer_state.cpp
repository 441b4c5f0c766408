// AdamW state as safetensors + JSON (see optimizer_state.hpp).
#include "peftfw/train/optimizer_state.hpp"

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"
#include "peftfw/io/safetensors.hpp"
#include "peftfw/io/tensor_bridge.hpp"

namespace fs = std::filesystem;

namespace peftfw::train {

namespace {

constexpr const char* kTensorsFile = "optimizer.safetensors";
constexpr const char* kStepsFile = "optimizer.json";
constexpr const char* kLegacyFile = "optimizer.pt";
constexpr const char* kFormat = "peftfw-adamw-1";

}  // namespace

void save_adamw_state(const fs::path& dir, const torch::optim::AdamW& optimizer, const NamedParameters& params) {
  std::map<std::string, torch::Tensor> tensors;
  nlohmann::json steps = nlohmann::json::object();
  const auto& state = optimizer.state();
  for (const auto& [name, p] : params) {
    auto it = state.find(p.unsafeGetTensorImpl());
    if (it == state.end()) continue;  // no step taken for this parameter yet
    const auto& s = static_cast<const torch::optim::AdamWParamState&>(*it->second);
    steps[name] = s.step();
    tensors[name + ".exp_avg"] = s.exp_avg().detach().to(torch::kCPU);
    tensors[name + ".exp_avg_sq"] = s.exp_avg_sq().detach().to(torch::kCPU);
    if (s.max_exp_avg_sq().defined()) tensors[name + ".max_exp_avg_sq"] = s.max_exp_avg_sq().detach().to(torch::kCPU);
  }
  io::save_tensors((dir / kTensorsFile).string(), tensors, {{"format", kFormat}});
  io::write_file_atomic((dir / kStepsFile).string(),
                        nlohmann::json{{"format", kFormat}, {"steps", steps}}.dump(1) + "\n");
}

void load_adamw_state(const fs::path& dir, torch::optim::AdamW& optimizer, const NamedParameters& params,
                      std::ostream& log) {
  const auto steps_file = dir / kStepsFile;
  if (!fs::exists(steps_file) && fs::exists(dir / kLegacyFile)) {
    log << "resume: reading the optimizer state from " << (dir / kLegacyFile).string()
        << " (LibTorch's pickle-based archive, written by an older peftfw); the next checkpoint "
           "stores it as optimizer.safetensors + optimizer.json\n";
    try {
      torch::load(optimizer, (dir / kLegacyFile).string());
    } catch (const c10::Error& e) {
      throw InputError((dir / kLegacyFile).string() + ": cannot read this optimizer state: " +
                       e.what_without_backtrace() + "; delete the checkpoint folder " + dir.string() +
                       " to resume from the one before");
    }
    return;
  }
  auto corrupt = [&](const fs::path& file, const std::string& why) {
    return InputError(file.string() + ": " + why + "; this checkpoint is damaged: delete the folder " +
                      dir.string() + " to resume from the checkpoint before it");
  };
  std::ifstream f(steps_file);
  if (!f) throw corrupt(steps_file, "missing or unreadable");
  const auto j = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || j.value("format", "") != kFormat || !j.contains("steps") ||
      !j["steps"].is_object())
    throw corrupt(steps_file, std::string("not a ") + kFormat + " file");
  std::map<std::string, torch::Tensor> tensors;
  try {
    tensors = io::load_checkpoint_tensors((dir / kTensorsFile).string());
  } catch (const Error& e) {
    throw corrupt(dir / kTensorsFile, e.what());
  }
  auto& state = optimizer.state();
  for (const auto& [name, p] : params) {
    if (!j["steps"].contains(name)) continue;
    const auto& step = j["steps"][name];
    if (!step.is_number_integer() || step.get<int64_t>() < 0)
      throw corrupt(steps_file, "steps[\"" + name + "\"] is not a step count");
    auto take = [&](const std::string& key, bool required) -> torch::Tensor {
      auto it = tensors.find(name + "." + key);
      if (it == tensors.end()) {
        if (required) throw corrupt(dir / kTensorsFile, "no tensor '" + name + "." + key + "'");
        return {};
      }
      if (it->second.sizes() != p.sizes())
        throw corrupt(dir / kTensorsFile, "tensor '" + name + "." + key + "' has shape " +
                                              io::shape_to_string(it->second.sizes().vec()) + " but the parameter has " +
                                              io::shape_to_string(p.sizes().vec()));
      return it->second.to(p.device(), p.scalar_type());
    };
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->step(step.get<int64_t>());
    s->exp_avg(take("exp_avg", true));
    s->exp_avg_sq(take("exp_avg_sq", true));
    if (auto m = take("max_exp_avg_sq", false); m.defined()) s->max_exp_avg_sq(m);
    state[p.unsafeGetTensorImpl()] = std::move(s);
  }
}

}  // namespace peftfw::train
