// The recipe schema: every recipe section and key, declared once.
//
// A KeySpec holds a key's type, default, constraints and one-line doc. The
// table in schema.cpp (builtin_schema) is the single owner of those facts: the
// recipe loader validates and fills defaults from it, and `peftfw schema` and
// docs/recipes.md are printed from it. Adding a knob means adding one line
// there and nothing else.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace peftfw::recipe {

enum class ValueType {
  kString,         // TOML string
  kInteger,        // TOML integer (64-bit)
  kFloat,          // TOML float; integer literals are accepted (lr = 1 means 1.0)
  kBoolean,        // true / false
  kStringArray,    // array of strings
  kStringOrArray,  // a string (a regex) or an array of strings (names), like PEFT's target_modules
  kPath,           // a string, resolved against the folder of the recipe file that set it
  kTable,          // free-form table (any TOML), handed to the consumer as JSON
};

// "string", "integer", "float", "boolean", "string array",
// "string or string array", "path", "table".
const char* type_name(ValueType type);

// A default (or a resolved value) of any type except kTable. kPath values are
// strings; kStringOrArray values are a string or a string vector.
using Value = std::variant<bool, std::int64_t, double, std::string, std::vector<std::string>>;

// The TOML text of a value: "lora" (quoted and escaped), 16, 0.0002, 1.0,
// true, ["peft"]. Floats always carry a '.' or an exponent so they read back
// as floats.
std::string toml_literal(const Value& value);

struct KeySpec {
  std::string name;
  ValueType type = ValueType::kString;
  std::optional<Value> default_value;  // nullopt: unset unless a recipe sets it
  std::string doc;                     // one line, shown by `peftfw schema`
  // kString and kStringArray: allowed values (of each element for arrays);
  // empty = any string.
  std::vector<std::string> choices;
  std::optional<double> min;  // inclusive bounds for kInteger and kFloat
  std::optional<double> max;
  // What other tools call this setting (HF TrainingArguments, PEFT, TRL, axolotl): a recipe that
  // uses one of these names gets told the peftfw key, in whatever section it wrote it.
  std::vector<std::string> aliases;

  // Chainable constraints so a declaration stays one line:
  //   integer("r", 16, "LoRA rank.").at_least(1)
  KeySpec at_least(double lo) &&;
  KeySpec at_most(double hi) &&;
  KeySpec between(double lo, double hi) &&;
  KeySpec known_as(std::vector<std::string> names) &&;
};

struct SectionSpec {
  std::string name;
  std::string doc;
  std::vector<KeySpec> keys;  // in documentation order

  const KeySpec* find(std::string_view key) const;  // nullptr when not declared
};

struct Schema {
  std::vector<SectionSpec> sections;  // in documentation order

  const SectionSpec* find_section(std::string_view name) const;
  const KeySpec* find_key(std::string_view section, std::string_view key) const;
};

// Declaring keys in one line each, as the built-in table does (and adapter plugins for their
// own keys): integer("r", 16, "LoRA rank.").at_least(1).
namespace keys {
KeySpec text(std::string name, std::optional<std::string> def, std::string doc);
KeySpec choice(std::string name, std::string def, std::vector<std::string> choices, std::string doc);
KeySpec integer(std::string name, std::int64_t def, std::string doc);
KeySpec real(std::string name, std::optional<double> def, std::string doc);
KeySpec flag(std::string name, bool def, std::string doc);
KeySpec with_choices(KeySpec k, std::vector<std::string> choices);
KeySpec strings(std::string name, std::optional<std::vector<std::string>> def, std::string doc);
KeySpec pattern(std::string name, std::string doc);
KeySpec path(std::string name, std::optional<std::string> def, std::string doc);
KeySpec table(std::string name, std::string doc);
}  // namespace keys

// The one top-level key that is not a section: the base recipe to merge.
inline constexpr std::string_view kExtendsKey = "extends";

// The framework's own sections and keys. Built once; lives for the whole program. Recipes are
// loaded with PluginRegistry::recipe_schema(), which adds the adapter plugins' methods and keys.
const Schema& builtin_schema();

// A constraint in words: "one of: cosine, linear, constant", "at least 1",
// "between 0 and 1"; empty when the key has none.
std::string describe_constraints(const KeySpec& key);

// The default as TOML text, or "unset" for keys without a default.
std::string describe_default(const KeySpec& key);

// `peftfw schema`: grouped by section, one `key  type  default  doc` line per key.
std::string schema_to_text(const Schema& schema);

// `peftfw schema --markdown`: the content of docs/recipes.md.
std::string schema_to_markdown(const Schema& schema);

}  // namespace peftfw::recipe
