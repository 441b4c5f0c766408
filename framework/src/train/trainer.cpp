// The training engine behind `peftfw run` (see trainer.hpp).
#include "peftfw/train/trainer.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <chrono>
#include <csignal>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "peftfw/adapters/setup.hpp"
#include "peftfw/data/batching.hpp"
#include "peftfw/data/dataset.hpp"
#include "peftfw/data/synth.hpp"
#include "peftfw/data/tokenizer.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/fs.hpp"
#include "peftfw/io/safetensors.hpp"
#include "peftfw/io/tensor_bridge.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/fingerprint.hpp"
#include "peftfw/model/loader.hpp"
#include "peftfw/model/report.hpp"
#include "peftfw/nn/checkpoint.hpp"
#include "peftfw/train/device_memory.hpp"
#include "peftfw/train/optimizer_state.hpp"
#include "peftfw/train/preflight.hpp"
#include "peftfw/train/run_folder.hpp"

#include "peftfw/plugin/persistence.hpp"
#include "peftfw/plugin/registry.hpp"
#include "peftfw/recipe/recipe.hpp"
#include "peftfw/train/metrics.hpp"
#include "peftfw/train/data_setup.hpp"
#include "peftfw/train/schedule.hpp"

namespace fs = std::filesystem;

namespace peftfw::train {

namespace {

std::atomic<bool> g_interrupted{false};

// The CPU generator drives dropout and random init; its state goes into checkpoints.
torch::Tensor cpu_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}
void set_cpu_rng_state(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}
extern "C" void on_sigint(int) { g_interrupted = true; }

// Everything the loop needs about the data.
struct DataSetup {
  std::unique_ptr<data::Tokenizer> tokenizer;
  std::unique_ptr<data::BatchStream> train, eval;
  int64_t accumulation = 1;
  data::DataSplit split;
  bool split_is_new = true;  // split.json still to be written
  std::string summary;       // for the log, once the run starts
};

// Reads, splits and tokenizes the data; writes nothing (split.json is written by the caller
// once every input has been checked).
DataSetup setup_data(const recipe::Recipe& r, const ModelSource& source, int64_t vocab_size,
                     const fs::path& run_dir, bool resuming) {
  DataSetup d;
  d.tokenizer = recipe_tokenizer(r, source, vocab_size);

  std::ostringstream log;
  auto dataset = recipe_dataset(r, log);

  const auto split_path = run_dir / "split.json";
  if (resuming && fs::exists(split_path)) {
    d.split = data::read_split(split_path.string());
    data::check_split_matches(d.split, dataset, split_path.string());
    d.split_is_new = false;
  } else {
    d.split = data::make_split(dataset, r.get_float("data", "eval_fraction"),
                               static_cast<uint64_t>(r.get_int("data", "split_seed")));
  }

  auto tmpl = recipe_template(r);
  data::TokenizeOptions to;
  to.loss_on = *data::loss_on_from_name(r.get_string("data", "loss_on"));
  to.eos_id = d.tokenizer->eos_id();
  auto encode = data::encoder_of(*d.tokenizer);
  auto pick = [&](const std::vector<int64_t>& idx) {
    std::vector<data::Example> out;
    for (auto i : idx) out.push_back(dataset.examples[static_cast<size_t>(i)]);
    return data::tokenize_examples(out, tmpl, encode, to);
  };

  const int64_t batch = r.get_int("train", "batch_size");
  int64_t micro = r.get_int("train", "micro_batch_size");
  if (micro == 0) micro = batch;
  if (batch % micro != 0)
    throw InputError(r.source_name() + ": [train] batch_size (" + std::to_string(batch) +
                     ") must be a multiple of micro_batch_size (" + std::to_string(micro) + ")");
  d.accumulation = batch / micro;
  data::BatchOptions bo;
  bo.batch_size = micro;
  bo.max_length = r.get_int("data", "max_length");
  bo.layout = r.get_bool("data", "packing") ? data::BatchLayout::Packed : data::BatchLayout::Padded;
  bo.pad_id = d.tokenizer->pad_id().value_or(0);
  bo.seed = static_cast<uint64_t>(r.get_int("train", "seed"));
  bo.shuffle = true;
  if (d.split.train.empty()) throw InputError("data: the split left no training examples");
  d.train = std::make_unique<data::BatchStream>(pick(d.split.train), bo);
  if (!d.split.eval.empty()) {
    bo.shuffle = false;
    d.eval = std::make_unique<data::BatchStream>(pick(d.split.eval), bo);
  }
  log << "data: " << dataset.examples.size() << " examples (" << d.split.train.size() << " train, "
      << d.split.eval.size() << " eval), " << (bo.layout == data::BatchLayout::Packed ? "packed" : "padded")
      << " to " << bo.max_length << " tokens, tokenizer " << d.tokenizer->name() << "\n";
  if (const auto t = d.train->truncation().summary(); !t.empty()) log << "data: " << t << "\n";
  d.summary = log.str();
  return d;
}

ModelBatch to_model_batch(const data::Batch& b, const torch::Device& device) {
  auto t = [&](const std::vector<int64_t>& v) {
    return torch::tensor(v, torch::kLong).view({b.rows, b.cols}).to(device);
  };
  ModelBatch m;
  m.input_ids = t(b.input_ids);
  m.attention_mask = t(b.attention_mask);
  m.labels = t(b.labels);
  m.want_logits = false;  // the trainer needs the loss only
  if (!b.seq_ids.empty()) m.seq_ids = t(b.seq_ids);
  return m;
}

// Token-weighted mean loss over the eval stream.
double evaluate(CausalLM& model, const data::BatchStream& eval, const torch::Device& device) {
  torch::NoGradGuard ng;
  model.eval();
  double total = 0.0;
  int64_t tokens = 0;
  for (int64_t i = 0; i < eval.batches_per_epoch(); ++i) {
    auto mb = to_model_batch(eval.batch({0, i}), device);
    auto out = model.forward(mb);
    const int64_t n = mb.labels.narrow(1, 1, mb.labels.size(1) - 1).ne(-100).sum().item<int64_t>();
    if (n == 0) continue;
    total += out.loss.item<double>() * static_cast<double>(n);
    tokens += n;
  }
  model.train();
  return tokens ? total / static_cast<double>(tokens) : std::nan("");
}

std::vector<std::pair<std::string, torch::Tensor>> trainable(CausalLM& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& p : model.named_parameters())
    if (p.value().requires_grad()) out.emplace_back(p.key(), p.value());
  return out;
}

