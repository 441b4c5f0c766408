// Recipe loading: parse with toml++, follow `extends`, check every key against
// the schema, apply command-line overrides, fill defaults, and report every
// problem at once with the file, line and column toml++ recorded for it.
#include "peftfw/recipe/recipe.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <toml++/toml.h>
#include <tuple>
#include <utility>

#include "peftfw/io/json_config.hpp"

namespace peftfw::recipe {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string Diagnostic::to_string() const {
  if (line == 0) return file + ": " + message;
  return file + ":" + std::to_string(line) + ":" + std::to_string(column) + ": " + message;
}

namespace {

std::string join_lines(const std::vector<Diagnostic>& diagnostics, std::size_t omitted) {
  std::string out;
  for (const Diagnostic& d : diagnostics) {
    if (!out.empty()) out += '\n';
    out += d.to_string();
  }
  if (omitted > 0) {
    out += "\n... and " + std::to_string(omitted) + " more error" + (omitted == 1 ? "" : "s");
  }
  return out;
}

}  // namespace

RecipeError::RecipeError(std::vector<Diagnostic> diagnostics, std::size_t omitted)
    : InputError(join_lines(diagnostics, omitted)),
      diagnostics_(std::move(diagnostics)),
      omitted_(omitted) {}

namespace {

// ---------------------------------------------------------------------------
// The loaded values.

struct Entry {
  Value value;           // every type but kTable; kPath holds the resolved path
  json table;            // kTable
  bool user_set = false;
  int times_set = 0;     // more than 1 only for tables merged from several layers
  std::string where;     // "file:line:col" or "<override N: text>" of the last setting
};

struct RecipeData {
  Schema schema;
  std::string source_name;
  std::vector<std::string> files;
  std::map<std::string, std::map<std::string, Entry, std::less<>>, std::less<>> sections;
};

// ---------------------------------------------------------------------------
// Suggestions.

// Optimal string alignment distance (a transposition costs 1), ignoring case.
// Three rows of the table are enough: a transposition looks two rows back.
std::size_t edit_distance(std::string_view a, std::string_view b) {
  const auto lower = [](char c) {
    return static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  };
  std::vector<std::size_t> before(b.size() + 1), previous(b.size() + 1), current(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) previous[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    current[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t cost = lower(a[i - 1]) == lower(b[j - 1]) ? 0 : 1;
      current[j] = std::min({previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost});
      const bool swapped = i > 1 && j > 1 && lower(a[i - 1]) == lower(b[j - 2]) &&
                           lower(a[i - 2]) == lower(b[j - 1]);
      if (swapped) {
        current[j] = std::min(current[j], before[j - 2] + 1);
      }
    }
    std::swap(before, previous);
    std::swap(previous, current);
  }
  return previous[b.size()];
}

// A name counts as a likely typo of `word` within this distance.
std::size_t typo_budget(std::string_view word) { return word.size() <= 3 ? 1 : 2; }

// The difference of the lengths: a lower bound of the edit distance, so a
// long hostile key costs nothing against short names.
std::size_t length_gap(std::string_view a, std::string_view b) {
  return a.size() > b.size() ? a.size() - b.size() : b.size() - a.size();
}

// edit_distance(a, b) <= budget.
bool within_distance(std::string_view a, std::string_view b, std::size_t budget) {
  return length_gap(a, b) <= budget && edit_distance(a, b) <= budget;
}

// "'a'", "'a' or 'b'", "'a', 'b' or 'c'" (with the given quoting).
std::string or_list(const std::vector<std::string>& items) {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += i + 1 == items.size() ? " or " : ", ";
    out += items[i];
  }
  return out;
}

std::string comma_list(const std::vector<std::string>& items) {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + items[i];
  return out;
}

// Candidates closest to `word`, if within the typo budget (all ties kept).
std::vector<std::size_t> closest(std::string_view word,
                                 const std::vector<std::string>& candidates) {
  std::vector<std::size_t> best;
  std::size_t best_distance = typo_budget(word) + 1;
  for (std::size_t i = 0; i < candidates.size(); ++i) {
    if (length_gap(word, candidates[i]) >= best_distance) continue;
    const std::size_t d = edit_distance(word, candidates[i]);
    if (d < best_distance) {
      best_distance = d;
      best.clear();
    }
    if (d == best_distance) best.push_back(i);
  }
  return best;
}

std::string section_label(std::string_view name) { return "[" + std::string(name) + "]"; }
// User text in quotes, cut to io::kMaxExcerptBytes (the note on the original
// length goes after the closing quote).
std::string single_quoted(std::string_view s) {
  const io::Excerpt e = io::make_excerpt(s);
  return "'" + e.text + "'" + e.note();
}

std::string sections_list(const Schema& schema) {
  std::vector<std::string> names;
  for (const SectionSpec& s : schema.sections) names.push_back(section_label(s.name));
  return comma_list(names);
}

// What another tool's name for a setting is in peftfw ("'lr' in [train]"), or "".
std::string alias_hint(const Schema& schema, const SectionSpec* section, std::string_view key) {
  std::vector<std::string> here, elsewhere;
  for (const SectionSpec& s : schema.sections)
    for (const KeySpec& k : s.keys)
      if (std::find(k.aliases.begin(), k.aliases.end(), key) != k.aliases.end())
        (&s == section ? here : elsewhere).push_back(single_quoted(k.name) + (&s == section ? "" : " in " + section_label(s.name)));
  std::vector<std::string> all = here;
  all.insert(all.end(), elsewhere.begin(), elsewhere.end());
  if (all.empty()) return "";
  return "peftfw calls it " + or_list(all);
}

// A key not declared in `section`: say where it belongs, or what was meant.
std::string unknown_key_message(const Schema& schema, const SectionSpec& section,
                                std::string_view key) {
  if (const std::string hint = alias_hint(schema, &section, key); !hint.empty())
    return "unknown key " + single_quoted(key) + " in " + section_label(section.name) + "; " + hint;
  std::vector<std::string> homes;
  for (const SectionSpec& s : schema.sections) {
    if (&s != &section && s.find(key)) homes.push_back(section_label(s.name));
  }
  if (!homes.empty()) {
    return single_quoted(key) + " is not a key of " + section_label(section.name) +
           "; it belongs in " + or_list(homes);
  }
  const std::string head =
      "unknown key " + single_quoted(key) + " in " + section_label(section.name);
  std::vector<std::string> own;
  for (const KeySpec& k : section.keys) own.push_back(k.name);
  if (const auto near = closest(key, own); !near.empty()) {
    std::vector<std::string> names;
    for (const std::size_t i : near) names.push_back(single_quoted(own[i]));
    return head + "; did you mean " + or_list(names) + "?";
  }
  std::vector<std::string> elsewhere, labels;
  for (const SectionSpec& s : schema.sections) {
    for (const KeySpec& k : s.keys) {
      elsewhere.push_back(k.name);
      labels.push_back(single_quoted(k.name) + " in " + section_label(s.name));
    }
  }
  if (const auto near = closest(key, elsewhere); !near.empty()) {
    std::vector<std::string> names;
    for (const std::size_t i : near) names.push_back(labels[i]);
    return head + "; did you mean " + or_list(names) + "?";
  }
  return head + "; its keys are " + comma_list(own);
}

std::string unknown_section_message(const Schema& schema, std::string_view name) {
  std::vector<std::string> names;
  for (const SectionSpec& s : schema.sections) names.push_back(s.name);
  const std::string head = "unknown section " + section_label(io::excerpt(name));
  if (const auto near = closest(name, names); !near.empty()) {
    std::vector<std::string> labels;
    for (const std::size_t i : near) labels.push_back(section_label(names[i]));
    return head + "; did you mean " + or_list(labels) + "?";
  }
  return head + "; the sections are " + sections_list(schema);
}

// A top-level key that is neither `extends` nor a section.
std::string unknown_top_level_message(const Schema& schema, std::string_view key) {
  std::vector<std::string> homes;
  for (const SectionSpec& s : schema.sections) {
    if (s.find(key)) homes.push_back(section_label(s.name));
  }
  if (!homes.empty()) {
    return single_quoted(key) + " is not a top-level key; it belongs in " + or_list(homes);
  }
  const std::string head = "unknown top-level key " + single_quoted(key);
  if (const std::string hint = alias_hint(schema, nullptr, key); !hint.empty()) return head + "; " + hint;
  if (within_distance(key, kExtendsKey, typo_budget(key))) {
    return head + "; did you mean " + single_quoted(kExtendsKey) + "?";
  }
  return head + "; the top level holds only " + single_quoted(kExtendsKey) + " and the sections " +
         sections_list(schema);
}

// ---------------------------------------------------------------------------
// Describing TOML values in messages.

std::string render(const toml::node& node);

std::string render_key(std::string_view key) {
  const bool bare = !key.empty() && std::all_of(key.begin(), key.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
  });
  return bare ? std::string(key) : toml_literal(std::string(key));
}

