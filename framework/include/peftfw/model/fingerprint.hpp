// Which base model an adapter belongs to, and whether an adapter folder agrees
// with itself.
//
// Every adapter peftfw writes records a fingerprint of its base in
// peftfw_manifest.json ("base"). For a checkpoint folder the fingerprint hashes
// config.json (canonical JSON: keys sorted, no whitespace) and, per safetensors
// file, its name, size and raw header; never the tensor bytes, so it costs a few
// small reads however large the model. (Two checkpoints that differ only in
// tensor values, with the same dtypes, shapes and layout, get the same
// fingerprint.) A random-init base hashes the config and the init seed.
// `peftfw forward`, `eval` and `verify-ssm` compare it with the base they are
// given (check_adapter_base).
//
// Also here: PEFT's target_modules rule, to check that an adapter_config.json
// selects exactly the modules its adapter_model.safetensors holds tensors for.
#pragma once

#include <filesystem>
#include <iosfwd>
#include <nlohmann/json_fwd.hpp>
#include <set>
#include <string>
#include <vector>

namespace peftfw {

struct ModelSource;

struct BaseFingerprint {
  std::string digest;         // "sha256:<64 hex>" over the parts below
  std::string config_sha256;  // of the canonical config JSON
  std::string weights;  // "checkpoint: model.safetensors, 1,234 bytes" or "random init, seed 7"
};

// The fingerprint of the base `source` describes: its config (read_model_config)
// plus, when source.random_init, the seed, else the safetensors files of
// source.dir (headers and sizes). InputError when there is neither.
BaseFingerprint fingerprint_base(const ModelSource& source);

// fingerprint_base(source).digest.
std::string base_fingerprint(const ModelSource& source);

// The manifest's "base" entry: {"name_or_path", "fingerprint", "config_sha256", "weights"}.
nlohmann::json base_manifest_entry(const BaseFingerprint& fingerprint,
                                   const std::string& name_or_path);

enum class BaseMatch {
  kMatches,     // the recorded fingerprint equals the given base's
  kUnverified,  // nothing recorded to compare (HF PEFT folders); a note was written
  kMismatch,    // a warning was written (strict = false)
};

// Compares what `adapter_dir` records about its base (peftfw_manifest.json's
// fingerprint, adapter_config.json's base_model_name_or_path) with `base`.
// A mismatch is written to `warn` as a warning naming both and returns
// kMismatch, or under `strict` throws InputError. A folder without a recorded
// fingerprint gets a note and kUnverified, unless its modules clearly do not
// fit the base (tensors for modules the base lacks, or target_modules that
// select none of the base's modules): that is a mismatch too. A folder with
// neither adapter_config.json nor a manifest is left to the loader
// (kUnverified, nothing written).
BaseMatch check_adapter_base(const std::filesystem::path& adapter_dir, const ModelSource& base,
                             bool strict, std::ostream& warn);

// The modules of `modules` that adapter_config.json `config` selects under
// PEFT's rule (peft.tuners.tuners_utils.check_target_module_exists, PEFT
// 0.21): target_modules as a string is a regex over the whole name ("all-linear"
// selects every module but lm_head); as a list, an entry selects a module whose
// name equals it or ends with "." + entry, restricted by layers_to_transform /
// layers_pattern; exclude_modules (same two forms) removes modules.
// `config_file` names the file in errors (a bad regex, a wrong type).
std::set<std::string> peft_selected_modules(const nlohmann::json& config,
                                            const std::string& config_file,
                                            const std::vector<std::string>& modules);

// adapter_config.json's target_modules against the modules that have tensors in
// the adapter's safetensors file (`tensor_file`): every such module must be
// selected, and every target_modules entry must select at least one of them.
// InputError naming the file, the key and the modules otherwise.
void check_target_modules(const nlohmann::json& config, const std::string& config_file,
                          const std::set<std::string>& modules_with_tensors,
                          const std::string& tensor_file);

}  // namespace peftfw
