// Loads plugins from shared libraries at run time and hands out their factories.
//
// Discovery: the `plugins/` folder next to the peftfw executable, then every
// folder in PEFTFW_PLUGIN_PATH (':'-separated). A file that is not a plugin,
// has the wrong ABI, LibTorch version or compiler, or claims an id already
// taken is refused with a message naming the file and the reason; the others
// still load. Loaded libraries are never unloaded (objects they created may
// live until process exit).
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

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
  std::filesystem::path file;
  std::string reason;
};

class PluginRegistry {
 public:
  // The process-wide registry, discovering plugins on first use.
  static PluginRegistry& instance();

  // Loads every plugin file in `folder` (non-recursive, "*.so").
  void load_folder(const std::filesystem::path& folder);
  // Loads one file; returns false (and records the reason) when refused.
  bool load_file(const std::filesystem::path& file);

  const std::vector<LoadedPlugin>& loaded() const;
  const std::vector<RefusedPlugin>& refused() const;

  // Lookups. Each throws InputError listing what is available when nothing matches.
  std::shared_ptr<ArchitecturePlugin> architecture_for_model_type(const std::string& model_type) const;
  std::shared_ptr<ArchitecturePlugin> architecture(const std::string& id) const;
  std::shared_ptr<AdapterPlugin> adapter_for_method(const std::string& method) const;
  std::shared_ptr<PersistencePlugin> persistence(const std::string& id) const;

  PluginRegistry();
  ~PluginRegistry();
  PluginRegistry(const PluginRegistry&) = delete;
  PluginRegistry& operator=(const PluginRegistry&) = delete;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Folders searched by PluginRegistry::instance(), in order.
std::vector<std::filesystem::path> default_plugin_folders();

}  // namespace peftfw
