// Fuzz target: config.json and every JSON file read through JsonConfig
// (framework/src/io/json_config.cpp): the parser with Python's NaN/Infinity
// extension, error positions, and the typed accessors on every field.
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "fuzz_common.hpp"
#include "peftfw/io/json_config.hpp"

namespace {

using peftfw::io::JsonConfig;

// Every accessor on every field: each returns a value or throws InputError.
void read_all(const JsonConfig& config, int depth) {
  using peftfw::fuzz::expect_clean;
  for (const std::string& key : config.keys()) {
    expect_clean([&] { config.require_int(key); });
    expect_clean([&] { config.require_float(key); });
    expect_clean([&] { config.require_string(key); });
    expect_clean([&] { config.require_bool(key); });
    expect_clean([&] { config.require_int_list(key); });
    expect_clean([&] { config.require_float_list(key); });
    expect_clean([&] { config.require_string_list(key); });
    expect_clean([&] { config.get_int(key, 0); });
    expect_clean([&] { config.optional_string(key); });
    peftfw::io::describe_json_value(config.raw()[key]);
    if (depth < 4) expect_clean([&] { read_all(config.child(key), depth + 1); });
  }
  expect_clean([&] { config.require_int("hidden_size"); });  // usually absent
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  peftfw::fuzz::expect_clean([&] { read_all(JsonConfig::parse(text, "config.json"), 0); });
  // The bare parser accepts any top-level value.
  peftfw::fuzz::expect_clean([&] { peftfw::io::parse_json_text(text, "config.json"); });
  return 0;
}