std::map<std::string, torch::Tensor> snapshot(CausalLM& model) {
  std::map<std::string, torch::Tensor> out;
  for (auto& [name, t] : trainable(model)) out[name] = t.detach().to(torch::kCPU).clone();
  return out;
}

void restore(CausalLM& model, const std::map<std::string, torch::Tensor>& values, const std::string& from) {
  torch::NoGradGuard ng;
  auto params = model.named_parameters();
  for (const auto& [name, v] : values) {
    auto* p = params.find(name);
    if (!p || p->sizes() != v.sizes())
      throw InputError(from + ": tensor '" + name + "' does not fit this run's model/adapter; "
                       "was the recipe changed since the checkpoint was written?");
    p->copy_(v);
  }
}

struct RunState {
  int64_t step = 0;  // optimizer steps completed
  data::DataPosition position;
  double best_eval = std::numeric_limits<double>::infinity();
  int64_t best_step = -1;
};

fs::path checkpoint_dir(const fs::path& run_dir, int64_t step) {
  std::ostringstream name;
  name << "step-" << std::setw(8) << std::setfill('0') << step;
  return run_dir / "checkpoints" / name.str();
}

// PEFTFW_TEST_SAVE_DELAY_MS: a pause between the files of a checkpoint, so that the
// crash-consistency test can kill a run in the middle of a checkpoint write.
void test_save_delay() {
  static const char* ms = std::getenv("PEFTFW_TEST_SAVE_DELAY_MS");
  if (ms) std::this_thread::sleep_for(std::chrono::milliseconds(std::atoll(ms)));
}

void save_checkpoint(const fs::path& dir, CausalLM& model, const torch::optim::AdamW& opt, const RunState& s) {
  write_folder_atomic(dir, [&](const fs::path& tmp) {
    io::save_tensors((tmp / "trainable.safetensors").string(), snapshot(model), {{"format", "pt"}});
    test_save_delay();
    save_adamw_state(tmp, opt, trainable(model));
    test_save_delay();
    io::save_tensors((tmp / "rng.safetensors").string(), {{"cpu", cpu_rng_state()}});
    nlohmann::json j = {{"step", s.step},
                        {"epoch", s.position.epoch},
                        {"batch_index", s.position.batch_index},
                        {"best_eval_loss", std::isfinite(s.best_eval) ? nlohmann::json(s.best_eval) : nlohmann::json(nullptr)},
                        {"best_step", s.best_step}};
    io::write_file_atomic((tmp / "state.json").string(), j.dump(2) + "\n");
  });
}

// Reads a checkpoint; a file that is missing or does not parse is named in the InputError.
RunState load_checkpoint(const fs::path& dir, CausalLM& model, torch::optim::AdamW& opt, std::ostream& log) {
  auto damaged = [&](const fs::path& file, const std::string& why) {
    return InputError(file.string() + ": " + why + "; this checkpoint is damaged: delete the folder " +
                      dir.string() + " to resume from the checkpoint before it");
  };
  RunState s;
  const auto state_file = dir / "state.json";
  std::ifstream f(state_file);
  const auto j = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  try {
    if (j.is_discarded()) throw damaged(state_file, "not valid JSON");
    s.step = j.at("step").get<int64_t>();
    s.position = {j.at("epoch").get<int64_t>(), j.at("batch_index").get<int64_t>()};
    if (!j.at("best_eval_loss").is_null()) s.best_eval = j.at("best_eval_loss").get<double>();
    s.best_step = j.at("best_step").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw damaged(state_file, std::string("missing or mistyped field (") + e.what() + ")");
  }
  if (s.step < 0 || s.position.epoch < 0 || s.position.batch_index < 0)
    throw damaged(state_file, "negative step or data position");
  auto tensors = [&](const char* name) {
    try {
      return io::load_checkpoint_tensors((dir / name).string());
    } catch (const Error& e) {
      throw damaged(dir / name, e.what());
    }
  };
  restore(model, tensors("trainable.safetensors"), dir.string());
  load_adamw_state(dir, opt, trainable(model), log);
  auto rng = tensors("rng.safetensors");
  if (!rng.count("cpu") || rng.at("cpu").scalar_type() != torch::kByte)
    throw damaged(dir / "rng.safetensors", "no uint8 tensor 'cpu' (the random generator state)");
  try {
    set_cpu_rng_state(rng.at("cpu"));
  } catch (const c10::Error& e) {
    throw damaged(dir / "rng.safetensors", e.what_without_backtrace());
  }
  return s;
}