// Compact one-line TOML text of any node.
std::string render(const toml::node& node) {
  std::ostringstream out;
  switch (node.type()) {
    case toml::node_type::string: return toml_literal(node.as_string()->get());
    case toml::node_type::integer: return std::to_string(node.as_integer()->get());
    case toml::node_type::floating_point: return toml_literal(node.as_floating_point()->get());
    case toml::node_type::boolean: return node.as_boolean()->get() ? "true" : "false";
    case toml::node_type::date: out << node.as_date()->get(); return out.str();
    case toml::node_type::time: out << node.as_time()->get(); return out.str();
    case toml::node_type::date_time: out << node.as_date_time()->get(); return out.str();
    case toml::node_type::array: {
      std::string s = "[";
      bool first = true;
      for (const toml::node& e : *node.as_array()) {
        s += (first ? "" : ", ") + render(e);
        first = false;
      }
      return s + "]";
    }
    case toml::node_type::table: {
      std::string s = "{";
      bool first = true;
      for (auto&& [k, v] : *node.as_table()) {
        s += (first ? " " : ", ") + render_key(k.str()) + " = " + render(v);
        first = false;
      }
      return s + (first ? "}" : " }");
    }
    case toml::node_type::none: break;
  }
  return "?";
}

const char* kind_name(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::string: return "string";
    case toml::node_type::integer: return "integer";
    case toml::node_type::floating_point: return "float";
    case toml::node_type::boolean: return "boolean";
    case toml::node_type::date: return "date";
    case toml::node_type::time: return "time";
    case toml::node_type::date_time: return "date-time";
    case toml::node_type::array: return "array";
    case toml::node_type::table: return "table";
    case toml::node_type::none: break;
  }
  return "nothing";
}

// "string \"abc\"", "integer 5", "array [1, 2]" (long values cut to 60
// bytes, with their length).
std::string describe(const toml::node& node) {
  return std::string(kind_name(node)) + " " + io::excerpt(render(node), 60);
}

