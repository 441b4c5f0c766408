// Run-time plugin loading with Boost.DLL (std::filesystem mode). What a candidate file or
// folder must pass before it reaches dlopen is in plugin_file.cpp.
#define BOOST_DLL_USE_STD_FS 1
#include "peftfw/plugin/registry.hpp"

#include <torch/version.h>

#include <algorithm>
#include <boost/dll/runtime_symbol_info.hpp>
#include <boost/dll/shared_library.hpp>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <sstream>

#include "peftfw/error.hpp"
#include "peftfw/plugin/adapter.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/persistence.hpp"
#include "peftfw/recipe/schema.hpp"
#include "plugin_file.hpp"

namespace fs = std::filesystem;

namespace peftfw {

struct PluginRegistry::State {
  std::vector<boost::dll::shared_library> libraries;  // kept loaded for the process lifetime
  std::vector<LoadedPlugin> loaded;
  std::vector<RefusedPlugin> refused;
  std::vector<std::shared_ptr<ArchitecturePlugin>> architectures;
  std::vector<std::shared_ptr<AdapterPlugin>> adapters;
  std::vector<std::shared_ptr<PersistencePlugin>> persistences;
  std::optional<recipe::Schema> schema;  // recipe_schema(), rebuilt after a plugin loads
};

namespace {

// Collects what one plugin registers, checking it matches the manifest's kind.
class CollectingRegistrar final : public PluginRegistrar {
 public:
  explicit CollectingRegistrar(std::string kind) : kind_(std::move(kind)) {}
  void add_architecture(std::shared_ptr<ArchitecturePlugin> p) override {
    expect("architecture");
    architectures.push_back(std::move(p));
  }
  void add_adapter(std::shared_ptr<AdapterPlugin> p) override {
    expect("adapter");
    adapters.push_back(std::move(p));
  }
  void add_persistence(std::shared_ptr<PersistencePlugin> p) override {
    expect("persistence");
    persistences.push_back(std::move(p));
  }
  std::vector<std::shared_ptr<ArchitecturePlugin>> architectures;
  std::vector<std::shared_ptr<AdapterPlugin>> adapters;
  std::vector<std::shared_ptr<PersistencePlugin>> persistences;

