// `peftfw forward`: logits of given token sequences, for comparing peftfw with
// other implementations.
#include <torch/torch.h>

#include <iostream>
#include <map>
#include <sstream>

#include "cli.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/tensor_bridge.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/fingerprint.hpp"
#include "peftfw/model/loader.hpp"
#include "peftfw/plugin/persistence.hpp"
#include "peftfw/plugin/registry.hpp"

namespace peftfw::cli {

namespace {

const char* kForwardHelp = R"(Usage: peftfw forward --model DIR [--adapter DIR [--strict]] --ids "1 2 3;4 5 6" --out FILE [--dtype float32]
  Runs the model on each ';'-separated token sequence (one at a time, no padding) and writes
  float32 logits as FILE (safetensors): tensor "logits.I" [T_I, vocab] for sequence I.
  Weights or adapter tensors holding NaN/Inf, or integers where float weights belong, are refused.
  --model DIR    HF checkpoint folder (config.json + safetensors)
  --adapter DIR  adapter folder (HF PEFT LoRA/DoRA, with peftfw's SSM tensors if present); its
                 recorded base (peftfw_manifest.json fingerprint) is compared with --model, and a
                 mismatch is a warning
  --strict       refuse (exit 2) an adapter that was made for another base instead of warning
  --dtype D      float32 (default), bfloat16 or float16 compute
Example:
  peftfw forward --model ./tiny --ids "1 2 3;4 5" --out logits.safetensors
)";

std::vector<std::vector<int64_t>> parse_ids(const std::string& text) {
  std::vector<std::vector<int64_t>> seqs;
  std::stringstream all(text);
  std::string part;
  while (std::getline(all, part, ';')) {
    std::stringstream ss(part);
    std::vector<int64_t> ids;
    std::string tok;
    while (ss >> tok) {
      try {
        size_t used = 0;
        ids.push_back(std::stoll(tok, &used));
        if (used != tok.size()) throw std::invalid_argument(tok);
      } catch (const std::exception&) {
        throw UsageError{"--ids: '" + tok + "' is not an integer token id"};
      }
    }
    if (ids.empty()) throw UsageError{"--ids: sequence " + std::to_string(seqs.size()) + " is empty"};
    seqs.push_back(ids);
  }
  if (seqs.empty()) throw UsageError{"--ids: no sequences given"};
  return seqs;
}

}  // namespace

int cmd_forward(const Args& args) {
  std::string model_dir, adapter_dir, ids_text, out, dtype = "float32";
  bool strict = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const auto& a = args[i];
    if (a == "-h" || a == "--help") {
      std::cout << kForwardHelp;
      return 0;
    }
    auto value = [&]() -> std::string {
      if (i + 1 >= args.size()) throw UsageError{a + " needs a value"};
      return args[++i];
    };
    if (a == "--model") model_dir = value();
    else if (a == "--adapter") adapter_dir = value();
    else if (a == "--ids") ids_text = value();
    else if (a == "--out") out = value();
    else if (a == "--dtype") dtype = value();
    else if (a == "--strict") strict = true;
    else throw UsageError{"unknown argument '" + a + "'"};
  }
  if (model_dir.empty() || ids_text.empty() || out.empty())
    throw UsageError{"--model, --ids and --out are required"};
  if (dtype != "float32" && dtype != "bfloat16" && dtype != "float16")
    throw UsageError{"--dtype must be float32, bfloat16 or float16, got '" + dtype + "'"};
  const auto seqs = parse_ids(ids_text);

  ModelSource source;
  source.dir = model_dir;
  source.dtype = dtype;
  if (!adapter_dir.empty()) check_adapter_base(adapter_dir, source, strict, std::cerr);
  auto loaded = load_model(source);
  auto& model = *loaded.model;
  if (!adapter_dir.empty()) {
    auto info = PluginRegistry::instance().persistence("peft")->load(model, adapter_dir);
    std::cerr << "peftfw forward: " << info.method << " adapter on " << info.modules.size()
              << " modules, " << info.ssm_tensors.size() << " SSM tensors from " << adapter_dir << "\n";
  }
  model.eval();
  const int64_t V = model.inventory().vocab_size;
  for (const auto& seq : seqs)
    for (auto id : seq)
      if (id < 0 || id >= V)
        throw InputError("--ids: token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                         std::to_string(V) + ") of " + model_dir);

  torch::NoGradGuard no_grad;
  std::map<std::string, torch::Tensor> tensors;
  for (size_t i = 0; i < seqs.size(); ++i) {
    ModelBatch batch;
    batch.input_ids = torch::tensor(seqs[i], torch::kLong).unsqueeze(0);
    auto logits = model.forward(batch).logits;
    tensors["logits." + std::to_string(i)] = logits.squeeze(0).to(torch::kFloat32).contiguous();
  }
  io::save_tensors(out, tensors, {{"format", "pt"}, {"producer", "peftfw forward"}});
  std::cout << "wrote " << seqs.size() << " sequence(s) of logits to " << out << "\n";
  return 0;
}

}  // namespace peftfw::cli