// The settings that define what a run trains; resuming with different ones would mix two runs.
std::vector<std::string> training_identity(const recipe::Recipe& r) {
  std::vector<std::string> out;
  for (const auto& section : r.schema().sections) {
    if (section.name != "model" && section.name != "adapter" && section.name != "ssm" &&
        section.name != "data")
      continue;
    for (const auto& key : section.keys) {
      if (section.name == "model" && key.name == "device") continue;  // may move between machines
      std::string value = "(unset)";
      if (r.has_value(section.name, key.name)) {
        using VT = recipe::ValueType;
        switch (key.type) {
          case VT::kString: value = r.get_string(section.name, key.name); break;
          case VT::kPath: value = r.get_path(section.name, key.name).string(); break;
          case VT::kInteger: value = std::to_string(r.get_int(section.name, key.name)); break;
          case VT::kFloat: value = nlohmann::json(r.get_float(section.name, key.name)).dump(); break;
          case VT::kBoolean: value = r.get_bool(section.name, key.name) ? "true" : "false"; break;
          case VT::kStringArray: value = nlohmann::json(r.get_strings(section.name, key.name)).dump(); break;
          case VT::kStringOrArray: {
            auto p = r.get_pattern(section.name, key.name);
            value = p.is_regex ? nlohmann::json(p.regex).dump() : nlohmann::json(p.names).dump();
            break;
          }
          case VT::kTable: value = r.get_table_json(section.name, key.name).dump(); break;
        }
      }
      out.push_back(section.name + "." + key.name + " = " + value);
    }
  }
  return out;
}

// InputError when the run folder was made by a recipe that trains something else.
void check_same_training(const recipe::Recipe& r, const fs::path& run_dir) {
  const auto file = run_dir / "run_identity.json";
  if (!fs::exists(file)) return;
  const auto now = training_identity(r);
  std::ifstream f(file);
  auto before = nlohmann::json::parse(f, nullptr, false);
  if (before.is_discarded() || !before.is_array() ||
      !std::all_of(before.begin(), before.end(), [](const nlohmann::json& v) { return v.is_string(); }))
    throw InputError(file.string() + ": unreadable; cannot tell which recipe made this run folder. "
                     "Use another output.dir, or output.overwrite=true to start over there.");
  std::vector<std::string> old = before.get<std::vector<std::string>>(), diffs;
  for (size_t i = 0; i < std::max(old.size(), now.size()); ++i) {
    const auto a = i < old.size() ? old[i] : std::string("(absent)");
    const auto b = i < now.size() ? now[i] : std::string("(absent)");
    if (a != b) diffs.push_back("was " + a + ", now " + b);
  }
  if (diffs.empty()) return;
  std::string msg = "cannot resume " + run_dir.string() + ": it was made with different settings:";
  for (size_t i = 0; i < diffs.size() && i < 50; ++i) msg += "\n  " + diffs[i];
  if (diffs.size() > 50) msg += "\n  ... and " + std::to_string(diffs.size() - 50) + " more";
  throw InputError(msg + "\nUse another output.dir, or output.overwrite=true to start over there.");
}

// Resident memory of this process (CPU runs), from /proc/self/statm.
int64_t resident_mib() {
  std::ifstream f("/proc/self/statm");
  int64_t pages = 0, resident = 0;
  f >> pages >> resident;
  return resident * ::sysconf(_SC_PAGESIZE) / (1024 * 1024);
}

// The files a run reads, so that clearing its folder can never delete one of them.
std::vector<fs::path> run_inputs(const recipe::Recipe& r) {
  std::vector<fs::path> in;
  for (const auto& f : r.files()) in.emplace_back(f);
  for (const auto& [section, key] : std::vector<std::pair<std::string, std::string>>{
           {"model", "path"}, {"model", "config"}, {"data", "path"}, {"adapter", "init_from"}})
    if (r.has_value(section, key)) in.push_back(r.get_path(section, key));
  const auto tok = r.get_string("data", "tokenizer");
  if (tok != "byte" && tok != "auto") in.emplace_back(tok);
  return in;
}

// Why the training loss became non-finite, from what can be checked after the fact.
std::string nonfinite_loss_cause(CausalLM& model, const ModelBatch& batch, double lr) {
  torch::NoGradGuard ng;
  char lr_text[32];
  std::snprintf(lr_text, sizeof lr_text, "%.3g", lr);
  for (auto& p : model.named_parameters()) {
    const auto bad = torch::logical_not(torch::isfinite(p.value())).sum().item<int64_t>();
    if (bad == 0) continue;
    if (p.value().requires_grad())
      return "The trainable tensor '" + p.key() + "' holds " + std::to_string(bad) +
             " non-finite values: the updates diverged, and the learning rate is the likely cause (lr at "
             "this step: " + lr_text + "); try a lower [train] lr or a smaller max_grad_norm";
    return "The frozen base tensor '" + p.key() + "' holds " + std::to_string(bad) +
           " non-finite values: the weights are the cause; check the checkpoint";
  }
  const auto targets = batch.labels.narrow(1, 1, batch.labels.size(1) - 1).ne(-100).sum().item<int64_t>();
  if (targets == 0)
    return "Every label of this batch is masked (no token to learn from): the inputs are the cause; "
           "check [data] loss_on and max_length (prompts longer than max_length leave no answer tokens)";
  return std::string("Every weight is finite, so the forward pass overflowed: the learning rate (lr at this step: ") +
         lr_text + ") or a 16-bit dtype is the likely cause; try a lower [train] lr, a smaller max_grad_norm, "
         "or [model] dtype = \"float32\"";
}

