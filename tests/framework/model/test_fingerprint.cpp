// Base fingerprints, check_adapter_base and PEFT's target_modules rule
// (peftfw/model/fingerprint.hpp). Digest constants were computed with Python's
// hashlib from the documented material; rule cases follow PEFT 0.21's
// check_target_module_exists by hand.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "../../common/expect_error.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/tensor_bridge.hpp"
#include "peftfw/model/fingerprint.hpp"
#include "peftfw/model/loader.hpp"

namespace fs = std::filesystem;
using namespace peftfw;
using peftfw::testing::expect_input_error;

namespace {

fs::path oracle(const std::string& name) { return fs::path(PEFTFW_GRANITE_ORACLE_DIR) / name; }

fs::path scratch(const std::string& name) {
  const fs::path dir = fs::path(PEFTFW_TEST_BINARY_DIR) / "fingerprint" / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_text(const fs::path& file, const std::string& text) { std::ofstream(file) << text; }

// A copy of an oracle checkpoint's config.json and model.safetensors.
fs::path copy_checkpoint(const std::string& from, const std::string& name) {
  const auto dir = scratch(name);
  fs::copy_file(oracle(from) / "config.json", dir / "config.json");
  fs::copy_file(oracle(from) / "model.safetensors", dir / "model.safetensors");
  return dir;
}

ModelSource checkpoint(const fs::path& dir) {
  ModelSource s;
  s.dir = dir;
  return s;
}

// ---- fingerprints ------------------------------------------------------------------------

TEST(BaseFingerprint, RandomInitIsConfigAndSeed) {
  const auto dir = scratch("random");
  write_text(dir / "cfg.json", "{ \"b\": 1,\n  \"a\": [2, \"x\"] }\n");
  ModelSource s;
  s.config_file = dir / "cfg.json";
  s.random_init = true;
  s.seed = 7;
  const auto fp = fingerprint_base(s);
  // sha256('{"a":[2,"x"],"b":1}') and sha256 of the material with seed 7 (hashlib)
  EXPECT_EQ(fp.config_sha256, "bbb8e7667558a86d3622dafcc40ea84605d1835a87b06ee47ea8adac48be8d7a");
  EXPECT_EQ(fp.digest, "sha256:efda3375f58f5fd01f02d1a9ee4c9089c209487eaa8a160fd553617875ac8f45");
  EXPECT_EQ(fp.weights, "random init, seed 7");
  s.seed = 8;
  EXPECT_NE(base_fingerprint(s), fp.digest);
  EXPECT_EQ(fingerprint_base(s).config_sha256, fp.config_sha256);
}

TEST(BaseFingerprint, CheckpointIgnoresWhereItLivesButNotWhatItIs) {
  const auto a = copy_checkpoint("dense_nope", "a");
  const auto b = copy_checkpoint("dense_nope", "b");
  const auto fa = fingerprint_base(checkpoint(a));
  EXPECT_EQ(fa.digest.rfind("sha256:", 0), 0u);
  EXPECT_EQ(fa.digest.size(), 7u + 64u);
  EXPECT_EQ(base_fingerprint(checkpoint(b)), fa.digest);
  EXPECT_NE(fa.weights.find("model.safetensors, "), std::string::npos) << fa.weights;
  EXPECT_NE(base_fingerprint(checkpoint(oracle("dense_rope"))), fa.digest);

  // Whitespace and key order of config.json do not matter; a value does.
  auto cfg = nlohmann::json::parse(std::ifstream(a / "config.json"));
  write_text(b / "config.json", cfg.dump(7));
  EXPECT_EQ(base_fingerprint(checkpoint(b)), fa.digest);
  cfg["rms_norm_eps"] = 1e-3;
  write_text(b / "config.json", cfg.dump());
  const auto fb = fingerprint_base(checkpoint(b));
  EXPECT_NE(fb.digest, fa.digest);
  EXPECT_NE(fb.config_sha256, fa.config_sha256);
  EXPECT_EQ(fb.weights, fa.weights);
}

TEST(BaseFingerprint, HeadersAndSizesCountTensorBytesDoNot) {
  const auto a = copy_checkpoint("dense_nope", "hdr_a");
  const auto fa = fingerprint_base(checkpoint(a));
  auto tensors = io::load_checkpoint_tensors((a / "model.safetensors").string());

  // Another header (one tensor in bf16): same config, other weights.
  const auto other = copy_checkpoint("dense_nope", "hdr_other");
  {
    auto t = tensors;
    t["model.norm.weight"] = t["model.norm.weight"].to(torch::kBFloat16);
    io::save_tensors((other / "model.safetensors").string(), t, {{"format", "pt"}});
  }
  const auto fo = fingerprint_base(checkpoint(other));
  EXPECT_EQ(fo.config_sha256, fa.config_sha256);
  EXPECT_NE(fo.digest, fa.digest);

  // The same file rewritten with only a tensor value changed keeps its header and size.
  const auto v1 = copy_checkpoint("dense_nope", "val_1");
  const auto v2 = copy_checkpoint("dense_nope", "val_2");
  io::save_tensors((v1 / "model.safetensors").string(), tensors, {{"format", "pt"}});
  {
    auto t = tensors;
    t["model.norm.weight"] = t["model.norm.weight"] * 3.0;
    io::save_tensors((v2 / "model.safetensors").string(), t, {{"format", "pt"}});
  }
  EXPECT_EQ(fs::file_size(v1 / "model.safetensors"), fs::file_size(v2 / "model.safetensors"));
  EXPECT_EQ(base_fingerprint(checkpoint(v1)), base_fingerprint(checkpoint(v2)));
}

TEST(BaseFingerprint, NoWeightsNoFingerprint) {
  const auto dir = scratch("none");
  write_text(dir / "cfg.json", "{\"model_type\": \"x\"}");
  ModelSource s;
  s.config_file = dir / "cfg.json";
  expect_input_error([&] { fingerprint_base(s); }, {"nothing to fingerprint"});
}

// ---- PEFT's target_modules rule ----------------------------------------------------------

const std::vector<std::string> kModules = {"model.layers.0.mamba.in_proj",
                                           "model.layers.0.mamba.out_proj",
                                           "model.layers.1.self_attn.q_proj",
                                           "model.layers.1.self_attn.v_proj",
                                           "model.layers.2.mamba.in_proj",
                                           "model.layers.2.mamba.xin_proj",
                                           "lm_head"};

std::set<std::string> selected(const std::string& config_json) {
  return peft_selected_modules(nlohmann::json::parse(config_json), "adapter_config.json", kModules);
}

TEST(PeftTargetRule, ListEntriesMatchWholeNamesOrDotBoundedSuffixes) {
  EXPECT_EQ(
      selected(R"({"target_modules": ["in_proj"]})"),
      (std::set<std::string>{"model.layers.0.mamba.in_proj", "model.layers.2.mamba.in_proj"}));
  EXPECT_EQ(selected(R"({"target_modules": ["mamba.out_proj", "lm_head"]})"),
            (std::set<std::string>{"model.layers.0.mamba.out_proj", "lm_head"}));
  EXPECT_EQ(selected(R"({"target_modules": ["proj"]})"), std::set<std::string>{});
  EXPECT_EQ(selected(R"({"target_modules": ["model.layers.1.self_attn.v_proj"]})"),
            std::set<std::string>{"model.layers.1.self_attn.v_proj"});
}

TEST(PeftTargetRule, StringIsAFullMatchRegex) {
  EXPECT_EQ(selected(R"({"target_modules": "model\\.layers\\.[01]\\..*_proj"})"),
            (std::set<std::string>{"model.layers.0.mamba.in_proj", "model.layers.0.mamba.out_proj",
                                   "model.layers.1.self_attn.q_proj",
                                   "model.layers.1.self_attn.v_proj"}));
  EXPECT_EQ(selected(R"({"target_modules": "in_proj"})"),
            std::set<std::string>{});  // fullmatch, not search
  EXPECT_EQ(selected(R"({"target_modules": "ALL-LINEAR"})").size(),
            kModules.size() - 1);  // all but lm_head
  expect_input_error([] { selected(R"({"target_modules": "(unclosed"})"); },
                     {"adapter_config.json", "'target_modules'", "(unclosed", "not a valid regex"});
}

TEST(PeftTargetRule, LayersToTransformAndPattern) {
  EXPECT_EQ(
      selected(R"({"target_modules": ["in_proj", "q_proj"], "layers_to_transform": [2, 1]})"),
      (std::set<std::string>{"model.layers.1.self_attn.q_proj", "model.layers.2.mamba.in_proj"}));
  EXPECT_EQ(
      selected(
          R"({"target_modules": ["in_proj"], "layers_to_transform": 0, "layers_pattern": "layers"})"),
      std::set<std::string>{"model.layers.0.mamba.in_proj"});
  EXPECT_EQ(
      selected(
          R"({"target_modules": ["in_proj"], "layers_to_transform": 0, "layers_pattern": ["blocks"]})"),
      std::set<std::string>{});
  // An exact name skips the layer filter, as in PEFT.
  EXPECT_EQ(
      selected(
          R"({"target_modules": ["model.layers.2.mamba.in_proj"], "layers_to_transform": [0]})"),
      std::set<std::string>{"model.layers.2.mamba.in_proj"});
  // [] means every layer.
  EXPECT_EQ(selected(R"({"target_modules": ["in_proj"], "layers_to_transform": []})").size(), 2u);
}

TEST(PeftTargetRule, ExcludeModules) {
  EXPECT_EQ(
      selected(R"({"target_modules": ["in_proj"], "exclude_modules": ["layers.2.mamba.in_proj"]})"),
      std::set<std::string>{"model.layers.0.mamba.in_proj"});
  EXPECT_EQ(
      selected(
          R"({"target_modules": ["in_proj", "q_proj"], "exclude_modules": "model\\.layers\\.0\\..*"})"),
      (std::set<std::string>{"model.layers.1.self_attn.q_proj", "model.layers.2.mamba.in_proj"}));
}

TEST(PeftTargetRule, BadShapesAreInputErrors) {
  expect_input_error([] { selected(R"({"r": 8})"); },
                     {"adapter_config.json", "'target_modules' is missing"});
  expect_input_error([] { selected(R"({"target_modules": [1]})"); },
                     {"'target_modules'", "integer 1"});
  expect_input_error([] { selected(R"({"target_modules": ["a"], "layers_to_transform": "0"})"); },
                     {"'layers_to_transform'", "string \"0\""});
}

TEST(CheckTargetModules, AcceptsExactCover) {
  const std::set<std::string> with = {"model.layers.0.mamba.in_proj",
                                      "model.layers.2.mamba.in_proj",
                                      "model.layers.1.self_attn.q_proj"};
  EXPECT_NO_THROW(
      check_target_modules(nlohmann::json::parse(R"({"target_modules": ["in_proj", "q_proj"]})"),
                           "a/adapter_config.json", with, "a/adapter_model.safetensors"));
}

TEST(CheckTargetModules, ModuleWithTensorsNotSelected) {
  const std::set<std::string> with = {"model.layers.0.mamba.in_proj",
                                      "model.layers.0.mamba.out_proj"};
  expect_input_error(
      [&] {
        check_target_modules(nlohmann::json::parse(R"({"target_modules": ["in_proj"]})"),
                             "a/adapter_config.json", with, "a/adapter_model.safetensors");
      },
      {"a/adapter_config.json: key 'target_modules'", "a/adapter_model.safetensors",
       "does not select (1):\n    model.layers.0.mamba.out_proj",
       "[\"mamba.in_proj\", \"mamba.out_proj\"]"});
}

TEST(CheckTargetModules, EntrySelectingNoModuleWithTensors) {
  const std::set<std::string> with = {"model.layers.0.mamba.in_proj"};
  expect_input_error(
      [&] {
        check_target_modules(
            nlohmann::json::parse(R"({"target_modules": ["in_proj", "gate_proj"]})"),
            "a/adapter_config.json", with, "a/adapter_model.safetensors");
      },
      {"'target_modules'", "select no module with tensors (1):\n    \"gate_proj\""});
  expect_input_error(
      [&] {
        check_target_modules(nlohmann::json::parse(R"({"target_modules": "model\\.norm"})"),
                             "a/adapter_config.json", with, "a/adapter_model.safetensors");
      },
      {"regex \"model\\.norm\"", "model.layers.0.mamba.in_proj"});
}

// ---- check_adapter_base ------------------------------------------------------------------

// An adapter folder as peftfw writes it, as far as check_adapter_base reads it.
fs::path adapter_with_manifest(const std::string& name, const nlohmann::json& base_entry) {
  const auto dir = scratch(name);
  write_text(
      dir / "adapter_config.json",
      R"({"peft_type": "LORA", "r": 4, "target_modules": ["in_proj"], "base_model_name_or_path": "cfg-name"})");
  nlohmann::json manifest = {
      {"format", "peftfw-adapter"}, {"format_version", 1}, {"base", base_entry}};
  write_text(dir / "peftfw_manifest.json", manifest.dump(2));
  return dir;
}

// An adapter folder without a manifest (HF PEFT), with tensors for `modules`.
fs::path adapter_without_manifest(const std::string& name, const std::vector<std::string>& modules,
                                  const std::string& target_modules_json) {
  const auto dir = scratch(name);
  write_text(dir / "adapter_config.json",
             R"({"peft_type": "LORA", "r": 2, "target_modules": )" + target_modules_json +
                 R"(, "base_model_name_or_path": "meta-llama/Llama-3.2-1B"})");
  std::map<std::string, torch::Tensor> t;
  for (const auto& m : modules) {
    t["base_model.model." + m + ".lora_A.weight"] = torch::zeros({2, 64});
    t["base_model.model." + m + ".lora_B.weight"] = torch::zeros({64, 2});
  }
  io::save_tensors((dir / "adapter_model.safetensors").string(), t);
  return dir;
}

TEST(CheckAdapterBase, MatchingFingerprintIsSilent) {
  const auto base = checkpoint(oracle("dense_nope"));
  const auto dir = adapter_with_manifest(
      "same", base_manifest_entry(fingerprint_base(base), "/elsewhere/dense"));
  std::ostringstream warn;
  EXPECT_EQ(check_adapter_base(dir, base, /*strict=*/true, warn), BaseMatch::kMatches);
  EXPECT_EQ(warn.str(), "");
}

TEST(CheckAdapterBase, OtherBaseWarnsNamingBothOrRefusesUnderStrict) {
  const auto made = checkpoint(oracle("dense_nope"));
  const auto given = checkpoint(oracle("dense_rope"));
  const auto dir =
      adapter_with_manifest("other", base_manifest_entry(fingerprint_base(made), "my/dense_nope"));
  std::ostringstream warn;
  EXPECT_EQ(check_adapter_base(dir, given, /*strict=*/false, warn), BaseMatch::kMismatch);
  const auto text = warn.str();
  EXPECT_NE(text.find("warning: " + dir.string() + " was made for another base model"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("made for: my/dense_nope"), std::string::npos) << text;
  EXPECT_NE(text.find("given:    " + oracle("dense_rope").string()), std::string::npos) << text;
  EXPECT_NE(text.find("the configs differ"), std::string::npos) << text;
  EXPECT_NE(text.find("--strict"), std::string::npos) << text;
  std::ostringstream quiet;
  expect_input_error([&] { check_adapter_base(dir, given, /*strict=*/true, quiet); },
                     {"made for: my/dense_nope", oracle("dense_rope").string(), "--strict"});
  EXPECT_EQ(quiet.str(), "");
}

TEST(CheckAdapterBase, SameConfigOtherHeadersSaysSo) {
  const auto made = checkpoint(oracle("dense_nope"));
  const auto other = copy_checkpoint("dense_nope", "bf16_base");
  auto t = io::load_checkpoint_tensors((other / "model.safetensors").string());
  for (auto& [k, v] : t) v = v.to(torch::kBFloat16);
  io::save_tensors((other / "model.safetensors").string(), t, {{"format", "pt"}});
  const auto dir =
      adapter_with_manifest("bf16", base_manifest_entry(fingerprint_base(made), "dense_nope"));
  std::ostringstream warn;
  EXPECT_EQ(check_adapter_base(dir, checkpoint(other), false, warn), BaseMatch::kMismatch);
  EXPECT_EQ(warn.str().find("the configs differ"), std::string::npos) << warn.str();
  EXPECT_NE(warn.str().find("the weights differ"), std::string::npos) << warn.str();
}

TEST(CheckAdapterBase, RandomInitBaseWithOtherSeed) {
  ModelSource made;
  made.config_file = oracle("dense_nope") / "config.json";
  made.random_init = true;
  made.seed = 1;
  ModelSource given = made;
  given.seed = 2;
  const auto dir =
      adapter_with_manifest("seed", base_manifest_entry(fingerprint_base(made), "random-init"));
  std::ostringstream warn;
  EXPECT_EQ(check_adapter_base(dir, made, true, warn), BaseMatch::kMatches);
  EXPECT_EQ(check_adapter_base(dir, given, false, warn), BaseMatch::kMismatch);
  EXPECT_NE(warn.str().find("recorded random init, seed 1; given random init, seed 2"),
            std::string::npos)
      << warn.str();
}

TEST(CheckAdapterBase, NoManifestFittingModulesGetsANote) {
  const auto dir =
      adapter_without_manifest("hf_fits", {"model.layers.0.mamba.in_proj"}, R"(["in_proj"])");
  std::ostringstream warn;
  EXPECT_EQ(check_adapter_base(dir, checkpoint(oracle("dense_nope")), /*strict=*/true, warn),
            BaseMatch::kUnverified);
  EXPECT_EQ(warn.str().rfind("note: ", 0), 0u) << warn.str();
  EXPECT_NE(warn.str().find("meta-llama/Llama-3.2-1B"), std::string::npos) << warn.str();
  EXPECT_EQ(warn.str().find("warning"), std::string::npos) << warn.str();
}

TEST(CheckAdapterBase, NoManifestForeignModulesIsAMismatch) {
  const auto dir = adapter_without_manifest(
      "hf_llama", {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"},
      R"(["gate_proj", "up_proj"])");
  const auto base = checkpoint(oracle("dense_nope"));
  std::ostringstream warn;
  EXPECT_EQ(check_adapter_base(dir, base, false, warn), BaseMatch::kMismatch);
  const auto text = warn.str();
  EXPECT_NE(text.find("does not fit the base model given"), std::string::npos) << text;
  EXPECT_NE(text.find("2 module(s) the base does not have"), std::string::npos) << text;
  EXPECT_NE(text.find("model.layers.0.mlp.gate_proj"), std::string::npos) << text;
  EXPECT_NE(text.find("\"up_proj\""), std::string::npos) << text;
  expect_input_error([&] { check_adapter_base(dir, base, true, warn); },
                     {"meta-llama/Llama-3.2-1B", oracle("dense_nope").string(), "gate_proj"});
}

TEST(CheckAdapterBase, CorruptManifestIsNamed) {
  const auto dir = scratch("corrupt");
  write_text(dir / "peftfw_manifest.json", "{\"base\": ");
  std::ostringstream warn;
  expect_input_error(
      [&] { check_adapter_base(dir, checkpoint(oracle("dense_nope")), false, warn); },
      {(dir / "peftfw_manifest.json").string()});
}

}  // namespace
