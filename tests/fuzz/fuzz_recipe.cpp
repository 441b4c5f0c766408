// Fuzz target: recipe loading (framework/src/recipe: toml++ parsing, extends,
// the schema checks and command-line overrides). The input is recipe text,
// optionally followed by a line "%%" and one override per line. `extends` can
// name two files in the scratch folder: base.toml (a valid base) and
// loop.toml (which extends itself).
//
// A recipe that loads must survive the round trip its documentation
// promises: to_toml() loads again to the same value for every key.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "fuzz_common.hpp"
#include "peftfw/recipe/recipe.hpp"

namespace {

using namespace peftfw;
using namespace peftfw::recipe;

constexpr std::string_view kSeparator = "\n%%\n";

int initialize() {
  const std::string& dir = fuzz::scratch_dir();
  const std::string base = "[adapter]\nr = 4\n[train]\nlr = 1e-3\nepochs = 2\n";
  const std::string loop = "extends = \"loop.toml\"\n[train]\nlr = 1.0\n";
  fuzz::write_file(dir + "/base.toml", base.data(), base.size());
  fuzz::write_file(dir + "/loop.toml", loop.data(), loop.size());
  return 0;
}

// The same value for every key, through the typed accessors.
void require_same(const Recipe& a, const Recipe& b) {
  for (const SectionSpec& section : a.schema().sections) {
    for (const KeySpec& key : section.keys) {
      const std::string& s = section.name;
      const std::string& k = key.name;
      fuzz::require(a.has_value(s, k) == b.has_value(s, k), "round trip keeps has_value");
      if (!a.has_value(s, k)) continue;
      bool same = true;
      switch (key.type) {
        case ValueType::kString: same = a.get_string(s, k) == b.get_string(s, k); break;
        case ValueType::kInteger: same = a.get_int(s, k) == b.get_int(s, k); break;
        case ValueType::kFloat: same = a.get_float(s, k) == b.get_float(s, k); break;
        case ValueType::kBoolean: same = a.get_bool(s, k) == b.get_bool(s, k); break;
        case ValueType::kStringArray: same = a.get_strings(s, k) == b.get_strings(s, k); break;
        case ValueType::kStringOrArray: {
          const TargetPattern pa = a.get_pattern(s, k), pb = b.get_pattern(s, k);
          same = pa.is_regex == pb.is_regex && pa.regex == pb.regex && pa.names == pb.names;
          break;
        }
        case ValueType::kPath: same = a.get_path(s, k) == b.get_path(s, k); break;
        case ValueType::kTable:
          // dump(): NaN compares unequal to itself, its text does not.
          same = a.get_table_json(s, k).dump() == b.get_table_json(s, k).dump();
          break;
      }
      if (!same) {
        std::fprintf(stderr, "fuzz: [%s] %s changed in the to_toml() round trip\n", s.c_str(),
                     k.c_str());
        fuzz::require(false, "to_toml() loads again to the same values");
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  static const int initialized = initialize();
  (void)initialized;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::size_t cut = input.find(kSeparator);
  const std::string_view text = input.substr(0, cut);
  std::vector<std::string> overrides;
  if (cut != std::string_view::npos) {
    std::string_view rest = input.substr(cut + kSeparator.size());
    while (!rest.empty()) {
      const std::size_t end = rest.find('\n');
      overrides.emplace_back(rest.substr(0, end));
      rest = end == std::string_view::npos ? std::string_view() : rest.substr(end + 1);
    }
  }
  fuzz::expect_clean([&] {
    const Recipe recipe = Recipe::from_string(text, "recipe.toml", fuzz::scratch_dir(), overrides);
    const std::string resolved = recipe.to_toml();
    try {
      require_same(recipe, Recipe::from_string(resolved, "resolved.toml", fuzz::scratch_dir()));
    } catch (const RecipeError& e) {
      std::fprintf(stderr,
                   "fuzz: the resolved recipe does not load again:\n%s\n--- resolved:\n%s\n",
                   e.what(), resolved.c_str());
      fuzz::require(false, "to_toml() loads again");
    }
  });
  return 0;
}
