// Persistence plugin "gguf": the merged model as llama.cpp GGUF files, one per
// [output] gguf_types entry (gguf/model-f16.gguf, ...). The tensor layout and
// hyperparameters come from the architecture plugin (gguf_layout); this file
// adds the general.* keys and the tokenizer (HF tokenizer.json, BPE).
#include <torch/torch.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "gguf_writer.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/model/merge.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/persistence.hpp"
#include "peftfw/plugin/registrar.hpp"
#include "peftfw/plugin/registry.hpp"

namespace fs = std::filesystem;

namespace peftfw::gguf_export {
namespace {

using nlohmann::json;

// llama.cpp's token types
constexpr int32_t kNormal = 1, kControl = 3, kUserDefined = 4, kUnused = 5;

// The GPT-4 (cl100k) split pattern: llama.cpp's "dbrx" pre-tokenizer uses it.
const char* const kCl100kPattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// Which llama.cpp pre-tokenizer matches tokenizer.json's: "gpt-2" for the
// byte-level default, "dbrx" for the cl100k split (Granite), else "default".
std::string pre_tokenizer_name(const json& tok) {
  std::string text = tok.contains("pre_tokenizer") ? tok["pre_tokenizer"].dump() : "";
  if (text.find(json(kCl100kPattern).dump()) != std::string::npos) return "dbrx";
  if (text.find("\"ByteLevel\"") != std::string::npos && text.find("\"use_regex\":true") != std::string::npos)
    return "gpt-2";
  return "default";
}

// The tokenizer's GGUF keys, read once and added to every file.
struct TokenizerKeys {
  std::string pre;
  std::vector<std::string> tokens, merges;
  std::vector<int32_t> types;
  std::vector<std::pair<std::string, uint32_t>> ids;
  bool add_bos = false;

  void add_to(gguf::Writer& w) const {
    w.add_string("tokenizer.ggml.model", "gpt2");
    w.add_string("tokenizer.ggml.pre", pre);
    w.add_array("tokenizer.ggml.tokens", tokens);
    w.add_array("tokenizer.ggml.token_type", types);
    w.add_array("tokenizer.ggml.merges", merges);
    for (const auto& [key, id] : ids) w.add_u32(key, id);
    w.add_bool("tokenizer.ggml.add_bos_token", add_bos);
  }
};

// The tokenizer file llama.cpp needs; throws InputError when it is missing.
fs::path require_tokenizer(const fs::path& dir) {
  const fs::path file = dir / "tokenizer.json";
  if (dir.empty() || !fs::exists(file))
    throw InputError("gguf export needs the model's tokenizer.json (llama.cpp embeds the vocabulary); " +
                     (dir.empty() ? std::string("this model has no checkpoint folder (random init)")
                                  : "none in " + dir.string()) +
                     ". Export [output] formats = [\"merged\"] instead, or train from a checkpoint with a tokenizer.");
  return file;
}

TokenizerKeys read_tokenizer(const fs::path& dir, int64_t vocab_size, const io::JsonConfig& config) {
  const fs::path file = require_tokenizer(dir);
  std::ifstream in(file);
  json tok;
  try {
    tok = json::parse(in);
  } catch (const std::exception& e) {
    throw InputError(file.string() + ": not valid JSON (" + e.what() + ")");
  }
  const auto& model = tok["model"];
  if (model.value("type", "") != "BPE")
    throw InputError(file.string() + ": model.type is \"" + model.value("type", "") +
                     "\"; the gguf export supports BPE tokenizers");
  TokenizerKeys k;
  auto& tokens = k.tokens;
  auto& types = k.types;
  tokens.resize(static_cast<size_t>(vocab_size));
  types.assign(static_cast<size_t>(vocab_size), kUnused);
  auto place = [&](int64_t id, const std::string& text, int32_t type) {
    if (id < 0 || id >= vocab_size)
      throw InputError(file.string() + ": token id " + std::to_string(id) + " (" + text +
                       ") is outside the model's vocab_size " + std::to_string(vocab_size));
    tokens[static_cast<size_t>(id)] = text;
    types[static_cast<size_t>(id)] = type;
  };
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) place(it.value().get<int64_t>(), it.key(), kNormal);
  if (tok.contains("added_tokens"))
    for (const auto& t : tok["added_tokens"])
      place(t["id"].get<int64_t>(), t["content"].get<std::string>(), t.value("special", false) ? kControl : kUserDefined);
  for (size_t i = 0; i < tokens.size(); ++i)  // rows beyond the tokenizer: padding, as the converter names them
    if (types[i] == kUnused) tokens[i] = "[PAD" + std::to_string(i) + "]";
  for (const auto& m : model["merges"])
    k.merges.push_back(m.is_string() ? m.get<std::string>() : m[0].get<std::string>() + " " + m[1].get<std::string>());
  k.pre = pre_tokenizer_name(tok);
  for (const auto& [key, field] : std::vector<std::pair<std::string, std::string>>{
           {"bos_token_id", "tokenizer.ggml.bos_token_id"},
           {"eos_token_id", "tokenizer.ggml.eos_token_id"},
           {"pad_token_id", "tokenizer.ggml.padding_token_id"}}) {
    const int64_t id = config.get_int(key, -1);
    if (id >= 0 && id < vocab_size) k.ids.emplace_back(field, static_cast<uint32_t>(id));
  }
  if (fs::exists(dir / "tokenizer_config.json")) {
    std::ifstream tc(dir / "tokenizer_config.json");
    auto j = json::parse(tc, nullptr, false);
    if (j.is_object() && j.contains("add_bos_token") && j["add_bos_token"].is_boolean()) k.add_bos = j["add_bos_token"];
  }
  return k;
}

uint32_t file_type_code(gguf::TensorType t) {  // llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16
  switch (t) {
    case gguf::TensorType::F32: return 0;
    case gguf::TensorType::F16: return 1;
    case gguf::TensorType::Q8_0: return 7;
    case gguf::TensorType::BF16: return 32;
  }
  return 0;
}

class GgufFormat final : public PersistencePlugin {
 public:
  std::string id() const override { return "gguf"; }

