// Fuzz target: adapter_config.json as the "peft" plugin reads it
// (plugins/peft/adapter_config.hpp, called by PeftFormat::load).
#include <cstddef>
#include <cstdint>
#include <string>

#include "adapter_config.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  using namespace peftfw;
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::expect_clean([&] {
    const peft::AdapterConfig config =
        peft::parse_adapter_config(io::JsonConfig::parse(text, "adapter_config.json"));
    fuzz::require(config.method == "lora" || config.method == "dora", "method is lora or dora");
    fuzz::require(config.r >= 1, "r >= 1");
  });
  return 0;
}