enum class FolderAction { kFresh, kResume, kStartOver, kOverwrite };


// The adapter's warm-up (AdapterPlugin::warmup_steps, e.g. SDT's): that many optimizer steps of a
// model built for it, from the start of the training data at the run's learning-rate schedule;
// returns what the plugin keeps of it (end_warmup). Writes nothing.
std::map<std::string, torch::Tensor> run_adapter_warmup(const recipe::Recipe& r, const ModelSource& source,
                                                        const AdapterRequest& request, const AdapterPlan& plan,
                                                        const AdapterPlugin& plugin, const data::BatchStream& train,
                                                        int64_t accumulation, int64_t total, int64_t warmup,
                                                        std::ostream& log) {
  const int64_t steps = plugin.warmup_steps(request.spec);
  auto loaded = load_model(source);
  auto& model = *loaded.model;
  apply_adapters(model, request, plan);
  const torch::Device device(source.device);
  std::vector<torch::Tensor> params;
  for (auto& p : model.parameters())
    if (p.requires_grad()) params.push_back(p);
  const double lr = r.get_float("train", "lr"), max_norm = r.get_float("train", "max_grad_norm");
  const auto schedule = r.get_string("train", "schedule");
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(lr)
                                      .betas({r.get_float("train", "adam_beta1"), r.get_float("train", "adam_beta2")})
                                      .eps(r.get_float("train", "adam_eps"))
                                      .weight_decay(r.get_float("train", "weight_decay")));
  torch::manual_seed(static_cast<uint64_t>(r.get_int("train", "seed")));
  model.train();
  log << "warm-up: " << steps << " optimizer steps for [adapter] method = \"" << request.spec.method
      << "\" (then the model restarts from the base)\n";
  data::DataPosition position;
  const int64_t log_every = r.get_int("train", "log_every");
  for (int64_t step = 0; step < steps; ++step) {
    static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[0].options()).lr(lr * lr_factor(schedule, step, total, warmup));
    opt.zero_grad();
    double step_loss = 0;
    for (int64_t a = 0; a < accumulation; ++a) {
      auto batch = train.batch(position);
      position = train.next(position);
      auto out = model.forward(to_model_batch(batch, device));
      const double loss = out.loss.item<double>();
      if (!std::isfinite(loss))
        throw RuntimeError("warm-up step " + std::to_string(step + 1) + " of method '" + request.spec.method +
                           "': the training loss is " + std::to_string(loss) + "; lower [train] lr");
      (out.loss / static_cast<double>(accumulation)).backward();
      step_loss += loss / static_cast<double>(accumulation);
    }
    torch::nn::utils::clip_grad_norm_(params, max_norm > 0 ? max_norm : 1e30);
    opt.step();
    if ((step + 1) % log_every == 0 || step + 1 == steps)
      log << "warm-up step " << step + 1 << "/" << steps << "  loss " << std::fixed << std::setprecision(4)
          << step_loss << std::defaultfloat << "\n";
  }
  return plugin.end_warmup(model, request.spec);
}

}  // namespace

