// Typed, error-reporting access to a JSON object such as a checkpoint's
// config.json.
//
// Every failure is an InputError naming the source file and the field:
//   config.json: missing required field 'hidden_size'
//   config.json: field 'hidden_size': expected an integer, found string "abc"
//   config.json:3:17: invalid JSON: ... (syntax errors give line and column)
// Python's json module writes NaN, Infinity and -Infinity for float fields
// (transformers' Mamba2 configs carry "time_step_limit": [0.0, Infinity]), so
// the parser accepts those tokens outside strings, as Python does.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace peftfw::io {

class JsonConfig {
 public:
  // Reads and parses a file; the top level must be an object.
  static JsonConfig load(const std::string& path);
  // Parses `text`; `source` names it in messages (usually the file path).
  static JsonConfig parse(const std::string& text, const std::string& source);

  // The file path (or source name) used in messages.
  const std::string& path() const { return source_; }
  // The object this config wraps.
  const nlohmann::json& raw() const { return *node_; }

  // Present, even when null.
  bool has(const std::string& key) const;
  // Absent or null. transformers writes None for "not set".
  bool is_unset(const std::string& key) const;
  std::vector<std::string> keys() const;

  // Missing or null or the wrong type is an error. require_int rejects floats
  // (4.0 included: transformers writes integers without a fraction) and
  // booleans; require_float accepts integers.
  int64_t require_int(const std::string& key) const;
  double require_float(const std::string& key) const;
  std::string require_string(const std::string& key) const;
  bool require_bool(const std::string& key) const;
  std::vector<int64_t> require_int_list(const std::string& key) const;
  std::vector<double> require_float_list(const std::string& key) const;
  std::vector<std::string> require_string_list(const std::string& key) const;

  // Absent or null gives std::nullopt; present with the wrong type is an error.
  std::optional<int64_t> optional_int(const std::string& key) const;
  std::optional<double> optional_float(const std::string& key) const;
  std::optional<std::string> optional_string(const std::string& key) const;
  std::optional<bool> optional_bool(const std::string& key) const;

  // Absent or null gives `fallback`; present with the wrong type is an error.
  int64_t get_int(const std::string& key, int64_t fallback) const;
  double get_float(const std::string& key, double fallback) const;
  std::string get_string(const std::string& key, const std::string& fallback) const;
  bool get_bool(const std::string& key, bool fallback) const;

  // A nested object (e.g. "text_config"); its messages say
  // "field 'text_config.hidden_size'".
  JsonConfig child(const std::string& key) const;
  std::optional<JsonConfig> optional_child(const std::string& key) const;

 private:
  JsonConfig(std::shared_ptr<const nlohmann::json> root, const nlohmann::json* node,
             std::string source, std::string prefix);

  const nlohmann::json* find(const std::string& key) const;
  const nlohmann::json& require(const std::string& key) const;
  [[noreturn]] void type_error(const std::string& field, const char* expected,
                               const nlohmann::json& found) const;
  std::string field_name(const std::string& key) const { return prefix_ + key; }
  int64_t as_int(const std::string& field, const nlohmann::json& value) const;
  double as_float(const std::string& field, const nlohmann::json& value) const;

  std::shared_ptr<const nlohmann::json> root_;  // owns the tree node_ points into
  const nlohmann::json* node_ = nullptr;
  std::string source_;
  std::string prefix_;  // "text_config." for children, "" at the top
};

// Parses JSON text with Python's NaN/Infinity extension. Throws InputError
// "<source>:<line>:<col>: invalid JSON: ..." on a syntax error.
nlohmann::json parse_json_text(const std::string& text, const std::string& source);

// Reads a whole file. InputError when it does not exist, RuntimeError for
// other read failures.
std::string read_text_file(const std::string& path);

// `value` as messages quote it: string "abc", integer 3, float 0.5, boolean
// true, null, array of 4 elements, object. Long strings are cut (see Excerpt).
std::string describe_json_value(const nlohmann::json& value);

// User text quoted in a message (a recipe value, a JSONL line, a token, a
// tensor name) is cut to at most kMaxExcerptBytes bytes, at a UTF-8
// character boundary, so that hostile input (a 100 MB line) never comes back
// whole in an error. A cut text ends in "..." and note() gives the original
// length: "abc..." + " (5000 bytes in all)"; callers that quote the text put
// the note after the closing quote.
inline constexpr std::size_t kMaxExcerptBytes = 200;

struct Excerpt {
  std::string text;          // the text, or its first bytes followed by "..."
  std::size_t original = 0;  // bytes in the original text
  bool cut = false;

  // " (N bytes in all)" when cut, else "".
  std::string note() const;
};

Excerpt make_excerpt(std::string_view text, std::size_t max_bytes = kMaxExcerptBytes);

// make_excerpt(text).text + note(): "abc... (5000 bytes in all)", or the text itself.
std::string excerpt(std::string_view text, std::size_t max_bytes = kMaxExcerptBytes);

// nlohmann::json's exception text as peftfw's messages quote it: without the
// "[json.exception...]" prefix and nlohmann's own position, and with the
// input it quotes ("last read: '...'", for an unclosed string the rest of
// the file) cut like any excerpt.
std::string json_error_detail(const std::string& what);

}  // namespace peftfw::io
