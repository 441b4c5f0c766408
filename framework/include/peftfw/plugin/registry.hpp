// Loads plugins from shared libraries at run time and hands out their factories.
//
// Discovery: the `plugins/` folder next to the peftfw executable, then every
// folder in PEFTFW_PLUGIN_PATH (':'-separated). Before dlopen, each candidate
// is checked with plain file I/O: it must be a regular file (not a folder,
// pipe or broken link), writable by nobody but this user and root (its folder
// too), and an ELF shared library for this machine whose headers, segments and
// dynamic section all lie inside the file (a truncated copy would otherwise
// crash the process with SIGBUS inside dlopen). Then the plugin's manifest is
// checked: ABI, LibTorch version, compiler, id not already taken. Everything
// refused is recorded with the reason (see refused()); the others still load.
// Loaded libraries are never unloaded (objects they created may live until
// process exit).
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "peftfw/data/chat_format.hpp"
#include "peftfw/plugin/adapter.hpp"
#include "peftfw/recipe/schema.hpp"

#include "peftfw/plugin/registrar.hpp"

namespace peftfw {

struct LoadedPlugin {
  std::string id;
  std::string kind;
  std::string version;
  std::string description;
  std::filesystem::path file;
};

struct RefusedPlugin {
  std::filesystem::path file;  // a plugin file, or a whole plugin folder
  std::string reason;
};

class PluginRegistry {
 public:
  // The process-wide registry, discovering plugins on first use.
  static PluginRegistry& instance();

  // Loads every plugin file in `folder` (non-recursive, "*.so", in name order). A missing
  // folder is skipped silently; a folder others can write to is refused as a whole; entries
  // named *.so that cannot be loaded, and names like foo.so.1, are recorded as refused.
  void load_folder(const std::filesystem::path& folder);
  // Loads one file; returns false (and records the reason) when refused.
  bool load_file(const std::filesystem::path& file);

  const std::vector<LoadedPlugin>& loaded() const;
  const std::vector<RefusedPlugin>& refused() const;

  // Lookups. Each throws InputError listing what is available when nothing matches.
  std::shared_ptr<ArchitecturePlugin> architecture_for_model_type(const std::string& model_type) const;
  std::shared_ptr<ArchitecturePlugin> architecture(const std::string& id) const;
  std::shared_ptr<AdapterPlugin> adapter_for_method(const std::string& method) const;
  AdapterMethod adapter_method(const std::string& method) const;
  // The recipe schema: the built-in sections and keys, [adapter] method's choices and default from
  // the loaded adapter plugins, and their keys and sections (PluginRegistry checks at load time
  // that none clashes). Recipes are loaded with it; `peftfw schema` prints it.
  const recipe::Schema& recipe_schema() const;
  std::shared_ptr<PersistencePlugin> persistence(const std::string& id) const;
  // Every chat format the loaded architecture plugins supply, in load order.
  std::vector<data::ChatFormat> chat_formats() const;

  PluginRegistry();
  ~PluginRegistry();
  PluginRegistry(const PluginRegistry&) = delete;
  PluginRegistry& operator=(const PluginRegistry&) = delete;

 private:
  std::optional<std::string> adapter_clash(const AdapterPlugin& adapter) const;

  struct State;
  std::unique_ptr<State> state_;
};

// Folders searched by PluginRegistry::instance(), in order.
std::vector<std::filesystem::path> default_plugin_folders();

}  // namespace peftfw
