// Tests for plugins/peft/adapter_config.hpp: what the "peft" plugin takes from
// adapter_config.json (the fields PEFT writes), and the files it refuses, each
// with the file and field named.
#include <gtest/gtest.h>

#include <string>

#include "../../../plugins/peft/adapter_config.hpp"
#include "../../common/expect_error.hpp"
#include "peftfw/io/json_config.hpp"

namespace peftfw::peft {
namespace {

AdapterConfig parse(const std::string& text) {
  return parse_adapter_config(io::JsonConfig::parse(text, "adapter_config.json"));
}

using peftfw::testing::expect_input_error;

TEST(AdapterConfig, ReadsWhatPeftWrites) {
  const AdapterConfig lora = parse(R"({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
      "use_dora": false, "use_rslora": false, "rank_pattern": {}, "alpha_pattern": {},
      "fan_in_fan_out": false, "target_modules": ["q_proj"]})");
  EXPECT_EQ(lora.method, "lora");
  EXPECT_EQ(lora.r, 8);
  EXPECT_EQ(lora.alpha, 16.0);
  EXPECT_FALSE(lora.use_rslora);
  const AdapterConfig dora = parse(R"({"peft_type": "LORA", "r": 4, "use_dora": true,
      "use_rslora": true, "rank_pattern": null})");
  EXPECT_EQ(dora.method, "dora");
  EXPECT_EQ(dora.alpha, 8.0);  // PEFT's default lora_alpha
  EXPECT_TRUE(dora.use_rslora);
}

TEST(AdapterConfig, RefusesWhatPeftfwCannotLoad) {
  expect_input_error([] { parse(R"({"peft_type": "IA3", "r": 8})"); },
                     {"adapter_config.json: field 'peft_type': only \"LORA\" adapters can be "
                      "loaded, found \"IA3\""});
  expect_input_error([] { parse(R"({"peft_type": "LORA", "r": 8, "rank_pattern": {"q": 2}})"); },
                     {"adapter_config.json: field 'rank_pattern' (per-module ranks)"});
  expect_input_error([] { parse(R"({"peft_type": "LORA", "r": 8, "fan_in_fan_out": true})"); },
                     {"adapter_config.json: field 'fan_in_fan_out' = true is not supported"});
  expect_input_error([] { parse(R"({"peft_type": "LORA"})"); },
                     {"adapter_config.json: missing required field 'r'"});
  expect_input_error([] { parse(R"({"peft_type": "LORA", "r": 0})"); },
                     {"adapter_config.json: field 'r': the LoRA rank must be at least 1, found 0"});
  expect_input_error([] { parse(R"({"peft_type": "LORA", "r": 2, "lora_alpha": NaN})"); },
                     {"adapter_config.json: field 'lora_alpha': expected a finite number, found "
                      "float NaN"});
  expect_input_error(
      [] { parse(R"({"peft_type": ")" + std::string(1000, 'P') + R"(", "r": 2})"); },
      {"found \"" + std::string(200, 'P') + "...\" (1000 bytes in all)"});
}

}  // namespace
}  // namespace peftfw::peft
