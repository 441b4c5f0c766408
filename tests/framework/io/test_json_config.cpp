// Tests for peftfw/io/json_config: typed field access, and that every failure
// names the file, the field, what was expected and what was found.
#include "peftfw/io/fs.hpp"
#include "peftfw/io/json_config.hpp"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "../../common/expect_error.hpp"
#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"

namespace peftfw::io {
namespace {

namespace fs = std::filesystem;

void expect_input_error(const std::function<void()>& fn, const std::string& expected_message) {
  try {
    fn();
    ADD_FAILURE() << "expected InputError, nothing was thrown";
  } catch (const InputError& e) {
    EXPECT_EQ(std::string(e.what()), expected_message);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected InputError, got another exception: " << e.what();
  }
}


// A config in the shape transformers writes for a hybrid model.
const char* kConfig = R"({
  "architectures": ["MambaForCausalLM"],
  "hidden_size": 64,
  "rms_norm_eps": 1e-05,
  "initializer_range": 0,
  "tie_word_embeddings": true,
  "model_type": "mamba2",
  "bad_int": "abc",
  "float_int": 4.0,
  "huge": 18446744073709551615,
  "negative": -3,
  "sliding_window": null,
  "layer_types": ["mamba", "attention", "mamba"],
  "attn_layer_indices": [1, 5],
  "mixed": [1, "two"],
  "time_step_limit": [0.0, Infinity],
  "text_config": {"hidden_size": "wide", "vocab_size": 100}
})";

JsonConfig config() { return JsonConfig::parse(kConfig, "config.json"); }

TEST(JsonConfigTest, ReadsTypedFields) {
  const auto c = config();
  EXPECT_EQ(c.require_int("hidden_size"), 64);
  EXPECT_EQ(c.require_int("negative"), -3);
  EXPECT_DOUBLE_EQ(c.require_float("rms_norm_eps"), 1e-05);
  EXPECT_DOUBLE_EQ(c.require_float("hidden_size"), 64.0);  // integers are numbers too
  EXPECT_DOUBLE_EQ(c.require_float("initializer_range"), 0.0);
  EXPECT_TRUE(c.require_bool("tie_word_embeddings"));
  EXPECT_EQ(c.require_string("model_type"), "mamba2");
  EXPECT_EQ(c.require_string_list("layer_types"),
            (std::vector<std::string>{"mamba", "attention", "mamba"}));
  EXPECT_EQ(c.require_int_list("attn_layer_indices"), (std::vector<int64_t>{1, 5}));
  EXPECT_TRUE(c.has("sliding_window"));
  EXPECT_TRUE(c.is_unset("sliding_window"));
  EXPECT_TRUE(c.is_unset("absent"));
  EXPECT_FALSE(c.has("absent"));
  EXPECT_EQ(c.raw()["hidden_size"], 64);
  EXPECT_EQ(c.path(), "config.json");
}

TEST(JsonConfigTest, AcceptsPythonNonFiniteFloats) {
  // transformers' Mamba2Config serialises time_step_limit=(0.0, inf) this way.
  const auto limit = config().require_float_list("time_step_limit");
  ASSERT_EQ(limit.size(), 2u);
  EXPECT_EQ(limit[0], 0.0);
  EXPECT_TRUE(std::isinf(limit[1]) && limit[1] > 0);
  const auto c = JsonConfig::parse(R"({"a": NaN, "b": -Infinity, "s": "NaN Infinity"})", "x.json");
  EXPECT_TRUE(std::isnan(c.require_float("a")));
  EXPECT_TRUE(std::isinf(c.require_float("b")) && c.require_float("b") < 0);
  EXPECT_EQ(c.require_string("s"), "NaN Infinity");  // untouched inside strings
  expect_input_error([&] { c.require_int("b"); },
                     "x.json: field 'b': expected an integer, found float -Infinity");
}

