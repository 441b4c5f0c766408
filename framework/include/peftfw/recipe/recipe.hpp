// A loaded recipe: the recipe file, its `extends` bases and the command-line
// overrides, checked against the schema, merged, and filled with defaults.
//
// Loading collects every problem (TOML syntax, unknown section or key, wrong
// type, value outside its choices or range, extends cycle) and throws one
// RecipeError listing them, one `file:line:col: message` per line (the first
// kMaxDiagnostics, then a count). A Recipe that exists is valid; its
// accessors cannot fail on user input, only on programming errors (asking
// for an undeclared key or the wrong type throws std::logic_error).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "peftfw/error.hpp"
#include "peftfw/recipe/schema.hpp"

namespace peftfw::recipe {

struct Diagnostic {
  std::string file;         // as named to the user, or "<override 2: train.lr=abc>"
  std::uint32_t line = 0;   // 1-based; 0 when the source has no positions (overrides)
  std::uint32_t column = 0;
  std::string message;

  // "file:line:col: message", or "file: message" without a position.
  std::string to_string() const;
};

// Limits that keep a hostile recipe from costing minutes and gigabytes: a
// recipe file (or text) larger than kMaxRecipeBytes is refused before it is
// parsed, and at most kMaxDiagnostics diagnostics are reported (the first
// ones in file order), then a count of the rest.
inline constexpr std::size_t kMaxRecipeBytes = std::size_t{1} << 20;  // 1 MiB
inline constexpr std::size_t kMaxDiagnostics = 50;

// Everything wrong with a recipe. what() is every diagnostic, one per line,
// then "... and N more errors" when `omitted` were left out.
class RecipeError : public InputError {
 public:
  explicit RecipeError(std::vector<Diagnostic> diagnostics, std::size_t omitted = 0);
  const std::vector<Diagnostic>& diagnostics() const noexcept { return diagnostics_; }
  // Diagnostics found but not listed (beyond kMaxDiagnostics).
  std::size_t omitted() const noexcept { return omitted_; }

 private:
  std::vector<Diagnostic> diagnostics_;
  std::size_t omitted_ = 0;
};

// A "string or string array" value, as PEFT reads target_modules: a string is
// a regex matched against full module names, a list holds module names.
struct TargetPattern {
  bool is_regex = false;
  std::string regex;               // when is_regex
  std::vector<std::string> names;  // when !is_regex
};

class Recipe {
 public:
  // Reads `file` (and its bases), then applies `overrides`, each
  // "section.key=value" with the value in TOML syntax. Throws RecipeError.
  // `schema` is copied; the default is the builtin one.
  static Recipe load(const std::filesystem::path& file,
                     const std::vector<std::string>& overrides = {},
                     const Schema& schema = builtin_schema());

  // As load(), for recipe text that is not a file (the CLI's embedded
  // default). `virtual_name` names it in diagnostics; relative paths and
  // `extends` resolve against `base_dir`.
  static Recipe from_string(std::string_view text, const std::string& virtual_name,
                            const std::filesystem::path& base_dir,
                            const std::vector<std::string>& overrides = {},
                            const Schema& schema = builtin_schema());

  // Typed accessors; each must match the key's declared type and the key
  // must have a value (has_value), else std::logic_error.
  std::string get_string(std::string_view section, std::string_view key) const;
  std::int64_t get_int(std::string_view section, std::string_view key) const;
  double get_float(std::string_view section, std::string_view key) const;
  bool get_bool(std::string_view section, std::string_view key) const;
  std::vector<std::string> get_strings(std::string_view section, std::string_view key) const;
  TargetPattern get_pattern(std::string_view section, std::string_view key) const;
  // Absolute and lexically normal.
  std::filesystem::path get_path(std::string_view section, std::string_view key) const;
  // Any key but a table's, as its Value (kPath values resolved): for code that reads keys it
  // did not declare itself (an adapter plugin's keys).
  const Value& get_value(std::string_view section, std::string_view key) const;
  // A free-form table key. Include <nlohmann/json.hpp> to use the result.
  nlohmann::json get_table_json(std::string_view section, std::string_view key) const;

  // The key has a value: set by the user or defaulted.
  bool has_value(std::string_view section, std::string_view key) const;
  // The user set the key (in a recipe file or an override), rather than the default.
  bool is_set(std::string_view section, std::string_view key) const;
  // Where the user set the key: "file:line:col" of the key, or
  // "<override N: text>"; nullopt for defaults. For a table merged from
  // several files, the last one.
  std::optional<std::string> where(std::string_view section, std::string_view key) const;

  // The resolved recipe as TOML: every section and key in schema order with
  // its effective value (paths absolute, defaults included, `extends`
  // flattened away), each commented with where it came from. Loading it again
  // gives the same values.
  std::string to_toml() const;

  // The recipe as named when loaded (the file path as given, or virtual_name).
  const std::string& source_name() const;
  // The recipe files read: the loaded one first, then its bases in order.
  const std::vector<std::string>& files() const;
  const Schema& schema() const;

 private:
  struct Impl;
  explicit Recipe(std::shared_ptr<const Impl> impl);

  std::shared_ptr<const Impl> impl_;  // immutable; copies share it
};

}  // namespace peftfw::recipe
