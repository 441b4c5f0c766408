// adapter_config.json as the "peft" plugin reads it: the JSON part of loading
// a PEFT adapter folder, free of LibTorch so that the fuzz target
// (tests/fuzz/fuzz_adapter_config.cpp) builds it in seconds. Header-only: the
// plugin is one source file.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"

namespace peftfw::peft {

// What peftfw takes from adapter_config.json.
struct AdapterConfig {
  std::string method;  // "lora", or "dora" when use_dora
  int64_t r = 0;
  double alpha = 8.0;  // PEFT's default lora_alpha
  bool use_rslora = false;
};

// Checks that the config describes an adapter peftfw can load (a LoRA/DoRA
// adapter with one rank and alpha for every module, weights not transposed)
// and reads it. Throws InputError naming the file and the field.
inline AdapterConfig parse_adapter_config(const io::JsonConfig& cfg) {
  const std::string& file = cfg.path();
  const auto type = cfg.get_string("peft_type", "");
  if (type != "LORA") {
    const io::Excerpt shown = io::make_excerpt(type);
    throw InputError(file + ": field 'peft_type': only \"LORA\" adapters can be loaded, found \"" +
                     shown.text + "\"" + shown.note());
  }
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    if (cfg.has(key) && !cfg.raw()[key].is_null() && !cfg.raw()[key].empty()) {
      throw InputError(file + ": field '" + key + "' (per-module ranks) is not supported yet");
    }
  }
  if (cfg.get_bool("fan_in_fan_out", false)) {
    throw InputError(file + ": field 'fan_in_fan_out' = true is not supported");
  }
  AdapterConfig out;
  out.method = cfg.get_bool("use_dora", false) ? "dora" : "lora";
  out.r = cfg.require_int("r");
  // A rank below 1 would reach the tensor allocation; say which field is wrong.
  if (out.r < 1) {
    throw InputError(file + ": field 'r': the LoRA rank must be at least 1, found " +
                     std::to_string(out.r));
  }
  out.alpha = cfg.get_float("lora_alpha", 8.0);
  if (!std::isfinite(out.alpha)) {
    throw InputError(file + ": field 'lora_alpha': expected a finite number, found " +
                     io::describe_json_value(cfg.raw()["lora_alpha"]));
  }
  out.use_rslora = cfg.get_bool("use_rslora", false);
  return out;
}

}  // namespace peftfw::peft