TEST(JsonConfigTest, DefaultsAndOptionals) {
  const auto c = config();
  EXPECT_EQ(c.get_int("absent", 7), 7);
  EXPECT_EQ(c.get_int("sliding_window", 7), 7);  // null means "not set"
  EXPECT_EQ(c.get_int("hidden_size", 7), 64);
  EXPECT_DOUBLE_EQ(c.get_float("absent", 0.5), 0.5);
  EXPECT_EQ(c.get_string("absent", "x"), "x");
  EXPECT_FALSE(c.get_bool("absent", false));
  EXPECT_FALSE(c.optional_int("sliding_window").has_value());
  EXPECT_EQ(c.optional_string("model_type"), "mamba2");
  // A present value of the wrong type is an error even with a default.
  expect_input_error([&] { c.get_int("bad_int", 1); },
                     R"(config.json: field 'bad_int': expected an integer, found string "abc")");
  expect_input_error([&] { c.get_bool("hidden_size", false); },
                     "config.json: field 'hidden_size': expected a boolean, found integer 64");
}

TEST(JsonConfigTest, NamesMissingAndMistypedFields) {
  const auto c = config();
  expect_input_error([&] { c.require_int("num_hidden_layers"); },
                     "config.json: missing required field 'num_hidden_layers'");
  expect_input_error([&] { c.require_int("bad_int"); },
                     R"(config.json: field 'bad_int': expected an integer, found string "abc")");
  expect_input_error([&] { c.require_int("float_int"); },
                     "config.json: field 'float_int': expected an integer, found float 4.0");
  expect_input_error([&] { c.require_int("tie_word_embeddings"); },
                     "config.json: field 'tie_word_embeddings': expected an integer, found "
                     "boolean true");
  expect_input_error([&] { c.require_int("huge"); },
                     "config.json: field 'huge': expected an integer that fits in 64 bits, found "
                     "integer 18446744073709551615");
  expect_input_error([&] { c.require_int("sliding_window"); },
                     "config.json: field 'sliding_window': expected an integer, found null");
  expect_input_error(
      [&] { c.require_float("model_type"); },
      R"(config.json: field 'model_type': expected a number, found string "mamba2")");
  expect_input_error([&] { c.require_string("hidden_size"); },
                     "config.json: field 'hidden_size': expected a string, found integer 64");
  expect_input_error(
      [&] { c.require_bool("model_type"); },
      R"(config.json: field 'model_type': expected a boolean, found string "mamba2")");
  expect_input_error([&] { c.require_int_list("mixed"); },
                     R"(config.json: field 'mixed[1]': expected an integer, found string "two")");
  expect_input_error([&] { c.require_string_list("attn_layer_indices"); },
                     "config.json: field 'attn_layer_indices[0]': expected a string, found "
                     "integer 1");
  expect_input_error([&] { c.require_int_list("hidden_size"); },
                     "config.json: field 'hidden_size': expected an array of integers, found "
                     "integer 64");
  expect_input_error([&] { c.require_string("architectures"); },
                     "config.json: field 'architectures': expected a string, found array of 1 "
                     "element");
}

TEST(JsonConfigTest, NestedObjectsNameTheirPath) {
  const auto text = config().child("text_config");
  EXPECT_EQ(text.require_int("vocab_size"), 100);
  expect_input_error(
      [&] { text.require_int("hidden_size"); },
      R"(config.json: field 'text_config.hidden_size': expected an integer, found string "wide")");
  expect_input_error([&] { text.require_int("num_layers"); },
                     "config.json: missing required field 'text_config.num_layers'");
  expect_input_error([&] { config().child("hidden_size"); },
                     "config.json: field 'hidden_size': expected an object, found integer 64");
  EXPECT_FALSE(config().optional_child("vision_config").has_value());
}

TEST(JsonConfigTest, LongStringsAreShortenedInMessages) {
  const auto c = JsonConfig::parse("{\"a\": \"" + std::string(500, 'x') + "\"}", "c.json");
  try {
    c.require_int("a");
    ADD_FAILURE() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_LT(std::string(e.what()).size(), 150u) << e.what();
    EXPECT_NE(std::string(e.what()).find("...\""), std::string::npos) << e.what();
  }
}

