// Plugin discovery and refusal: good, wrong-ABI, duplicate, no-entry and
// not-a-library files in one folder; the good one loads, each other one is
// refused with a message naming the file and the reason.
#include <gtest/gtest.h>

#include <cstdlib>

#include "peftfw/error.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/persistence.hpp"
#include "peftfw/plugin/registry.hpp"

namespace fs = std::filesystem;
using peftfw::PluginRegistry;

namespace {
fs::path plugin_dir() {
  return fs::path(PEFTFW_TEST_PLUGIN_DIR);
}
const peftfw::RefusedPlugin* refused(const PluginRegistry& r, const std::string& file) {
  for (const auto& x : r.refused())
    if (x.file.filename() == file) return &x;
  return nullptr;
}
}  // namespace

TEST(Registry, LoadsGoodPluginsAndRefusesBadOnes) {
  PluginRegistry reg;
  reg.load_folder(plugin_dir());

  ASSERT_EQ(reg.loaded().size(), 1u);
  EXPECT_EQ(reg.loaded()[0].id, "test_good");
  EXPECT_EQ(reg.loaded()[0].kind, "persistence");
  EXPECT_EQ(reg.loaded()[0].version, "9.9.9");
  EXPECT_EQ(reg.persistence("test_good_format")->id(), "test_good_format");

  const auto* abi = refused(reg, "test_plugin_bad_abi.so");
  ASSERT_NE(abi, nullptr);
  EXPECT_NE(abi->reason.find("ABI version 999"), std::string::npos) << abi->reason;
  EXPECT_NE(abi->reason.find("ABI version 1"), std::string::npos) << abi->reason;

  const auto* dup = refused(reg, "test_plugin_good.so");
  const auto* dup2 = refused(reg, "test_plugin_duplicate.so");
  // Files load in name order: test_plugin_duplicate.so first, so test_plugin_good.so is the
  // duplicate. Exactly one of the two is refused for the id clash.
  ASSERT_TRUE((dup == nullptr) != (dup2 == nullptr));
  const auto* clash = dup ? dup : dup2;
  EXPECT_NE(clash->reason.find("'test_good' is already provided by"), std::string::npos)
      << clash->reason;

  const auto* none = refused(reg, "test_plugin_no_entry.so");
  ASSERT_NE(none, nullptr);
  EXPECT_NE(none->reason.find("does not export 'peftfw_plugin_entry_v1'"), std::string::npos);

  const auto* text = refused(reg, "not_a_library.so");
  ASSERT_NE(text, nullptr);
  EXPECT_NE(text->reason.find("cannot be loaded as a shared library"), std::string::npos);
  EXPECT_EQ(reg.refused().size(), 4u);
}

TEST(Registry, LookupFailureListsWhatIsAvailable) {
  PluginRegistry reg;
  reg.load_folder(plugin_dir());
  try {
    reg.persistence("gguf");
    FAIL() << "expected InputError";
  } catch (const peftfw::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("available formats: test_good_format"), std::string::npos)
        << e.what();
  }
}

TEST(Registry, BuildPluginFolderHoldsTheGranitePlugin) {
  // The process-wide registry searches bin/plugins next to the executable.
  const auto& loaded = PluginRegistry::instance().loaded();
  bool found = false;
  for (const auto& p : loaded) found |= p.id == "granite_hybrid";
  EXPECT_TRUE(found);
  EXPECT_EQ(PluginRegistry::instance().architecture_for_model_type("granitemoehybrid")->id(),
            "granite_hybrid");
}
