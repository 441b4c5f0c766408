// A minimal persistence plugin for registry tests. Built several times with
// different TEST_PLUGIN_ID / TEST_PLUGIN_ABI to make good, duplicate and
// wrong-ABI plugin files.
#include <torch/version.h>

#include "peftfw/plugin/persistence.hpp"
#include "peftfw/plugin/registrar.hpp"

namespace {

class TestFormat final : public peftfw::PersistencePlugin {
 public:
  std::string id() const override { return TEST_PLUGIN_ID "_format"; }
  void save(const peftfw::SaveRequest&, const std::filesystem::path&) const override {}
};

void register_test(peftfw::PluginRegistrar& r) { r.add_persistence(std::make_shared<TestFormat>()); }

}  // namespace

#ifndef TEST_PLUGIN_ABI
PEFTFW_DEFINE_PLUGIN(TEST_PLUGIN_ID, "persistence", "9.9.9", "registry test plugin", register_test)
#else
// Same as PEFTFW_DEFINE_PLUGIN but claiming another ABI version.
namespace {
int trampoline(void* registrar, char* error, size_t size) {
  return peftfw::detail::guarded_register(register_test, registrar, error, size);
}
}  // namespace
extern "C" PEFTFW_PLUGIN_EXPORT const peftfw_plugin_manifest* peftfw_plugin_entry_v1(void) {
  static const peftfw_plugin_manifest m = {TEST_PLUGIN_ABI,   TEST_PLUGIN_ID,        "persistence",
                                           "9.9.9",           TORCH_VERSION,         PEFTFW_COMPILER_ID,
                                           "wrong ABI test plugin", &trampoline};
  return &m;
}
#endif