 private:
  void expect(const char* kind) const {
    if (kind_ != kind)
      throw std::runtime_error("plugin declared kind '" + kind_ + "' but registered a " + kind +
                               " factory");
  }
  std::string kind_;
};

bool known_kind(const std::string& k) {
  return k == "architecture" || k == "adapter" || k == "persistence";
}

std::string str_or_empty(const char* s) { return s ? std::string(s) : std::string(); }

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

PluginRegistry::PluginRegistry() : state_(std::make_unique<State>()) {}
PluginRegistry::~PluginRegistry() = default;

std::vector<fs::path> default_plugin_folders() {
  std::vector<fs::path> folders;
  std::error_code ec;
  fs::path exe = boost::dll::program_location(ec);
  if (!ec) folders.push_back(exe.parent_path() / "plugins");
  if (const char* env = std::getenv("PEFTFW_PLUGIN_PATH")) {
    std::stringstream ss(env);
    std::string item;
    while (std::getline(ss, item, ':'))
      if (!item.empty()) folders.emplace_back(item);
  }
  return folders;
}

PluginRegistry& PluginRegistry::instance() {
  // Deliberately never destroyed: plugin libraries must outlive every object
  // they created, including ones held in other static storage.
  static PluginRegistry* registry = [] {
    auto* r = new PluginRegistry();
    for (const auto& folder : default_plugin_folders()) r->load_folder(folder);
    return r;
  }();
  return *registry;
}

void PluginRegistry::load_folder(const fs::path& folder) {
  auto refuse_folder = [&](const std::string& reason) {
    state_->refused.push_back({folder, reason});
  };
  bool missing = false;
  if (auto why = plugin_file::check_folder(folder, missing)) return refuse_folder(*why);
  if (missing) return;  // a missing search folder is not an error
  std::error_code ec;
  std::vector<fs::path> entries;
  fs::directory_iterator it(folder, ec);
  for (; !ec && it != fs::directory_iterator(); it.increment(ec)) entries.push_back(it->path());
  if (ec)
    return refuse_folder("plugin folder " + folder.string() + " cannot be listed: " +
                         ec.message() + "; check its permissions (`ls -ld " + folder.string() +
                         "`)");
  std::sort(entries.begin(), entries.end());  // deterministic order: first one wins an id clash
  for (const auto& entry : entries) {
    const std::string name = entry.filename().string();
    if (ends_with(name, ".so")) {
      load_file(entry);
    } else if (name.find(".so.") != std::string::npos) {
      // foo.so.1 or foo.so.bak: perhaps meant as a plugin, perhaps left behind; say so.
      state_->refused.push_back(
          {entry, "not loaded: only names ending in '.so' are plugin files; if it is a plugin, "
                  "rename it to end in '.so', otherwise move it out of the plugin folder"});
    }
  }
}

bool PluginRegistry::load_file(const fs::path& file) {
  auto refuse = [&](const std::string& reason) {
    state_->refused.push_back({file, reason});
    return false;
  };
  if (auto problem = plugin_file::check_candidate(file)) return refuse(*problem);
  boost::dll::shared_library lib;
  try {
    lib.load(file, boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local);
  } catch (const std::exception& e) {
    return refuse(std::string("cannot be loaded as a shared library: ") + e.what());
  }
  if (!lib.has(PEFTFW_PLUGIN_ENTRY_SYMBOL))
    return refuse("not a peftfw plugin: it does not export '" PEFTFW_PLUGIN_ENTRY_SYMBOL "'");
  auto entry = lib.get<const peftfw_plugin_manifest*()>(PEFTFW_PLUGIN_ENTRY_SYMBOL);
  const peftfw_plugin_manifest* m = entry();
  if (!m) return refuse("its entry point returned no manifest");
  if (m->abi_version != PEFTFW_PLUGIN_ABI_VERSION)
    return refuse("built for plugin ABI version " + std::to_string(m->abi_version) +
                  ", but this peftfw uses ABI version " +
                  std::to_string(PEFTFW_PLUGIN_ABI_VERSION) + "; rebuild it against this peftfw");
  const std::string torch_version = str_or_empty(m->torch_version);
  if (torch_version != TORCH_VERSION)
    return refuse("built against LibTorch " + torch_version + ", but this peftfw uses LibTorch " +
                  TORCH_VERSION + "; rebuild it against the same LibTorch");
  const std::string compiler = str_or_empty(m->compiler);
  if (compiler != PEFTFW_COMPILER_ID)
    return refuse("built with compiler/ABI '" + compiler + "', but this peftfw uses '" +
                  PEFTFW_COMPILER_ID + "'");
  const std::string id = str_or_empty(m->id), kind = str_or_empty(m->kind);
  if (id.empty()) return refuse("its manifest has an empty id");
  if (!known_kind(kind))
    return refuse("unknown plugin kind '" + kind +
                  "' (expected architecture, adapter or persistence)");
  for (const auto& p : state_->loaded)
    if (p.id == id)
      return refuse("plugin id '" + id + "' is already provided by " + p.file.string() +
                    "; remove one of the two files or rename one plugin");
  if (!m->register_plugin) return refuse("its manifest has no register function");

  CollectingRegistrar registrar(kind);
  char error[1024] = {0};
  if (m->register_plugin(&registrar, error, sizeof(error)) != 0)
    return refuse(std::string("registration failed: ") + error);
  for (const auto& adapter : registrar.adapters)
    if (auto clash = adapter_clash(*adapter)) return refuse(*clash);

  auto& s = *state_;
  s.schema.reset();
  s.architectures.insert(s.architectures.end(), registrar.architectures.begin(),
                         registrar.architectures.end());
  s.adapters.insert(s.adapters.end(), registrar.adapters.begin(), registrar.adapters.end());
  s.persistences.insert(s.persistences.end(), registrar.persistences.begin(),
                        registrar.persistences.end());
  s.loaded.push_back({id, kind, str_or_empty(m->version), str_or_empty(m->description), file});
  s.libraries.push_back(std::move(lib));
  return true;
}

// Why an adapter plugin cannot join the loaded ones: a method name already provided (or the
// built-in "none"), or a recipe key or section that the built-in schema or a loaded plugin
// already declares. nullopt when it can.
std::optional<std::string> PluginRegistry::adapter_clash(const AdapterPlugin& adapter) const {
  for (const auto& m : adapter.methods()) {
    if (m.name.empty()) return "it declares a method with an empty name";
    if (m.name == kNoAdapter) return "method '" + m.name + "' is built in (no adapter)";
    for (const auto& a : state_->adapters)
      for (const auto& other : a->methods())
        if (other.name == m.name) return "method '" + m.name + "' is already provided by adapter plugin '" + a->id() + "'";
  }
  const recipe::Schema& schema = recipe_schema();
  for (const auto& section : adapter.recipe_sections()) {
    const recipe::SectionSpec* existing = schema.find_section(section.name);
    if (existing && section.name != "adapter")
      return "its recipe section [" + section.name + "] is already declared";
    if (existing && section.name == "adapter")
      for (const auto& key : section.keys)
        if (existing->find(key.name))
          return "its recipe key [adapter] " + key.name + " is already declared";
  }
  return std::nullopt;
}

const std::vector<LoadedPlugin>& PluginRegistry::loaded() const { return state_->loaded; }
const std::vector<RefusedPlugin>& PluginRegistry::refused() const { return state_->refused; }

namespace {
template <typename T, typename Key>
std::string list_keys(const std::vector<std::shared_ptr<T>>& items, Key key) {
  std::string out;
  for (const auto& it : items)
    for (const auto& k : key(*it)) out += (out.empty() ? "" : ", ") + k;
  return out.empty() ? "(none loaded)" : out;
}
std::string refused_hint(const std::vector<RefusedPlugin>& refused) {
  if (refused.empty()) return "";
  return " (" + std::to_string(refused.size()) + " plugin file(s) were refused: see `peftfw plugins`)";
}
}  // namespace

std::shared_ptr<ArchitecturePlugin> PluginRegistry::architecture_for_model_type(
    const std::string& model_type) const {
  for (const auto& a : state_->architectures)
    for (const auto& t : a->model_types())
      if (t == model_type) return a;
  throw InputError("no architecture plugin handles model_type '" + model_type +
                   "'; supported model types: " +
                   list_keys(state_->architectures, [](const ArchitecturePlugin& a) {
                     return a.model_types();
                   }) +
                   refused_hint(state_->refused));
}

std::vector<data::ChatFormat> PluginRegistry::chat_formats() const {
  std::vector<data::ChatFormat> out;
  for (const auto& a : state_->architectures)
    for (auto& f : a->chat_formats()) out.push_back(std::move(f));
  return out;
}

std::shared_ptr<ArchitecturePlugin> PluginRegistry::architecture(const std::string& id) const {
  for (const auto& a : state_->architectures)
    if (a->id() == id) return a;
  throw InputError("no architecture plugin with id '" + id + "'; loaded: " +
                   list_keys(state_->architectures,
                             [](const ArchitecturePlugin& a) {
                               return std::vector<std::string>{a.id()};
                             }) +
                   refused_hint(state_->refused));
}

namespace {
std::vector<std::string> method_names(const AdapterPlugin& a) {
  std::vector<std::string> out;
  for (const auto& m : a.methods()) out.push_back(m.name);
  return out;
}
}  // namespace

std::shared_ptr<AdapterPlugin> PluginRegistry::adapter_for_method(const std::string& method) const {
  for (const auto& a : state_->adapters)
    for (const auto& m : a->methods())
      if (m.name == method) return a;
  throw InputError("no adapter plugin provides method '" + method + "'; available methods: " +
                   list_keys(state_->adapters, method_names) + refused_hint(state_->refused));
}

AdapterMethod PluginRegistry::adapter_method(const std::string& method) const {
  for (const auto& a : state_->adapters)
    for (const auto& m : a->methods())
      if (m.name == method) return m;
  adapter_for_method(method);  // throws the error listing what is available
  return {};
}

namespace {
// [adapter] with the loaded methods: method's choices ("none" and every method), its doc and
// default, then the plugins' [adapter] keys right after it.
void extend_adapter_section(recipe::SectionSpec& section,
                            const std::vector<std::shared_ptr<AdapterPlugin>>& adapters) {
  auto method = std::find_if(section.keys.begin(), section.keys.end(),
                             [](const recipe::KeySpec& k) { return k.name == "method"; });
  if (method == section.keys.end()) return;
  bool has_default = false;
  for (const auto& a : adapters)
    for (const auto& m : a->methods()) {
      method->choices.push_back(m.name);
      method->doc += " " + m.name + ": " + m.summary;
      if (m.is_default && !has_default) method->default_value = m.name, has_default = true;
    }
  std::vector<recipe::KeySpec> added;
  for (const auto& a : adapters)
    for (const auto& own : a->recipe_sections())
      if (own.name == "adapter") added.insert(added.end(), own.keys.begin(), own.keys.end());
  section.keys.insert(method + 1, added.begin(), added.end());
}
}  // namespace

const recipe::Schema& PluginRegistry::recipe_schema() const {
  auto& s = *state_;
  if (s.schema) return *s.schema;
  recipe::Schema schema;
  for (auto section : recipe::builtin_schema().sections) {
    const bool is_adapter = section.name == "adapter";
    if (is_adapter) extend_adapter_section(section, s.adapters);
    schema.sections.push_back(std::move(section));
    if (is_adapter)  // the plugins' own sections follow [adapter]
      for (const auto& a : s.adapters)
        for (auto& own : a->recipe_sections())
          if (own.name != "adapter") schema.sections.push_back(std::move(own));
  }
  s.schema = std::move(schema);
  return *s.schema;
}

std::shared_ptr<PersistencePlugin> PluginRegistry::persistence(const std::string& id) const {
  for (const auto& p : state_->persistences)
    if (p->id() == id) return p;
  throw InputError("no persistence plugin '" + id + "'; available formats: " +
                   list_keys(state_->persistences,
                             [](const PersistencePlugin& p) {
                               return std::vector<std::string>{p.id()};
                             }) +
                   refused_hint(state_->refused));
}

}  // namespace peftfw