TEST(JsonConfigTest, SyntaxErrorsNameLineAndColumn) {
  peftfw::testing::expect_input_error(
      [] { JsonConfig::parse("{\n  \"a\": 1,\n  \"b\": 2,\n}\n", "config.json"); },
      {"config.json:4:1: invalid JSON (byte 22): ", "expected string literal"});
  // Positions count in the original text even after a NaN was substituted.
  peftfw::testing::expect_input_error([] { JsonConfig::parse(R"({"x": NaN, "y": oops})", "c.json"); },
                                {"c.json:1:17: invalid JSON (byte 16)"});
  peftfw::testing::expect_input_error(
      [] { JsonConfig::parse(std::string("{\"a\": 1}\n\0{", 11), "nul.json"); },
      {"nul.json:2:1: invalid JSON (byte 9): NUL byte"});
  peftfw::testing::expect_input_error([] { JsonConfig::parse("", "empty.json"); },
                                {"empty.json:1:1: invalid JSON", "unexpected end of input"});
  expect_input_error([] { JsonConfig::parse("[1, 2]", "config.json"); },
                     "config.json: expected a JSON object at the top level, found array of 2 "
                     "elements");
}

TEST(Excerpt, CutsAt200BytesOnACharacterBoundaryAndGivesTheLength) {
  EXPECT_EQ(excerpt("short"), "short");
  EXPECT_EQ(excerpt(std::string(200, 'a')), std::string(200, 'a'));
  EXPECT_EQ(excerpt(std::string(300, 'a')), std::string(200, 'a') + "... (300 bytes in all)");
  // "x" then 150 two-byte characters (301 bytes): byte 200 is the second byte of the
  // 100th character, so the cut moves back to byte 199 (x + 99 characters).
  std::string accents = "x";
  for (int i = 0; i < 150; ++i) accents += "\xC3\xA9";  // U+00E9
  std::string kept = "x";
  for (int i = 0; i < 99; ++i) kept += "\xC3\xA9";
  const Excerpt e = make_excerpt(accents);
  EXPECT_TRUE(e.cut);
  EXPECT_EQ(e.text, kept + "...");
  EXPECT_EQ(e.original, 301u);
  EXPECT_EQ(e.note(), " (301 bytes in all)");
  EXPECT_EQ(excerpt(std::string(100, 'b'), 60), std::string(60, 'b') + "... (100 bytes in all)");
}

TEST(JsonConfigTest, SyntaxErrorsQuoteAtMost200BytesOfTheInput) {
  // An unclosed string: nlohmann's "last read" is the quote and the 10^6 bytes after it.
  try {
    JsonConfig::parse("{\"a\": \"" + std::string(1000000, 'x'), "big.json");
    ADD_FAILURE() << "expected InputError";
  } catch (const InputError& e) {
    const std::string message = e.what();
    EXPECT_LT(message.size(), 400u) << message.substr(0, 500);
    EXPECT_NE(message.find("last read: '\"" + std::string(199, 'x') +
                           "...' (1000001 bytes in all)"),
              std::string::npos)
        << message.substr(0, 500);
  }
}

TEST(JsonConfigTest, NumberBeyondADoubleNamesTheFile) {
  expect_input_error([] { JsonConfig::parse("{\"vocab_size\": 1e400}", "config.json"); },
                     "config.json: invalid JSON: number overflow parsing '1e400' (a number "
                     "beyond the range of a 64-bit float)");
}

TEST(JsonConfigTest, LoadsFilesAndReportsMissingOnes) {
  std::string tmpl = (fs::temp_directory_path() / "peftfw_json_XXXXXX").string();
  ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
  const std::string path = tmpl + "/config.json";
  {
    std::ofstream out(path);
    out << "{\"hidden_size\": 32,\n \"n\": }";
  }
  peftfw::testing::expect_input_error([&] { JsonConfig::load(path); },
                                {path + ":2:7: invalid JSON"});
  {
    std::ofstream out(path);
    out << "{\"hidden_size\": 32}";
  }
  EXPECT_EQ(JsonConfig::load(path).require_int("hidden_size"), 32);
  expect_input_error([&] { JsonConfig::load(tmpl + "/nope.json"); },
                     tmpl + "/nope.json: no such file");
  expect_input_error([&] { JsonConfig::load(tmpl); }, tmpl + ": is a directory, expected a file");
  peftfw::io::remove_tree(tmpl);
}

}  // namespace
}  // namespace peftfw::io