const char* expected_phrase(ValueType type) {
  switch (type) {
    case ValueType::kString: return "a string";
    case ValueType::kInteger: return "an integer";
    case ValueType::kFloat: return "a float";
    case ValueType::kBoolean: return "a boolean (true or false)";
    case ValueType::kStringArray: return "an array of strings";
    case ValueType::kStringOrArray: return "a string (a regex) or an array of strings (names)";
    case ValueType::kPath: return "a path (a string)";
    case ValueType::kTable: return "a table";
  }
  return "?";
}

std::string format_number(double v) {
  if (v == std::floor(v) && std::fabs(v) < 1e15) return std::to_string(static_cast<long long>(v));
  return toml_literal(v);
}

// ---------------------------------------------------------------------------
// TOML <-> JSON for free-form tables.

json to_json(const toml::node& node) {
  std::ostringstream out;
  switch (node.type()) {
    case toml::node_type::string: return node.as_string()->get();
    case toml::node_type::integer: return node.as_integer()->get();
    case toml::node_type::floating_point: return node.as_floating_point()->get();
    case toml::node_type::boolean: return node.as_boolean()->get();
    // JSON has no dates; they pass through as their TOML text.
    case toml::node_type::date: out << node.as_date()->get(); return out.str();
    case toml::node_type::time: out << node.as_time()->get(); return out.str();
    case toml::node_type::date_time: out << node.as_date_time()->get(); return out.str();
    case toml::node_type::array: {
      json a = json::array();
      for (const toml::node& e : *node.as_array()) a.push_back(to_json(e));
      return a;
    }
    case toml::node_type::table: {
      json o = json::object();
      for (auto&& [k, v] : *node.as_table()) o[std::string(k.str())] = to_json(v);
      return o;
    }
    case toml::node_type::none: break;
  }
  return json();
}

std::string json_to_inline_toml(const json& j) {
  switch (j.type()) {
    case json::value_t::object: {
      if (j.empty()) return "{}";
      std::string s = "{ ";
      bool first = true;
      for (auto it = j.begin(); it != j.end(); ++it) {
        s += (first ? "" : ", ") + render_key(it.key()) + " = " + json_to_inline_toml(it.value());
        first = false;
      }
      return s + " }";
    }
    case json::value_t::array: {
      std::string s = "[";
      for (std::size_t i = 0; i < j.size(); ++i) s += (i ? ", " : "") + json_to_inline_toml(j[i]);
      return s + "]";
    }
    case json::value_t::string: return toml_literal(j.get<std::string>());
    case json::value_t::boolean: return j.get<bool>() ? "true" : "false";
    case json::value_t::number_integer: return std::to_string(j.get<std::int64_t>());
    case json::value_t::number_unsigned: return std::to_string(j.get<std::uint64_t>());
    case json::value_t::number_float: return toml_literal(j.get<double>());
    default: break;
  }
  throw std::logic_error("recipe table holds a value TOML cannot write: " + j.dump());
}

// Tables merge key by key (recursively); anything else is replaced.
void deep_merge(json& into, const json& from) {
  if (!into.is_object() || !from.is_object()) {
    into = from;
    return;
  }
  for (auto it = from.begin(); it != from.end(); ++it) {
    if (into.contains(it.key())) {
      deep_merge(into[it.key()], it.value());
    } else {
      into[it.key()] = it.value();
    }
  }
}

// ---------------------------------------------------------------------------
// Files.

// "the limit of 1048576 bytes (1 MiB) for a recipe; ...": the end of a size message.
std::string size_limit_text() {
  return "the limit of " + std::to_string(kMaxRecipeBytes) +
         " bytes (1 MiB) for a recipe (a recipe holds settings; training data goes in the "
         "file named by data.path)";
}

// Reads at most kMaxRecipeBytes: a larger file is refused before it is read
// or parsed, and so is a special file that never ends (extends = "/dev/zero").
std::optional<std::string> read_file(const fs::path& file, std::string& why) {
  std::error_code ec;
  const fs::file_status status = fs::status(file, ec);
  if (!fs::exists(status)) {
    why = "no such file";
    return std::nullopt;
  }
  if (fs::is_directory(status)) {
    why = "it is a folder, not a recipe file";
    return std::nullopt;
  }
  if (fs::is_regular_file(status)) {
    const std::uintmax_t size = fs::file_size(file, ec);
    if (!ec && size > kMaxRecipeBytes) {
      why = "it is " + std::to_string(size) + " bytes, over " + size_limit_text();
      return std::nullopt;
    }
  }
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    why = std::string("cannot open it: ") + std::strerror(errno);
    return std::nullopt;
  }
  std::string text(kMaxRecipeBytes + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<std::size_t>(in.gcount()));
  if (text.size() > kMaxRecipeBytes) {
    why = "it holds more than " + std::to_string(kMaxRecipeBytes) + " bytes, over " +
          size_limit_text();
    return std::nullopt;
  }
  return text;
}

// Stable identity of a file, for cycle detection.
std::string file_identity(const fs::path& absolute) {
  std::error_code ec;
  const fs::path canonical = fs::weakly_canonical(absolute, ec);
  return (ec ? absolute.lexically_normal() : canonical).string();
}

fs::path resolve(const fs::path& base_dir, const std::string& text) {
  const fs::path p(text);
  return (p.is_absolute() ? p : base_dir / p).lexically_normal();
}

std::string trim(std::string_view s) {
  const auto space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return std::string(s);
}

// "\x07": a byte as messages and comments show it.
std::string hex_escape(unsigned char c) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "\\x%02X", c);
  return buf;
}

// Diagnostics are one per line: show line breaks in user text as \n, and
// other control characters (a terminal escape, a NUL) as \xNN.
std::string one_line(std::string_view s) {
  std::string out;
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if ((u < 0x20 && c != '\t') || u == 0x7F) {
      out += hex_escape(u);
    } else {
      out += c;
    }
  }
  return out;
}

