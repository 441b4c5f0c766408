// Preflight helpers of `peftfw run` (see preflight.hpp).
#include "peftfw/train/preflight.hpp"

#include <torch/types.h>
#include <unistd.h>

#include <cstdio>
#include <limits>

#include "peftfw/error.hpp"
#include "peftfw/train/device_memory.hpp"

namespace peftfw::train {

bool ProblemList::check(const std::function<void()>& check) {
  try {
    check();
    return true;
  } catch (const Error& e) {
    problems_.push_back(e.what());
    return false;
  }
}

void ProblemList::throw_if_any(const std::string& what) const {
  if (problems_.empty()) return;
  std::string msg = what + ": " + std::to_string(problems_.size()) +
                    (problems_.size() == 1 ? " problem" : " problems") + "; nothing was written";
  for (size_t i = 0; i < problems_.size(); ++i) {
    std::string p = problems_[i];
    for (size_t pos = p.find('\n'); pos != std::string::npos; pos = p.find('\n', pos + 4)) p.replace(pos, 1, "\n   ");
    msg += "\n" + std::to_string(i + 1) + ". " + p;
  }
  throw InputError(msg);
}

void check_model_fits(const ModelInventory& inv, const std::string& dtype, const std::string& device,
                      const std::string& config_path, int64_t trainable_extra) {
  const int64_t element = dtype == "float32" ? 4 : 2;
  int64_t total = 0;
  const ParamDesc* largest = nullptr;
  int64_t largest_n = 0;
  auto shape_text = [](const ParamDesc& p) {
    std::string s = "[";
    for (size_t i = 0; i < p.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(p.shape[i]);
    return s + "]";
  };
  for (const auto& p : inv.params) {
    int64_t n = 1;
    for (auto d : p.shape)
      if (d < 0 || __builtin_mul_overflow(n, d, &n))
        throw InputError(config_path + ": tensor '" + p.name + "' would have shape " + shape_text(p) +
                         ", whose size does not fit in 64 bits; check the config's dimension fields");
    if (__builtin_add_overflow(total, n, &total))
      throw InputError(config_path + ": the model's parameter count does not fit in 64 bits; check the "
                       "config's dimension fields");
    if (n > largest_n) largest = &p, largest_n = n;
  }
  // Base weights in the model's dtype; each trainable float32 parameter with its gradient and
  // AdamW's two moments takes 16 bytes.
  int64_t bytes = 0, extra = 0;
  if (__builtin_mul_overflow(total, element, &bytes) || __builtin_mul_overflow(trainable_extra, int64_t{16}, &extra) ||
      __builtin_add_overflow(bytes, extra, &bytes))
    bytes = std::numeric_limits<int64_t>::max();
  const int64_t have = device_memory_bytes(torch::Device(device));
  if (have <= 0 || bytes <= have) return;
  auto gib = [](int64_t b) {
    char text[32];
    std::snprintf(text, sizeof text, "%.1f", static_cast<double>(b) / 1073741824.0);
    return std::string(text);
  };
  throw InputError(config_path + ": the model has " + std::to_string(total) + " parameters" +
                   (trainable_extra > 0 ? " and " + std::to_string(trainable_extra) + " trainable" : std::string()) +
                   ", " + gib(bytes) + " GiB in " + dtype + ", more than the " + gib(have) + " GiB of memory on " +
                   device +
                   (largest ? " (largest tensor: '" + largest->name + "' " + shape_text(*largest) + ")" : "") +
                   "; check the config's dimension fields (vocab_size, hidden_size, ...) and the [adapter] settings, or use "
                   "a machine with more memory");
}

}  // namespace peftfw::train