  void preflight(const fs::path& base_model_dir) const override { require_tokenizer(base_model_dir); }
  void check_method(const AdapterMethod& method) const override { refuse_if_weights_cannot_hold(method, id()); }

  void save(const SaveRequest& req, const fs::path& dir) const override {
    TORCH_CHECK(req.model, "gguf save needs a model");
    if (req.config_json.empty()) throw RuntimeError("gguf save needs the model's config.json text");
    const io::JsonConfig config = io::JsonConfig::parse(req.config_json, "config.json");
    const std::string model_type = config.get_string("model_type", "");
    auto arch = PluginRegistry::instance().architecture_for_model_type(model_type);
    auto layout = arch->gguf_layout(config);
    if (!layout)
      throw InputError("the " + arch->id() + " architecture plugin has no GGUF layout; drop \"gguf\" from [output] formats");
    std::vector<gguf::TensorType> types;
    for (const auto& t : req.gguf_types) {
      try {
        types.push_back(gguf::parse_type(t));
      } catch (const std::invalid_argument& e) {
        throw InputError(std::string("[output] gguf_types: ") + e.what());
      }
    }
    const auto tensors = merged_state_dict(*req.model, torch::kFloat32);
    auto hf = [&](const std::string& name) {
      auto it = tensors.find(name);
      if (it == tensors.end()) throw RuntimeError("gguf export: the model has no tensor " + name);
      return it->second;
    };
    const TokenizerKeys tokenizer = read_tokenizer(req.base_model_dir, config.get_int("vocab_size", 0), config);
    write_folder_atomic(dir, [&](const fs::path& tmp) {
      for (const auto type : types) {
        gguf::Writer w;
        w.add_string("general.architecture", layout->arch);
        w.add_string("general.name", req.base_model_name.empty() ? "peftfw export" : req.base_model_name);
        w.add_u32("general.file_type", file_type_code(type));
        if (type == gguf::TensorType::Q8_0) w.add_u32("general.quantization_version", 2);
        for (const auto& v : layout->metadata) {
          switch (v.type) {
            case GgufValue::Type::u32: w.add_u32(v.key, static_cast<uint32_t>(v.number)); break;
            case GgufValue::Type::f32: w.add_f32(v.key, static_cast<float>(v.number)); break;
            case GgufValue::Type::boolean: w.add_bool(v.key, v.number != 0); break;
            case GgufValue::Type::string: w.add_string(v.key, v.text); break;
            case GgufValue::Type::i32_array: w.add_array(v.key, v.integers); break;
          }
        }
        tokenizer.add_to(w);
        for (const auto& t : layout->tensors) {
          // 1-D tensors and the plugin's float32 list stay F32 (as llama.cpp's converter);
          // Q8_0 needs rows of a multiple of 32, else the tensor falls back to F16.
          auto tt = (t.keep_f32 || t.shape.size() <= 1) ? gguf::TensorType::F32 : type;
          if (tt == gguf::TensorType::Q8_0 && t.shape.back() % 32 != 0) tt = gguf::TensorType::F16;
          std::vector<uint64_t> shape(t.shape.begin(), t.shape.end());
          auto make = t.make;
          auto expected = t.shape;
          const std::string name = t.name;
          w.add_tensor(name, shape, tt, [make, hf, expected, name](std::vector<float>& out) {
            auto v = make(hf).to(torch::kFloat32).contiguous();
            if (v.sizes().vec() != expected)
              throw RuntimeError("gguf export: " + name + " came out with the wrong shape");
            out.assign(v.data_ptr<float>(), v.data_ptr<float>() + v.numel());
          });
        }
        std::string lower = gguf::type_name(type);
        for (auto& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
        w.write((tmp / ("model-" + lower + ".gguf")).string());
      }
    });
  }
};

void register_gguf(PluginRegistrar& registrar) { registrar.add_persistence(std::make_shared<GgufFormat>()); }

}  // namespace
}  // namespace peftfw::gguf_export

PEFTFW_DEFINE_PLUGIN("gguf", "persistence", "0.1.0",
                     "llama.cpp GGUF of the merged model (layout from the architecture plugin)",
                     peftfw::gguf_export::register_gguf)