TrainSummary train(const recipe::Recipe& r, const TrainOptions& options) {
  auto& log = std::cerr;
  TrainSummary summary;
  const fs::path run_dir = fs::absolute(r.get_string("output", "dir")).lexically_normal();
  summary.run_dir = run_dir;
  const auto formats = r.get_strings("output", "formats");

  // --- preflight: every input checked and every problem reported at once; nothing written --
  ProblemList problems;
  std::optional<ModelSource> source;
  std::optional<ModelInventory> inventory;
  std::optional<AdapterRequest> request;
  std::optional<AdapterPlan> plan;
  problems.check([&] { source = model_source_from_recipe(r); });
  if (r.get_int("train", "max_steps") == 0)
    problems.check([&] {
      throw InputError(r.where("train", "max_steps").value_or("[train]") +
                       ": [train] max_steps = 0 would run no optimizer step; set -1 to train for [train] "
                       "epochs, or the number of steps to run");
    });
  std::string config_path;
  if (source) {
    problems.check([&] {
      auto config = read_model_config(*source);
      config_path = config.path();
      auto arch = find_architecture(config, source->architecture);
      inventory = arch->describe(config);
    });
    if (!source->random_init) problems.check([&] { io::Checkpoint::open(source->dir.string()); });
  }
  problems.check([&] { request = adapter_request_from_recipe(r); });
  if (inventory && request) problems.check([&] { plan = plan_adapters(*inventory, *request); });
  if (inventory)
    problems.check([&] {
      const int64_t extra = plan ? plan->count.trainable : 0;
      check_model_fits(*inventory, source->dtype, source->device, config_path, extra);
    });
  for (const auto& format : formats)
    problems.check([&] {
      const auto persistence = PluginRegistry::instance().persistence(format);
      persistence->preflight(source ? source->dir : fs::path());
      if (request && request->spec.method != kNoAdapter)
        persistence->check_method(PluginRegistry::instance().adapter_method(request->spec.method));
    });
  problems.check([&] {
    const bool keep_narrow = r.get_string("train", "checkpoint_keep") == "narrow_projections";
    if (keep_narrow && !r.get_bool("train", "grad_checkpointing"))
      throw InputError("[train] checkpoint_keep = \"narrow_projections\" only applies with activation "
                       "checkpointing: set grad_checkpointing = true, or checkpoint_keep = \"none\"");
    if (r.get_float("train", "checkpoint_keep_wide_gib") > 0 && !keep_narrow)
      throw InputError("[train] checkpoint_keep_wide_gib > 0 only applies with checkpoint_keep = "
                       "\"narrow_projections\" (and grad_checkpointing = true): set checkpoint_keep = "
                       "\"narrow_projections\", or checkpoint_keep_wide_gib = 0");
  });
  if (r.has_value("adapter", "init_from"))
    problems.check([&] {
      const auto from = r.get_path("adapter", "init_from");
      if (!fs::exists(from / "adapter_model.safetensors"))
        throw InputError("[adapter] init_from: " + (from / "adapter_model.safetensors").string() +
                         " does not exist; give a folder written by the peft export "
                         "(adapter_model.safetensors + adapter_config.json)");
      if (source) check_adapter_base(from, *source, options.strict, log);
    });

  // The run folder: new, resumed, started over (no checkpoint yet), or cleared on request.
  FolderAction action = FolderAction::kFresh;
  RunFolderContents contents;
  problems.check([&] {
    contents = inspect_run_folder(run_dir, formats);
    if (!contents.exists || contents.empty) return;
    const bool overwrite = r.get_bool("output", "overwrite");
    if (contents.is_run && !overwrite && !contents.has_checkpoints) {
      action = FolderAction::kStartOver;
      check_clearable(run_dir, contents, run_inputs(r),
                      "output.dir holds a run that stopped before its first checkpoint, so it starts over");
    } else if (overwrite) {
      action = FolderAction::kOverwrite;
      check_clearable(run_dir, contents, run_inputs(r), "output.overwrite = true");
    } else if (contents.is_run && r.get_string("train", "resume") == "auto") {
      action = FolderAction::kResume;
      check_same_training(r, run_dir);
    } else {
      throw InputError("output folder " + run_dir.string() + " exists and is not empty" +
                       (contents.has_checkpoints ? " (it has checkpoints, but [train] resume = \"never\")"
                                                 : contents.is_run ? "" : " and is not a peftfw run folder") +
                       "; choose another with output.dir=DIR" +
                       (contents.is_run ? ", or set output.overwrite=true to replace it"
                                        : " (output.overwrite=true clears only a folder holding a peftfw run)"));
    }
  });
  const bool resuming = action == FolderAction::kResume;
  std::optional<DataSetup> data_setup;
  if (source && inventory)
    problems.check([&] { data_setup.emplace(setup_data(r, *source, inventory->vocab_size, run_dir, resuming)); });
  problems.throw_if_any(r.source_name());
  auto& d = *data_setup;

  const int64_t micro_per_epoch = d.train->batches_per_epoch();
  const int64_t steps_per_epoch = (micro_per_epoch + d.accumulation - 1) / d.accumulation;
  const int64_t max_steps = r.get_int("train", "max_steps");
  const int64_t total = max_steps > 0 ? max_steps
                                      : std::max<int64_t>(1, static_cast<int64_t>(std::ceil(
                                                                 r.get_float("train", "epochs") *
                                                                 static_cast<double>(steps_per_epoch))));
  const int64_t warmup = warmup_steps_for(total, r.get_float("train", "warmup_ratio"),
                                          r.get_int("train", "warmup_steps"));

  // --- the adapter's warm-up (e.g. SDT's dimension selection): a model of its own, before the
  // real one; its result is kept in the run folder (a resumed run reuses it) -- still nothing written
  std::shared_ptr<AdapterPlugin> adapter_plugin;
  if (request->spec.method != kNoAdapter)
    adapter_plugin = PluginRegistry::instance().adapter_for_method(request->spec.method);
  const auto adapter_state_file = run_dir / "adapter_state.safetensors";
  bool adapter_state_stored = false;
  if (adapter_plugin && resuming && fs::exists(adapter_state_file)) {
    request->spec.state = io::load_checkpoint_tensors(adapter_state_file.string());
    adapter_state_stored = true;
  }
  if (adapter_plugin && r.has_value("adapter", "init_from") && request->spec.state.empty()) {
    const auto from_state = r.get_path("adapter", "init_from") / "method_state.safetensors";
    if (fs::exists(from_state)) request->spec.state = io::load_checkpoint_tensors(from_state.string());
  }
  if (adapter_plugin && adapter_plugin->warmup_steps(request->spec) > 0)
    request->spec.state = run_adapter_warmup(r, *source, *request, *plan, *adapter_plugin, *d.train, d.accumulation,
                                             total, warmup, log);

  // --- model and adapter (still nothing written: a bad checkpoint stops here) ------------------
  auto loaded = load_model(*source);
  const auto base_fingerprint = fingerprint_base(*source);
  auto& model = *loaded.model;
  const auto& inv = model.inventory();
  auto applied = apply_adapters(model, *request, *plan);
  const torch::Device device(source->device);
  if (r.get_bool("train", "grad_checkpointing") && !model.set_gradient_checkpointing(true))
    throw InputError("[train] grad_checkpointing = true: architecture " + inv.architecture +
                     " does not support activation checkpointing; set it to false");
  const bool keep_narrow = r.get_string("train", "checkpoint_keep") == "narrow_projections";
  peftfw::nn::set_keep_policy(keep_narrow ? peftfw::nn::KeepPolicy::kNarrowProjections
                                          : peftfw::nn::KeepPolicy::kNone);
  peftfw::nn::set_wide_keep_budget(static_cast<int64_t>(r.get_float("train", "checkpoint_keep_wide_gib") * 1073741824.0));
  auto params = trainable(model);
  if (params.empty()) throw InputError("nothing to train: the adapter and [ssm] train select no parameters");
  if (r.has_value("adapter", "init_from")) {
    const auto from = r.get_path("adapter", "init_from");
    std::map<std::string, torch::Tensor> start;
    auto take = [&](const fs::path& file, const std::string& prefix) {
      for (auto& [key, t] : io::load_checkpoint_tensors(file.string())) {
        const auto bad = io::count_non_finite(t);
        if (!t.is_floating_point() || bad.nan || bad.inf)
          throw InputError(file.string() + ": tensor '" + key + "' " +
                           (t.is_floating_point() ? "holds " + io::describe_non_finite(bad)
                                                  : "is stored as " + io::dtype_label(t) + ", not a floating-point type") +
                           "; [adapter] init_from needs a finite float adapter (re-export it from a good run)");
        start[key.rfind(prefix, 0) == 0 ? key.substr(prefix.size()) : key] = t;
      }
    };
    take(from / "adapter_model.safetensors", "base_model.model.");
    if (fs::exists(from / "ssm_core_params.safetensors")) take(from / "ssm_core_params.safetensors", "");
    // A method's own tensors (e.g. a learned initial state), as its plugin trains them.
    if (fs::exists(from / "method_tensors.safetensors") && adapter_plugin) {
      std::map<std::string, torch::Tensor> saved;
      std::swap(saved, start);
      take(from / "method_tensors.safetensors", "");
      auto trained = adapter_plugin->trained_from_saved(request->spec, std::move(start));
      start = std::move(saved);
      for (auto& [name, t] : trained) start[name] = t;
    }
    std::set<std::string> names;
    for (auto& [name, t] : params) names.insert(name);
    for (const auto& [name, t] : start)
      if (!names.count(name))
        throw InputError(from.string() + ": tensor '" + name + "' is not trained by this recipe "
                         "([adapter] init_from must match the recipe's adapter, targets and [ssm] train)");
    restore(model, start, from.string());
  }

  // --- optimizer: adapter parameters and SSM tensors in separate groups ----------------------
  std::set<std::string> ssm(plan->ssm_tensors.begin(), plan->ssm_tensors.end());
  std::vector<torch::Tensor> main_params, ssm_params;
  for (auto& [name, t] : params) (ssm.count(name) ? ssm_params : main_params).push_back(t);
  const double lr = r.get_float("train", "lr");
  const double ssm_lr = r.has_value("ssm", "lr") ? r.get_float("ssm", "lr") : lr;
  auto adam = [&](double group_lr, double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(group_lr)
            .betas({r.get_float("train", "adam_beta1"), r.get_float("train", "adam_beta2")})
            .eps(r.get_float("train", "adam_eps"))
            .weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  std::vector<double> peak_lr;
  if (!main_params.empty()) {
    groups.emplace_back(main_params, adam(lr, r.get_float("train", "weight_decay")));
    peak_lr.push_back(lr);
  }
  if (!ssm_params.empty()) {
    groups.emplace_back(ssm_params, adam(ssm_lr, r.get_float("ssm", "weight_decay")));
    peak_lr.push_back(ssm_lr);
  }
  torch::optim::AdamW optimizer(groups, torch::optim::AdamWOptions(lr));

  const auto schedule = r.get_string("train", "schedule");
  const int64_t eval_every = r.get_int("train", "eval_every"), save_every = r.get_int("train", "save_every"),
                keep_last = r.get_int("train", "keep_last"), log_every = r.get_int("train", "log_every");
  const double max_norm = r.get_float("train", "max_grad_norm");

  RunState state;
  torch::manual_seed(static_cast<uint64_t>(r.get_int("train", "seed")));
  fs::path last_good;
  if (resuming) {
    last_good = list_checkpoints(run_dir).back();
    state = load_checkpoint(last_good, model, optimizer, log);
  }

  // --- the run folder: every input is good, so it is now made (or cleared) and written -------
  RunFolderLock lock(run_dir, formats);
  if (action == FolderAction::kOverwrite || action == FolderAction::kStartOver) {
    log << "output: " << (action == FolderAction::kOverwrite ? "overwrite = true" : "no checkpoint yet")
        << ": clearing what peftfw made in " << run_dir.string() << "\n";
    clear_run_folder(contents);
  }
  for (const auto& note : remove_stale_temporaries(run_dir)) log << "output: " << note << " (left by a killed run)\n";
  if (!request->spec.state.empty() && !adapter_state_stored) {
    fs::create_directories(run_dir);
    io::save_tensors(adapter_state_file.string(), request->spec.state,
                     {{"format", "pt"}, {"producer", "peftfw"}, {"method", request->spec.method}});
  }

  log << "peftfw run: " << r.source_name() << "\nmodel: " << inv.architecture << " ("
      << inv.layer_kinds.size() << " layers, " << with_commas(inv.total_params()) << " parameters), "
      << source->dtype << " on " << device.str() << (source->random_init ? ", random init" : "") << "\n";
  for (const auto& w : plan->warnings) log << "warning: " << w << "\n";
  if (!plan->coverage.empty()) log << plan->coverage;
  if (!plan->report.empty()) log << plan->report;
  if (!plan->ssm_tensors.empty())
    log << "ssm: co-training " << plan->ssm_tensors.size() << " tensors (float32 master copies)\n";
  if (r.has_value("adapter", "init_from"))
    log << "adapter: starting from " << r.get_path("adapter", "init_from").string() << "\n";
  log << d.summary;
  if (resuming)
    log << "resume: continuing from " << last_good.string() << " (step " << state.step << ", "
        << data::to_string(state.position) << ")\n";

  const bool finished = resuming && state.step >= total;
  const bool exports_present = std::all_of(formats.begin(), formats.end(), [&](const std::string& f) {
    return fs::is_directory(run_dir / f);
  });
  if (finished && exports_present) {
    log << "nothing left to do: " << run_dir.string() << " finished all " << total
        << " steps and holds its exports\n";
    summary.steps = state.step;
    return summary;
  }
  if (!resuming || !fs::exists(run_dir / "run_identity.json"))
    io::write_file_atomic((run_dir / "run_identity.json").string(), nlohmann::json(training_identity(r)).dump(1) + "\n");
  io::write_file_atomic((run_dir / "recipe.resolved.toml").string(), r.to_toml());
  if (d.split_is_new) data::write_split(d.split, run_dir.string());
  log << "train: " << total << " optimizer steps (" << steps_per_epoch << " per epoch, batch "
      << r.get_int("train", "batch_size") << " = " << d.accumulation << " x "
      << d.train->options().batch_size << "), warmup " << warmup << ", " << schedule << " schedule\n";

  MetricsLog metrics(run_dir, resuming ? state.step : -1);
  std::map<std::string, torch::Tensor> best_snapshot;
  const auto best_file = run_dir / "checkpoints" / "best" / "trainable.safetensors";
  if (resuming && fs::exists(best_file)) best_snapshot = io::load_checkpoint_tensors(best_file.string());
  auto previous_handler = std::signal(SIGINT, on_sigint);
  g_interrupted = false;
  model.train();
  const bool tty = ::isatty(STDERR_FILENO);
  auto t_start = std::chrono::steady_clock::now();
  int64_t tokens_since = 0;
  auto t_since = t_start;

  auto do_eval = [&]() {
    if (!d.eval) return;
    const double loss = evaluate(model, *d.eval, device);
    if (!summary.first_eval_loss) summary.first_eval_loss = loss;
    summary.final_eval_loss = loss;
    metrics.eval(state.step, loss);
    log << (tty ? "\n" : "") << "eval: step " << state.step << " loss " << std::fixed << std::setprecision(4)
        << loss << (loss < state.best_eval ? " (best)" : "") << std::defaultfloat << "\n";
    if (loss < state.best_eval) {
      state.best_eval = loss;
      state.best_step = state.step;
      best_snapshot = snapshot(model);
      write_folder_atomic(run_dir / "checkpoints" / "best", [&](const fs::path& tmp) {
        io::save_tensors((tmp / "trainable.safetensors").string(), best_snapshot,
                         {{"format", "pt"}, {"step", std::to_string(state.step)}});
      });
    }
  };
  auto do_save = [&]() {
    const auto dir = checkpoint_dir(run_dir, state.step);
    save_checkpoint(dir, model, optimizer, state);
    last_good = dir;
    if (keep_last > 0) {
      auto all = list_checkpoints(run_dir);
      for (size_t i = 0; i + static_cast<size_t>(keep_last) < all.size(); ++i) io::remove_tree_or_throw(all[i]);
    }
  };
  struct RestoreSignal {
    void (*handler)(int);
    ~RestoreSignal() { std::signal(SIGINT, handler); }
  } restore_signal{previous_handler};

  if (!resuming) do_eval();  // the starting point of the curve
  double step_seconds = 0;   // optimizer steps alone (no eval, no checkpoint), for train_summary.json
  int64_t timed_steps = 0;
  while (state.step < total) {
    const auto step_t0 = std::chrono::steady_clock::now();
    for (size_t g = 0; g < groups.size(); ++g)
      static_cast<torch::optim::AdamWOptions&>(optimizer.param_groups()[g].options())
          .lr(peak_lr[g] * lr_factor(schedule, state.step, total, warmup));
    optimizer.zero_grad();
    // PEFTFW_PROFILE_TRACE=FILE: a Kineto (chrome://tracing) trace of one optimizer step,
    // PEFTFW_PROFILE_STEP (default 3); bench/profile_summary.py sums it by kernel.
    static const char* profile_trace = std::getenv("PEFTFW_PROFILE_TRACE");
    static const int64_t profile_step =
        profile_trace ? std::atoll(std::getenv("PEFTFW_PROFILE_STEP") ? std::getenv("PEFTFW_PROFILE_STEP") : "3") : -1;
    if (state.step + 1 == profile_step) train::start_trace(device);
    double step_loss = 0.0;
    for (int64_t a = 0; a < d.accumulation; ++a) {
      auto batch = d.train->batch(state.position);
      state.position = d.train->next(state.position);
      auto mb = to_model_batch(batch, device);
      auto out = model.forward(mb);
      const double loss_value = out.loss.item<double>();
      if (!std::isfinite(loss_value)) {
        const double cur = peak_lr[0] * lr_factor(schedule, state.step, total, warmup);
        throw RuntimeError("step " + std::to_string(state.step + 1) + ": the training loss is " +
                           std::to_string(loss_value) + "; stopping. " + nonfinite_loss_cause(model, mb, cur) +
                           ". " +
                           (last_good.empty() ? std::string("No checkpoint was written yet.")
                                              : "The last good checkpoint is " + last_good.string() + "."));
      }
      (out.loss / static_cast<double>(d.accumulation)).backward();
      step_loss += loss_value / static_cast<double>(d.accumulation);
      tokens_since += batch.tokens;
    }
    std::vector<torch::Tensor> grads_of;
    for (auto& [n, t] : params) grads_of.push_back(t);
    const double grad_norm = max_norm > 0 ? torch::nn::utils::clip_grad_norm_(grads_of, max_norm)
                                          : torch::nn::utils::clip_grad_norm_(grads_of, 1e30);
    optimizer.step();
    if (device.is_cuda()) torch::cuda::synchronize();  // so the step's time is its own
    step_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - step_t0).count();
    ++timed_steps;
    ++state.step;
    if (state.step == profile_step) {
      train::save_trace(profile_trace);
      log << "profile: step " << state.step << " -> " << profile_trace << "\n";
    }
    const double cur_lr = peak_lr[0] * lr_factor(schedule, state.step - 1, total, warmup);
    auto now = std::chrono::steady_clock::now();
    const double secs = std::chrono::duration<double>(now - t_since).count();
    const double tps = secs > 0 ? static_cast<double>(tokens_since) / secs : 0.0;
    const double gpu_peak = train::gpu_peak_gib(device);
    metrics.step(state.step, state.position.epoch, step_loss, cur_lr, grad_norm, tps, gpu_peak);
    if (state.step % log_every == 0 || state.step == total || tty) {
      const double elapsed = std::chrono::duration<double>(now - t_start).count();
      const double eta = elapsed / static_cast<double>(state.step) * static_cast<double>(total - state.step);
      std::ostringstream line;
      line << "step " << state.step << "/" << total << "  loss " << std::fixed << std::setprecision(4)
           << step_loss << "  lr " << std::scientific << std::setprecision(2) << cur_lr << std::fixed
           << std::setprecision(0) << "  " << tps << " tok/s  ETA " << eta << "s  host mem "
           << resident_mib() << " MiB";
      if (gpu_peak >= 0) line << std::setprecision(1) << "  GPU peak " << gpu_peak << " GiB";
      if (tty) log << "\r" << line.str() << "   " << std::flush;
      else log << line.str() << "\n";
      tokens_since = 0;
      t_since = now;
    }
    if (eval_every > 0 && state.step % eval_every == 0 && state.step != total) do_eval();
    if (save_every > 0 && state.step % save_every == 0 && state.step != total) do_save();
    if (g_interrupted) {
      do_save();
      log << (tty ? "\n" : "") << "interrupted: saved checkpoint " << last_good.string()
          << "; run the same command again to resume\n";
      summary.interrupted = true;
      summary.steps = state.step;
      return summary;
    }
  }
  if (tty) log << "\n";
  if (!finished) {
    do_eval();
    do_save();
  }
  if (r.get_bool("train", "load_best") && !best_snapshot.empty() && state.best_step != state.step) {
    restore(model, best_snapshot, (run_dir / "checkpoints" / "best").string());
    log << "best: restored the trainable tensors of step " << state.best_step << " (eval loss "
        << state.best_eval << ")\n";
  }
  metrics.finish();

  // --- exports ----------------------------------------------------------------------------
  SaveRequest save;
  save.model = &model;
  save.adapter = &request->spec;
  save.adapted_modules = applied.adapted_modules;
  save.ssm_tensors = plan->ssm_tensors;
  save.method_tensors = adapter_plugin ? adapter_plugin->saved_tensors(model, request->spec, applied)
                                       : std::map<std::string, torch::Tensor>{};
  save.method_state = request->spec.state;
  save.base_model_dir = source->dir;
  save.base_model_name = source->dir.empty() ? std::string("random-init:") + inv.model_type : source->dir.string();
  save.config_json = loaded.config_json;
  save.base_fingerprint = base_fingerprint;
  save.gguf_types = r.get_strings("output", "gguf_types");
  for (const auto& format : formats) {
    const auto dir = run_dir / format;
    PluginRegistry::instance().persistence(format)->save(save, dir);
    log << "output: " << format << " -> " << dir.string() << "\n";
  }
  // What `peftfw eval` and `compare` report beside the metrics: the trainable count and the time
  // of an optimizer step (this invocation's steps; a resumed run times the steps it ran).
  nlohmann::json train_summary = {{"method", request->spec.method},
                                  {"trainable_params", plan->count.trainable},
                                  {"steps_timed", timed_steps},
                                  {"seconds_per_step", timed_steps > 0 ? step_seconds / static_cast<double>(timed_steps) : 0.0},
                                  {"device", device.str()}};
  io::write_file_atomic((run_dir / "train_summary.json").string(), train_summary.dump(1) + "\n");
  summary.steps = state.step;
  summary.best_eval_loss = std::isfinite(state.best_eval) ? std::optional<double>(state.best_eval) : std::nullopt;
  summary.best_step = state.best_step;
  log << "done: " << state.step << " steps; run folder " << run_dir.string()
      << " (metrics.jsonl, metrics.csv, loss.svg, checkpoints/, split.json, recipe.resolved.toml)\n";
  return summary;
}

}  // namespace peftfw::train
