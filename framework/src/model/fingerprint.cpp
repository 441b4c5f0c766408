// Base fingerprints and the adapter-folder checks built on them.
#include "peftfw/model/fingerprint.hpp"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <regex>

#include "peftfw/data/dataset.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/io/safetensors.hpp"
#include "peftfw/model/loader.hpp"
#include "peftfw/model/report.hpp"

namespace fs = std::filesystem;

namespace peftfw {
namespace {

constexpr const char* kManifestFile = "peftfw_manifest.json";
constexpr const char* kAdapterConfigFile = "adapter_config.json";
constexpr const char* kAdapterTensorFile = "adapter_model.safetensors";
constexpr const char* kPeftPrefix = "base_model.model.";
constexpr const char* kAdapterLeaves[] = {".lora_A.weight", ".lora_B.weight",
                                          ".lora_magnitude_vector"};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string in_quotes(const std::string& s) { return "\"" + s + "\""; }

// The raw JSON header of a safetensors file (already validated by Checkpoint::open).
std::string read_header(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  unsigned char len[8] = {};
  if (!f.read(reinterpret_cast<char*>(len), 8))
    throw RuntimeError(path + ": cannot read the safetensors header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
  std::string header(static_cast<std::size_t>(n), '\0');
  if (n > 0 && !f.read(header.data(), static_cast<std::streamsize>(n)))
    throw RuntimeError(path + ": cannot read its " + std::to_string(n) +
                       "-byte safetensors header");
  return header;
}

// Where the base's config comes from, for messages.
std::string describe_source(const ModelSource& s) {
  if (!s.random_init) return s.dir.string();
  std::string from = !s.dir.empty()           ? (s.dir / "config.json").string()
                     : !s.config_file.empty() ? s.config_file.string()
                                              : std::string("[model.config_inline]");
  return "random init (seed " + std::to_string(s.seed) + ") from " + from;
}

std::string short_digest(const std::string& digest) {
  return digest.size() > 23 ? digest.substr(0, 23) + "..." : digest;
}

// ---- PEFT's target_modules rule --------------------------------------------------------

// One side of the rule (target_modules or exclude_modules): a regex over the whole
// name, or a list of names / '.'-bounded suffixes.
struct NameRule {
  bool present = false;
  bool is_regex = false;
  bool all_linear = false;
  std::string regex_text;
  std::regex regex;
  std::vector<std::string> names;
};

NameRule parse_name_rule(const nlohmann::json& config, const char* key, const std::string& file,
                         bool required) {
  NameRule rule;
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) {
    if (required)
      throw InputError(
          file + ": key '" + key +
          "' is missing; expected the adapted modules as PEFT "
          "writes them (a list such as [\"mamba.in_proj\", \"self_attn.q_proj\"], or a regex)");
    return rule;
  }
  rule.present = true;
  if (it->is_string()) {
    rule.is_regex = true;
    rule.regex_text = it->get<std::string>();
    std::string lower = rule.regex_text;
    std::transform(lower.begin(), lower.end(), lower.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    if (required && lower == "all-linear") {
      rule.all_linear = true;
      return rule;
    }
    try {
      rule.regex = std::regex(rule.regex_text, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      throw InputError(file + ": key '" + key + "': " + in_quotes(rule.regex_text) +
                       " is not a valid regex (" + e.what() + ")");
    }
    return rule;
  }
  if (it->is_array()) {
    for (const auto& e : *it) {
      if (!e.is_string())
        throw InputError(file + ": key '" + key +
                         "': expected a list of module names, found an element " +
                         io::describe_json_value(e));
      rule.names.push_back(e.get<std::string>());
    }
    return rule;
  }
  throw InputError(file + ": key '" + key +
                   "': expected a list of module names or a regex string, found " +
                   io::describe_json_value(*it));
}

struct TargetRule {
  NameRule target, exclude;
  std::optional<std::set<int64_t>> layers;  // layers_to_transform
  std::vector<std::regex> layer_patterns;   // from layers_pattern; empty = PEFT's default

  bool excluded(const std::string& m) const {
    if (!exclude.present) return false;
    if (exclude.is_regex) return std::regex_match(m, exclude.regex);
    for (const auto& e : exclude.names)
      if (m == e || ends_with(m, "." + e)) return true;
    return false;
  }

  // The first numbered segment after a layers_pattern match, as PEFT finds it.
  std::optional<int64_t> layer_index(const std::string& m) const {
    static const std::regex kDefault(R"(^.*?\.[^.]*\.(\d+)\.)");
    std::smatch match;
    if (layer_patterns.empty()) {
      if (std::regex_search(m, match, kDefault)) return std::stoll(match[1].str());
      return std::nullopt;
    }
    for (const auto& re : layer_patterns)
      if (std::regex_search(m, match, re)) return std::stoll(match[1].str());
    return std::nullopt;
  }

  // Does list entry `entry` select module `m`? (PEFT: an exact name skips the layer filter.)
  bool entry_selects(const std::string& entry, const std::string& m) const {
    if (excluded(m)) return false;
    if (m == entry) return true;
    if (!ends_with(m, "." + entry)) return false;
    if (!layers) return true;
    auto idx = layer_index(m);
    return idx && layers->count(*idx);
  }

  bool selects(const std::string& m) const {
    if (excluded(m)) return false;
    if (target.all_linear) return m != "lm_head" && !ends_with(m, ".lm_head");
    if (target.is_regex) return std::regex_match(m, target.regex);
    for (const auto& e : target.names)
      if (entry_selects(e, m)) return true;
    return false;
  }
};

TargetRule parse_target_rule(const nlohmann::json& config, const std::string& file) {
  if (!config.is_object()) throw InputError(file + ": expected a JSON object");
  TargetRule rule;
  rule.target = parse_name_rule(config, "target_modules", file, /*required=*/true);
  rule.exclude = parse_name_rule(config, "exclude_modules", file, /*required=*/false);
  auto lt = config.find("layers_to_transform");
  if (lt != config.end() && !lt->is_null()) {
    std::set<int64_t> layers;
    auto bad = [&]() {
      throw InputError(
          file + ": key 'layers_to_transform': expected an integer or a list of integers, found " +
          io::describe_json_value(*lt));
    };
    if (lt->is_number_integer()) {
      layers.insert(lt->get<int64_t>());
    } else if (lt->is_array()) {
      for (const auto& e : *lt) {
        if (!e.is_number_integer()) bad();
        layers.insert(e.get<int64_t>());
      }
    } else {
      bad();
    }
    if (lt->is_number_integer() || !layers.empty())
      rule.layers = layers;  // PEFT: [] means all layers
  }
  auto lp = config.find("layers_pattern");
  if (lp != config.end() && !lp->is_null()) {
    std::vector<std::string> patterns;
    if (lp->is_string()) {
      if (!lp->get<std::string>().empty()) patterns.push_back(lp->get<std::string>());
    } else if (lp->is_array()) {
      for (const auto& e : *lp) {
        if (!e.is_string())
          throw InputError(file + ": key 'layers_pattern': expected strings, found an element " +
                           io::describe_json_value(e));
        patterns.push_back(e.get<std::string>());
      }
    } else {
      throw InputError(file +
                       ": key 'layers_pattern': expected a string or a list of strings, found " +
                       io::describe_json_value(*lp));
    }
    for (const auto& p : patterns) {
      try {
        rule.layer_patterns.emplace_back("^(?:.*?\\.)?" + p + "\\.(\\d+)\\.",
                                         std::regex::ECMAScript);
      } catch (const std::regex_error& e) {
        throw InputError(file + ": key 'layers_pattern': " + in_quotes(p) +
                         " is not a valid regex (" + e.what() + ")");
      }
    }
  }
  return rule;
}

// "mamba.in_proj" for "model.layers.3.mamba.in_proj": the names to suggest for target_modules.
std::set<std::string> layer_relative_names(const std::set<std::string>& modules) {
  static const std::regex kLayer(R"(^(?:.*?\.)?layers\.\d+\.(.+)$)");
  std::set<std::string> out;
  std::smatch m;
  for (const auto& name : modules)
    out.insert(std::regex_match(name, m, kLayer) ? m[1].str() : name);
  return out;
}

std::string join_list(const std::vector<std::string>& items, size_t limit = 20) {
  std::string out;
  for (size_t i = 0; i < items.size() && i < limit; ++i) out += "\n    " + items[i];
  if (items.size() > limit)
    out += "\n    ... and " + std::to_string(items.size() - limit) + " more";
  return out;
}

// ---- adapter folders ---------------------------------------------------------------------

// The modules with adapter tensors in adapter_model.safetensors (PEFT keys, prefix removed).
std::set<std::string> modules_with_tensors(const fs::path& file) {
  std::set<std::string> modules;
  auto st = io::SafetensorsFile::open(file.string());
  for (auto key : st.names()) {
    if (key.rfind(kPeftPrefix, 0) != 0) continue;
    key = key.substr(std::string(kPeftPrefix).size());
    for (const char* leaf : kAdapterLeaves)
      if (ends_with(key, leaf))
        modules.insert(key.substr(0, key.size() - std::string(leaf).size()));
  }
  return modules;
}

struct RecordedBase {
  std::optional<std::string>
      name;  // manifest base.name_or_path, else adapter_config's base_model_name_or_path
  std::optional<BaseFingerprint> fingerprint;
};

RecordedBase read_recorded_base(const fs::path& adapter_dir,
                                std::optional<nlohmann::json>& adapter_config) {
  RecordedBase out;
  const auto cfg_path = adapter_dir / kAdapterConfigFile;
  if (fs::exists(cfg_path)) {
    auto cfg = io::JsonConfig::load(cfg_path.string());
    out.name = cfg.optional_string("base_model_name_or_path");
    adapter_config = cfg.raw();
  }
  const auto manifest_path = adapter_dir / kManifestFile;
  if (!fs::exists(manifest_path)) return out;
  auto manifest =
      io::parse_json_text(io::read_text_file(manifest_path.string()), manifest_path.string());
  if (!manifest.is_object())
    throw InputError(manifest_path.string() +
                     ": expected a JSON object (a peftfw adapter manifest)");
  auto base = manifest.find("base");
  if (base == manifest.end() || base->is_null()) return out;
  auto field = [&](const char* key) -> std::optional<std::string> {
    auto it = base->find(key);
    if (it == base->end() || it->is_null()) return std::nullopt;
    if (!it->is_string())
      throw InputError(manifest_path.string() + ": key 'base." + key +
                       "': expected a string, found " + io::describe_json_value(*it));
    return it->get<std::string>();
  };
  if (!base->is_object())
    throw InputError(manifest_path.string() + ": key 'base': expected an object, found " +
                     io::describe_json_value(*base));
  if (auto name = field("name_or_path")) out.name = name;
  if (auto digest = field("fingerprint")) {
    BaseFingerprint fp;
    fp.digest = *digest;
    fp.config_sha256 = field("config_sha256").value_or("");
    fp.weights = field("weights").value_or("");
    out.fingerprint = fp;
  }
  return out;
}

BaseMatch report_mismatch(const std::string& what, bool strict, std::ostream& warn) {
  const std::string tail =
      "\n  The adapter's tensors were trained against its own base; on another one its outputs "
      "mean "
      "little. Give the base it was made for";
  if (strict) throw InputError(what + tail + " (refused because of --strict).");
  warn << "warning: " << what << tail << ", or pass --strict to refuse such a pair.\n";
  return BaseMatch::kMismatch;
}

}  // namespace

// ---- fingerprints ----------------------------------------------------------------------

BaseFingerprint fingerprint_base(const ModelSource& source) {
  BaseFingerprint fp;
  const auto config = read_model_config(source);
  fp.config_sha256 = data::sha256_hex(config.raw().dump());  // std::map keys: sorted, compact
  std::string material = "peftfw base fingerprint v1\nconfig sha256 " + fp.config_sha256 + "\n";
  if (source.random_init) {
    material += "random_init seed " + std::to_string(source.seed) + "\n";
    fp.weights = "random init, seed " + std::to_string(source.seed);
  } else {
    if (source.dir.empty())
      throw InputError("[model]: no checkpoint folder and no random init: nothing to fingerprint");
    const auto ckpt = io::Checkpoint::open(source.dir.string());
    std::map<std::string, std::string> files;  // file name -> its line, sorted by name
    uint64_t total = 0;
    for (const auto& f : ckpt.files()) {
      const auto size = fs::file_size(f.path());
      total += size;
      const auto name = fs::path(f.path()).filename().string();
      files[name] = "file " + name + " size " + std::to_string(size) + " header sha256 " +
                    data::sha256_hex(read_header(f.path())) + "\n";
    }
    for (const auto& [name, line] : files) material += line;
    fp.weights =
        "checkpoint: " +
        (files.size() == 1 ? files.begin()->first : std::to_string(files.size()) + " files") +
        ", " + with_commas(static_cast<int64_t>(total)) + " bytes";
  }
  fp.digest = "sha256:" + data::sha256_hex(material);
  return fp;
}

std::string base_fingerprint(const ModelSource& source) { return fingerprint_base(source).digest; }

nlohmann::json base_manifest_entry(const BaseFingerprint& fp, const std::string& name_or_path) {
  nlohmann::json out = nlohmann::json::object();
  out["name_or_path"] =
      name_or_path.empty() ? nlohmann::json(nullptr) : nlohmann::json(name_or_path);
  out["fingerprint"] = fp.digest;
  out["config_sha256"] = fp.config_sha256;
  out["weights"] = fp.weights;
  return out;
}

// ---- target_modules ----------------------------------------------------------------------

std::set<std::string> peft_selected_modules(const nlohmann::json& config,
                                            const std::string& config_file,
                                            const std::vector<std::string>& modules) {
  const auto rule = parse_target_rule(config, config_file);
  std::set<std::string> out;
  for (const auto& m : modules)
    if (rule.selects(m)) out.insert(m);
  return out;
}

void check_target_modules(const nlohmann::json& config, const std::string& config_file,
                          const std::set<std::string>& with_tensors,
                          const std::string& tensor_file) {
  const auto rule = parse_target_rule(config, config_file);
  std::vector<std::string> unselected, idle;
  for (const auto& m : with_tensors)
    if (!rule.selects(m)) unselected.push_back(m);
  if (rule.target.is_regex && !rule.target.all_linear) {
    bool any = false;
    for (const auto& m : with_tensors) any = any || rule.selects(m);
    if (!any) idle.push_back("regex " + in_quotes(rule.target.regex_text));
  } else if (!rule.target.is_regex) {
    for (const auto& e : rule.target.names) {
      bool any = false;
      for (const auto& m : with_tensors) any = any || rule.entry_selects(e, m);
      if (!any) idle.push_back(in_quotes(e));
    }
  }
  if (unselected.empty() && idle.empty()) return;
  std::string msg =
      config_file + ": key 'target_modules' does not match the tensors in " + tensor_file;
  if (!unselected.empty())
    msg += "\n  modules with tensors that target_modules does not select (" +
           std::to_string(unselected.size()) + "):" + join_list(unselected);
  if (!idle.empty())
    msg += "\n  target_modules entries that select no module with tensors (" +
           std::to_string(idle.size()) + "):" + join_list(idle);
  std::string suggestion;
  for (const auto& n : layer_relative_names(with_tensors))
    suggestion += (suggestion.empty() ? "" : ", ") + in_quotes(n);
  msg +=
      "\n  PEFT attaches adapters by target_modules, so it would load this adapter differently "
      "than "
      "its tensors say. Set target_modules to the adapted modules: [" +
      suggestion + "]";
  throw InputError(msg);
}

// ---- the adapter's base ------------------------------------------------------------------

BaseMatch check_adapter_base(const fs::path& adapter_dir, const ModelSource& base, bool strict,
                             std::ostream& warn) {
  // Not an adapter folder at all: nothing to compare; loading it says what is missing.
  if (!fs::exists(adapter_dir / kAdapterConfigFile) && !fs::exists(adapter_dir / kManifestFile))
    return BaseMatch::kUnverified;
  std::optional<nlohmann::json> adapter_config;
  const auto recorded = read_recorded_base(adapter_dir, adapter_config);
  const auto given_name = describe_source(base);
  const auto recorded_name = recorded.name.value_or("(no name recorded)");

  if (recorded.fingerprint) {
    const auto given = fingerprint_base(base);
    const auto& made = *recorded.fingerprint;
    if (made.digest == given.digest) return BaseMatch::kMatches;
    std::string why;
    if (!made.config_sha256.empty() && made.config_sha256 != given.config_sha256)
      why += "\n  the configs differ (config sha256 " + made.config_sha256.substr(0, 16) +
             "... recorded, " + given.config_sha256.substr(0, 16) + "... given)";
    if (made.weights != given.weights)
      why += "\n  the weights differ: recorded " + made.weights + "; given " + given.weights;
    else if (made.config_sha256 == given.config_sha256)
      why +=
          "\n  same config and file sizes, but the safetensors headers differ (other tensors, "
          "dtypes "
          "or layout)";
    return report_mismatch(
        adapter_dir.string() + " was made for another base model:\n  made for: " + recorded_name +
            " (" + (made.weights.empty() ? "" : made.weights + ", ") + "fingerprint " +
            short_digest(made.digest) + ")\n  given:    " + given_name + " (" + given.weights +
            ", fingerprint " + short_digest(given.digest) + ")" + why,
        strict, warn);
  }

  // Nothing recorded to compare: look for modules that cannot belong to this base.
  std::vector<std::string> problems;
  const auto config = read_model_config(base);
  const auto inventory = find_architecture(config, base.architecture)->describe(config);
  std::vector<std::string> base_modules;
  std::set<std::string> base_set;
  for (const auto& m : inventory.modules) {
    base_modules.push_back(m.name);
    base_set.insert(m.name);
  }
  const auto tensor_file = adapter_dir / kAdapterTensorFile;
  if (fs::exists(tensor_file)) {
    std::vector<std::string> lacking;
    for (const auto& m : modules_with_tensors(tensor_file))
      if (!base_set.count(m)) lacking.push_back(m);
    if (!lacking.empty())
      problems.push_back(tensor_file.string() + " holds tensors for " +
                         std::to_string(lacking.size()) +
                         " module(s) the base does not have:" + join_list(lacking, 10));
  }
  if (adapter_config) {
    const auto cfg_file = (adapter_dir / kAdapterConfigFile).string();
    const auto rule = parse_target_rule(*adapter_config, cfg_file);
    std::vector<std::string> idle;
    if (!rule.target.is_regex) {
      for (const auto& e : rule.target.names) {
        bool any = false;
        for (const auto& m : base_modules) any = any || rule.entry_selects(e, m);
        if (!any) idle.push_back(in_quotes(e));
      }
    } else if (!rule.target.all_linear) {
      bool any = false;
      for (const auto& m : base_modules) any = any || rule.selects(m);
      if (!any) idle.push_back("regex " + in_quotes(rule.target.regex_text));
    }
    if (!idle.empty())
      problems.push_back(cfg_file +
                         ": key 'target_modules' has entries that select no module of the base:" +
                         join_list(idle, 10));
  }
  if (!problems.empty()) {
    std::string what = adapter_dir.string() +
                       " does not fit the base model given:\n  made for: " + recorded_name +
                       "\n  given:    " + given_name;
    for (const auto& p : problems) what += "\n  " + p;
    return report_mismatch(what, strict, warn);
  }
  warn << "note: " << adapter_dir.string() << " records no base fingerprint (no " << kManifestFile
       << " with one: written by HF PEFT or an older peftfw), so peftfw cannot check that it was "
          "made for "
       << given_name << "; its adapter_config.json names base " << recorded_name
       << ". Its modules do exist in that base.\n";
  return BaseMatch::kUnverified;
}

}  // namespace peftfw