// Bytes in the well-formed UTF-8 character at s[i] (no overlong forms,
// surrogates or code points past U+10FFFF), or 0 when there is none.
std::size_t utf8_char_length(std::string_view s, std::size_t i) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char b = byte(i);
  if (b < 0x80) return 1;
  std::size_t n = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    n = 2;
  } else if (b >= 0xE0 && b <= 0xEF) {
    n = 3;
    if (b == 0xE0) lo = 0xA0;  // overlong
    if (b == 0xED) hi = 0x9F;  // surrogates
  } else if (b >= 0xF0 && b <= 0xF4) {
    n = 4;
    if (b == 0xF0) lo = 0x90;  // overlong
    if (b == 0xF4) hi = 0x8F;  // past U+10FFFF
  } else {
    return 0;
  }
  if (i + n > s.size() || byte(i + 1) < lo || byte(i + 1) > hi) return 0;
  for (std::size_t k = 2; k < n; ++k) {
    if (byte(i + k) < 0x80 || byte(i + k) > 0xBF) return 0;
  }
  return n;
}

// Byte offset of the first byte that does not start a well-formed UTF-8 character.
std::optional<std::size_t> invalid_utf8_at(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_char_length(s, i);
    if (n == 0) return i;
    i += n;
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------
// The loader.

// Where the values being read come from: one recipe file, or one override.
struct Layer {
  std::string name;       // file name as shown, or "<override N: text>"
  fs::path base_dir;      // relative paths resolve against this
  int rank = 0;           // diagnostics are sorted by layer, then position
  bool positions = true;  // false for overrides: no line:col
};

class Loader {
 public:
  explicit Loader(RecipeData& out) : out_(out), schema_(out.schema) {}

  // A recipe's text; `id` identifies the file for cycle detection.
  void read_recipe(std::string_view text, const std::string& name, const fs::path& base_dir,
                   const std::string& id) {
    const Layer layer{name, base_dir, next_rank_++, true};
    out_.files.push_back(name);
    if (text.size() > kMaxRecipeBytes) {  // files are cut in read_file; this is for from_string
      add(Diagnostic{name, 0, 0,
                     "cannot read recipe: it is " + std::to_string(text.size()) + " bytes, over " +
                         size_limit_text()},
          layer.rank);
      return;
    }
    toml::table doc;
    try {
      doc = toml::parse(text, std::string_view(name));
    } catch (const toml::parse_error& e) {
      report(layer, e.source(), "TOML syntax error: " + io::excerpt(e.description()));
      return;
    }
    chain_.push_back({id, name});
    if (const toml::node* base = doc.get(kExtendsKey)) read_base(layer, *base);
    chain_.pop_back();
    apply_document(doc, layer);
  }

  // The top-level file could not be read at all.
  void report_unreadable(const std::string& name, const std::string& why) {
    add(Diagnostic{name, 0, 0, "cannot read recipe: " + why}, next_rank_++);
  }

  void apply_overrides(const std::vector<std::string>& overrides) {
    const fs::path cwd = fs::current_path();
    for (std::size_t i = 0; i < overrides.size(); ++i) {
      const Layer layer{
          "<override " + std::to_string(i + 1) + ": " + one_line(io::excerpt(overrides[i])) + ">",
          cwd, kOverrideRank + static_cast<int>(i), false};
      apply_override(overrides[i], layer);
    }
  }

  void fill_defaults() {
    const fs::path cwd = fs::current_path();
    for (const SectionSpec& section : schema_.sections) {
      auto& entries = out_.sections[section.name];
      for (const KeySpec& spec : section.keys) {
        if (entries.count(spec.name) || !spec.default_value) continue;
        Entry e;
        e.value = *spec.default_value;
        if (spec.type == ValueType::kPath) {
          e.value = resolve(cwd, std::get<std::string>(*spec.default_value)).string();
        }
        entries.emplace(spec.name, std::move(e));
      }
    }
  }

  // The first kMaxDiagnostics diagnostics in file order (files as read, then
  // the overrides), each file's by line and column.
  std::vector<Diagnostic> diagnostics() const {
    std::vector<Ranked> sorted = diagnostics_;
    std::sort(sorted.begin(), sorted.end(), before);
    std::vector<Diagnostic> out;
    for (Ranked& r : sorted) out.push_back(std::move(r.diagnostic));
    return out;
  }
  // Diagnostics found beyond those diagnostics() lists.
  std::size_t omitted() const { return found_ - diagnostics_.size(); }

 private:
  static constexpr int kOverrideRank = 1 << 20;  // after every file

  struct Ranked {
    int rank;
    std::size_t sequence;  // order of finding: ties keep it
    Diagnostic diagnostic;
  };
  struct Link {
    std::string id;
    std::string name;
  };
  // What a TOML value became after checking.
  struct Checked {
    Value value;
    json table;
  };

  static bool before(const Ranked& a, const Ranked& b) {
    return std::tie(a.rank, a.diagnostic.line, a.diagnostic.column, a.sequence) <
           std::tie(b.rank, b.diagnostic.line, b.diagnostic.column, b.sequence);
  }

  // Keeps the kMaxDiagnostics first diagnostics (in the order of `before`)
  // and counts the rest, so that a recipe of a million unknown keys costs
  // neither minutes nor gigabytes.
  void add(Diagnostic d, int rank) {
    Ranked r{rank, found_++, std::move(d)};
    if (diagnostics_.size() < kMaxDiagnostics) {
      diagnostics_.push_back(std::move(r));
      return;
    }
    const auto last = std::max_element(diagnostics_.begin(), diagnostics_.end(), before);
    if (before(r, *last)) *last = std::move(r);
  }

  // Whether a diagnostic at this place would be kept; if not, it is only
  // counted, and its message (with its did-you-mean search) is never built.
  bool keeps(const Layer& layer, const toml::source_region& at) {
    if (diagnostics_.size() < kMaxDiagnostics) return true;
    const Ranked probe{layer.rank, found_, Diagnostic{"", layer.positions ? at.begin.line : 0,
                                                      layer.positions ? at.begin.column : 0, ""}};
    if (before(probe, *std::max_element(diagnostics_.begin(), diagnostics_.end(), before))) {
      return true;
    }
    ++found_;
    return false;
  }

  void report(const Layer& layer, const toml::source_region& at, std::string message) {
    if (layer.positions) {
      add({layer.name, at.begin.line, at.begin.column, std::move(message)}, layer.rank);
    } else {
      add({layer.name, 0, 0, std::move(message)}, layer.rank);
    }
  }

  std::string where(const Layer& layer, const toml::source_region& at) const {
    if (!layer.positions) return layer.name;
    return layer.name + ":" + std::to_string(at.begin.line) + ":" + std::to_string(at.begin.column);
  }

  void read_base(const Layer& layer, const toml::node& node) {
    const toml::value<std::string>* text = node.as_string();
    if (!text || text->get().empty()) {
      report(layer, node.source(),
             std::string(kExtendsKey) + ": expected the path of a base recipe (a string), found " +
                 describe(node));
      return;
    }
    const fs::path relative(text->get());
    const fs::path file = resolve(layer.base_dir, text->get());
    // Name the base as the user would: next to the extending file's name.
    const std::string name =
        relative.is_absolute()
            ? relative.lexically_normal().string()
            : (fs::path(layer.name).parent_path() / relative).lexically_normal().string();
    const std::string id = file_identity(file);
    const auto loop = std::find_if(chain_.begin(), chain_.end(),
                                   [&](const Link& l) { return l.id == id; });
    if (loop != chain_.end()) {
      std::vector<std::string> names;
      for (auto it = loop; it != chain_.end(); ++it) names.push_back(it->name);
      names.push_back(name);
      std::string cycle;
      for (std::size_t i = 0; i < names.size(); ++i) cycle += (i ? " -> " : "") + names[i];
      report(layer, node.source(), "extends cycle: " + cycle);
      return;
    }
    std::string why;
    const std::optional<std::string> contents = read_file(file, why);
    if (!contents) {
      report(layer, node.source(), "cannot read base recipe " + single_quoted(name) + ": " + why);
      return;
    }
    read_recipe(*contents, name, file.parent_path(), id);
  }

  void apply_document(const toml::table& doc, const Layer& layer) {
    for (auto&& [name, node] : doc) {
      if (name.str() == kExtendsKey) continue;  // read first, in read_recipe
      const SectionSpec* section = schema_.find_section(name.str());
      if (!section) {
        if (!keeps(layer, name.source())) continue;
        report(layer, name.source(),
               node.is_table() ? unknown_section_message(schema_, name.str())
                               : unknown_top_level_message(schema_, name.str()));
        continue;
      }
      const toml::table* table = node.as_table();
      if (!table) {
        report(layer, name.source(),
               section_label(section->name) + " must be a table (a " +
                   section_label(section->name) + " section), found " + describe(node));
        continue;
      }
      for (auto&& [key, value] : *table) {
        const KeySpec* spec = section->find(key.str());
        if (!spec) {
          if (!keeps(layer, key.source())) continue;
          report(layer, key.source(), unknown_key_message(schema_, *section, key.str()));
          continue;
        }
        if (std::optional<Checked> checked = check(*section, *spec, value, layer)) {
          store(*section, *spec, std::move(*checked), where(layer, key.source()));
        }
      }
    }
  }

  void apply_override(const std::string& text, const Layer& layer) {
    const toml::source_region nowhere{};
    // Recipes are UTF-8 (toml++ checks files); an override's bytes come from the
    // shell and must be checked here, or they would reach the resolved recipe.
    if (const auto bad = invalid_utf8_at(text)) {
      report(layer, nowhere,
             "byte " + std::to_string(*bad + 1) + " (" +
                 hex_escape(static_cast<unsigned char>(text[*bad])) +
                 ") is not valid UTF-8; overrides, like recipes, are UTF-8 text");
      return;
    }
    const std::size_t eq = text.find('=');
    const std::string lhs = trim(std::string_view(text).substr(0, eq));
    std::vector<std::string> parts;
    for (std::size_t start = 0;;) {
      const std::size_t dot = lhs.find('.', start);
      parts.push_back(lhs.substr(start, dot == std::string::npos ? dot : dot - start));
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
    const bool malformed = eq == std::string::npos || parts.size() < 2 ||
                           std::any_of(parts.begin(), parts.end(),
                                       [](const std::string& p) { return p.empty(); });
    if (malformed) {
      report(layer, nowhere,
             lhs == kExtendsKey
                 ? std::string(kExtendsKey) + " can only be set in a recipe file"
                 : "expected section.key=value with the value in TOML syntax (e.g. train.lr=1e-4)");
      return;
    }
    const SectionSpec* section = schema_.find_section(parts[0]);
    if (!section) {
      report(layer, nowhere, unknown_section_message(schema_, parts[0]));
      return;
    }
    const KeySpec* spec = section->find(parts[1]);
    if (!spec) {
      report(layer, nowhere, unknown_key_message(schema_, *section, parts[1]));
      return;
    }
    const std::string prefix = section_label(section->name) + " " + spec->name + ": ";
    if (parts.size() > 2 && spec->type != ValueType::kTable) {
      report(layer, nowhere,
             section_label(section->name) + " " + spec->name + " is a " + type_name(spec->type) +
                 " key, not a table; write " + parts[0] + "." + parts[1] + "=value");
      return;
    }
    const std::string raw = trim(std::string_view(text).substr(eq + 1));
    // The value is TOML; parsing it as the value of a key gives us a node.
    toml::table holder;
    try {
      holder = toml::parse("v = " + raw, std::string_view(layer.name));
    } catch (const toml::parse_error&) {
      if (spec->type != ValueType::kString && spec->type != ValueType::kPath) {
        std::string message = prefix + "expected " + expected_phrase(spec->type) + ", found " +
                              single_quoted(one_line(raw)) + ", which is not a TOML value";
        if (spec->type == ValueType::kStringOrArray) {
          // Only plain string keys take bare words: here a bare word could
          // as well be meant as a one-name list.
          message += "; quote a regex: " + parts[0] + "." + parts[1] + "=" +
                     single_quoted(toml_literal(one_line(raw)));
        }
        report(layer, nowhere, std::move(message));
        return;
      }
      holder = toml::table{};
      holder.insert("v", raw);  // a bare word for a string key: take it as written
    }
    if (holder.size() != 1) {
      report(layer, nowhere,
             prefix + "expected one TOML value, found " + single_quoted(one_line(raw)));
      return;
    }
    const toml::node& node = *holder.get("v");
    if (parts.size() > 2) {
      // section.table.a.b=value sets one entry inside a free-form table.
      json nested = to_json(node);
      for (std::size_t i = parts.size() - 1; i >= 2; --i) nested = json{{parts[i], nested}};
      store(*section, *spec, Checked{Value{}, std::move(nested)}, layer.name);
      return;
    }
    std::optional<Checked> checked = check(*section, *spec, node, layer);
    if (!checked) return;
    store(*section, *spec, std::move(*checked), layer.name);
  }

  // Type, choices and range of one value. Reports and returns nullopt when wrong.
  std::optional<Checked> check(const SectionSpec& section, const KeySpec& spec,
                               const toml::node& node, const Layer& layer) {
    const std::string prefix = section_label(section.name) + " " + spec.name + ": ";
    const auto wrong_type = [&](const toml::node& at, std::string found) {
      std::string message = prefix + "expected " + expected_phrase(spec.type) + ", found " + found;
      if (!layer.positions && (spec.type == ValueType::kString || spec.type == ValueType::kPath)) {
        const std::string text = node.is_string() ? node.as_string()->get() : render(node);
        message += "; to pass it as a string, quote it: " + section.name + "." + spec.name + "=" +
                   single_quoted(toml_literal(text));
      }
      report(layer, at.source(), std::move(message));
      return std::nullopt;
    };
    const auto check_choice = [&](const toml::node& at, const std::string& s) {
      if (spec.choices.empty() ||
          std::find(spec.choices.begin(), spec.choices.end(), s) != spec.choices.end()) {
        return true;
      }
      std::vector<std::string> shown;
      for (const std::string& c : spec.choices) shown.push_back(toml_literal(c));
      const io::Excerpt found = io::make_excerpt(s);
      std::string message = prefix + "expected one of " + comma_list(shown) + ", found " +
                            toml_literal(found.text) + found.note();
      if (const auto near = closest(s, spec.choices); !near.empty()) {
        message += "; did you mean " + toml_literal(spec.choices[near.front()]) + "?";
      }
      report(layer, at.source(), std::move(message));
      return false;
    };
    const auto check_range = [&](const toml::node& at, double v, const std::string& shown) {
      const bool low = spec.min && v < *spec.min;
      const bool high = spec.max && v > *spec.max;
      if (!low && !high) return true;
      std::string bound;
      if (spec.min && spec.max) {
        bound = "between " + format_number(*spec.min) + " and " + format_number(*spec.max);
      } else if (spec.min) {
        bound = "at least " + format_number(*spec.min);
      } else {
        bound = "at most " + format_number(*spec.max);
      }
      report(layer, at.source(), prefix + "must be " + bound + ", found " + shown);
      return false;
    };
    const auto string_array =
        [&](const toml::array& array) -> std::optional<std::vector<std::string>> {
      std::vector<std::string> out;
      for (std::size_t i = 0; i < array.size(); ++i) {
        const toml::node& e = *array.get(i);
        if (!e.is_string()) {
          report(layer, e.source(),
                 prefix + "expected " + expected_phrase(spec.type) + ", but element " +
                     std::to_string(i + 1) + " is " + describe(e));
          return std::nullopt;
        }
        if (!check_choice(e, e.as_string()->get())) return std::nullopt;
        out.push_back(e.as_string()->get());
      }
      return out;
    };

    switch (spec.type) {
      case ValueType::kString: {
        if (!node.is_string()) return wrong_type(node, describe(node));
        const std::string& s = node.as_string()->get();
        if (!check_choice(node, s)) return std::nullopt;
        return Checked{s, {}};
      }
      case ValueType::kPath: {
        if (!node.is_string()) return wrong_type(node, describe(node));
        const std::string& s = node.as_string()->get();
        if (s.empty()) return wrong_type(node, "an empty string");
        return Checked{resolve(layer.base_dir, s).string(), {}};
      }
      case ValueType::kInteger: {
        if (!node.is_integer()) return wrong_type(node, describe(node));
        const std::int64_t v = node.as_integer()->get();
        if (!check_range(node, static_cast<double>(v), std::to_string(v))) return std::nullopt;
        return Checked{v, {}};
      }
      case ValueType::kFloat: {
        double v = 0;
        if (node.is_integer()) {
          v = static_cast<double>(node.as_integer()->get());
        } else if (node.is_floating_point()) {
          v = node.as_floating_point()->get();
        } else {
          return wrong_type(node, describe(node));
        }
        if (!std::isfinite(v)) return wrong_type(node, describe(node) + " (not finite)");
        if (!check_range(node, v, render(node))) return std::nullopt;
        return Checked{v, {}};
      }
      case ValueType::kBoolean: {
        if (!node.is_boolean()) return wrong_type(node, describe(node));
        return Checked{node.as_boolean()->get(), {}};
      }
      case ValueType::kStringArray: {
        if (!node.is_array()) return wrong_type(node, describe(node));
        std::optional<std::vector<std::string>> v = string_array(*node.as_array());
        if (!v) return std::nullopt;
        return Checked{std::move(*v), {}};
      }
      case ValueType::kStringOrArray: {
        if (node.is_string()) return Checked{node.as_string()->get(), {}};
        if (!node.is_array()) return wrong_type(node, describe(node));
        std::optional<std::vector<std::string>> v = string_array(*node.as_array());
        if (!v) return std::nullopt;
        return Checked{std::move(*v), {}};
      }
      case ValueType::kTable: {
        if (!node.is_table()) return wrong_type(node, describe(node));
        return Checked{Value{}, to_json(node)};
      }
    }
    return std::nullopt;
  }

  void store(const SectionSpec& section, const KeySpec& spec, Checked checked,
             std::string where) {
    Entry& e = out_.sections[section.name][spec.name];
    if (spec.type == ValueType::kTable && e.user_set) {
      deep_merge(e.table, checked.table);
      ++e.times_set;
    } else {
      e.table = std::move(checked.table);
      e.times_set = 1;
    }
    e.value = std::move(checked.value);
    e.user_set = true;
    e.where = std::move(where);
  }

  RecipeData& out_;
  const Schema& schema_;
  std::vector<Link> chain_;  // files being read, outermost first
  std::vector<Ranked> diagnostics_;  // at most kMaxDiagnostics
  std::size_t found_ = 0;            // all diagnostics, kept or not
  int next_rank_ = 0;
};

}  // namespace

struct Recipe::Impl {
  RecipeData data;

  const Entry* find(std::string_view section, std::string_view key, const char* accessor,
                    std::initializer_list<ValueType> types, bool need_value) const {
    const KeySpec* spec = data.schema.find_key(section, key);
    const std::string label = section_label(section) + " " + std::string(key);
    if (!spec) {
      throw std::logic_error(std::string("Recipe::") + accessor + ": " + label +
                             " is not a declared recipe key");
    }
    if (types.size() && std::find(types.begin(), types.end(), spec->type) == types.end()) {
      throw std::logic_error(std::string("Recipe::") + accessor + ": " + label + " is a " +
                             type_name(spec->type) + " key");
    }
    const auto s = data.sections.find(section);
    const Entry* entry = nullptr;
    if (s != data.sections.end()) {
      const auto k = s->second.find(key);
      if (k != s->second.end()) entry = &k->second;
    }
    if (!entry && need_value) {
      throw std::logic_error(std::string("Recipe::") + accessor + ": " + label +
                             " is unset and has no default; check has_value() first");
    }
    return entry;
  }
};

Recipe::Recipe(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

namespace {

// Reads the recipe (through `read`), applies the overrides, and fills
// defaults; throws RecipeError with every diagnostic if anything is wrong.
template <typename Read>
void load_into(RecipeData& data, const std::vector<std::string>& overrides, Read&& read) {
  Loader loader(data);
  read(loader);
  loader.apply_overrides(overrides);
  std::vector<Diagnostic> diagnostics = loader.diagnostics();
  if (!diagnostics.empty()) throw RecipeError(std::move(diagnostics), loader.omitted());
  loader.fill_defaults();
}

}  // namespace

Recipe Recipe::load(const fs::path& file, const std::vector<std::string>& overrides,
                    const Schema& schema) {
  auto impl = std::make_shared<Impl>();
  impl->data.schema = schema;
  impl->data.source_name = file.string();
  load_into(impl->data, overrides, [&](Loader& loader) {
    const std::string& name = impl->data.source_name;
    std::string why;
    const std::optional<std::string> text = read_file(file, why);
    if (!text) {
      loader.report_unreadable(name, why);
      return;
    }
    const fs::path absolute = fs::absolute(file).lexically_normal();
    loader.read_recipe(*text, name, absolute.parent_path(), file_identity(absolute));
  });
  return Recipe(std::move(impl));
}

Recipe Recipe::from_string(std::string_view text, const std::string& virtual_name,
                           const fs::path& base_dir, const std::vector<std::string>& overrides,
                           const Schema& schema) {
  auto impl = std::make_shared<Impl>();
  impl->data.schema = schema;
  impl->data.source_name = virtual_name;
  load_into(impl->data, overrides, [&](Loader& loader) {
    loader.read_recipe(text, virtual_name, fs::absolute(base_dir).lexically_normal(),
                       "<string>:" + virtual_name);
  });
  return Recipe(std::move(impl));
}

std::string Recipe::get_string(std::string_view section, std::string_view key) const {
  const Entry* e = impl_->find(section, key, "get_string", {ValueType::kString}, true);
  return std::get<std::string>(e->value);
}

std::int64_t Recipe::get_int(std::string_view section, std::string_view key) const {
  const Entry* e = impl_->find(section, key, "get_int", {ValueType::kInteger}, true);
  return std::get<std::int64_t>(e->value);
}

double Recipe::get_float(std::string_view section, std::string_view key) const {
  return std::get<double>(impl_->find(section, key, "get_float", {ValueType::kFloat}, true)->value);
}

bool Recipe::get_bool(std::string_view section, std::string_view key) const {
  return std::get<bool>(impl_->find(section, key, "get_bool", {ValueType::kBoolean}, true)->value);
}

std::vector<std::string> Recipe::get_strings(std::string_view section, std::string_view key) const {
  return std::get<std::vector<std::string>>(
      impl_->find(section, key, "get_strings", {ValueType::kStringArray}, true)->value);
}

TargetPattern Recipe::get_pattern(std::string_view section, std::string_view key) const {
  const Value& v =
      impl_->find(section, key, "get_pattern", {ValueType::kStringOrArray}, true)->value;
  TargetPattern p;
  if (const auto* regex = std::get_if<std::string>(&v)) {
    p.is_regex = true;
    p.regex = *regex;
  } else {
    p.names = std::get<std::vector<std::string>>(v);
  }
  return p;
}

fs::path Recipe::get_path(std::string_view section, std::string_view key) const {
  const Entry* e = impl_->find(section, key, "get_path", {ValueType::kPath}, true);
  return fs::path(std::get<std::string>(e->value));
}

json Recipe::get_table_json(std::string_view section, std::string_view key) const {
  return impl_->find(section, key, "get_table_json", {ValueType::kTable}, true)->table;
}

const Value& Recipe::get_value(std::string_view section, std::string_view key) const {
  return impl_->find(section, key, "get_value",
                     {ValueType::kString, ValueType::kInteger, ValueType::kFloat, ValueType::kBoolean,
                      ValueType::kStringArray, ValueType::kStringOrArray, ValueType::kPath},
                     true)
      ->value;
}

bool Recipe::has_value(std::string_view section, std::string_view key) const {
  return impl_->find(section, key, "has_value", {}, false) != nullptr;
}

bool Recipe::is_set(std::string_view section, std::string_view key) const {
  const Entry* e = impl_->find(section, key, "is_set", {}, false);
  return e && e->user_set;
}

std::optional<std::string> Recipe::where(std::string_view section, std::string_view key) const {
  const Entry* e = impl_->find(section, key, "where", {}, false);
  if (!e || !e->user_set) return std::nullopt;
  return e->where;
}

std::string Recipe::to_toml() const {
  const RecipeData& d = impl_->data;
  // A comment holds one line of printable UTF-8 (TOML refuses control
  // characters in comments): line breaks become spaces, other control
  // characters and bytes that are not UTF-8 (a file name can hold any) \xNN.
  const auto comment = [](const std::string& s) {
    std::string out;
    for (std::size_t i = 0; i < s.size();) {
      const auto c = static_cast<unsigned char>(s[i]);
      const std::size_t n = utf8_char_length(s, i);
      if (c == '\n' || c == '\r') {
        out += ' ';
      } else if (n == 0 || (c < 0x20 && c != '\t') || c == 0x7F) {
        out += hex_escape(c);
      } else {
        out.append(s, i, n);
        i += n;
        continue;
      }
      ++i;
    }
    return out;
  };
  std::ostringstream out;
  out << "# Resolved recipe: every key with the value the run uses, defaults included.\n"
      << "# From " << comment(d.source_name);
  if (d.files.size() > 1) {
    out << " with its bases";
    for (std::size_t i = 1; i < d.files.size(); ++i) {
      out << (i > 1 ? ", " : " ") << comment(d.files[i]);
    }
  }
  out << "; it loads again as it is.\n";
  for (const SectionSpec& section : d.schema.sections) {
    out << "\n[" << section.name << "]\n";
    const auto entries = d.sections.find(section.name);
    const auto find = [&](const std::string& key) -> const Entry* {
      if (entries == d.sections.end()) return nullptr;
      const auto e = entries->second.find(key);
      return e == entries->second.end() ? nullptr : &e->second;
    };
    const auto origin = [&](const Entry& e) {
      if (!e.user_set) return std::string("  # default");
      return (e.times_set > 1 ? "  # merged, last from " : "  # ") + comment(e.where);
    };
    for (const KeySpec& spec : section.keys) {
      if (spec.type == ValueType::kTable) continue;  // written as sub-tables below
      const Entry* e = find(spec.name);
      if (!e) {
        out << "# " << spec.name << " is unset\n";
        continue;
      }
      out << render_key(spec.name) << " = " << toml_literal(e->value) << origin(*e) << "\n";
    }
    for (const KeySpec& spec : section.keys) {
      if (spec.type != ValueType::kTable) continue;
      const Entry* e = find(spec.name);
      if (!e) {
        out << "# " << spec.name << " is unset\n";
        continue;
      }
      out << "\n[" << section.name << "." << render_key(spec.name) << "]" << origin(*e) << "\n";
      for (auto it = e->table.begin(); it != e->table.end(); ++it) {
        out << render_key(it.key()) << " = " << json_to_inline_toml(it.value()) << "\n";
      }
    }
  }
  return out.str();
}

const std::string& Recipe::source_name() const { return impl_->data.source_name; }

const std::vector<std::string>& Recipe::files() const { return impl_->data.files; }

const Schema& Recipe::schema() const { return impl_->data.schema; }

}  // namespace peftfw::recipe
