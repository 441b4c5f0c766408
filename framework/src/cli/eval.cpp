// `peftfw eval RECIPE` and `peftfw compare RUN_DIR...`: generate on the run's
// held-out split (split.json, written by the trainer), score with the study's
// metrics, for the base model and the trained adapter, and print the study's table.
#include <torch/torch.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "peftfw/data/batching.hpp"
#include "peftfw/error.hpp"
#include "peftfw/eval/generate.hpp"
#include "peftfw/eval/metrics.hpp"
#include "peftfw/io/safetensors.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/fingerprint.hpp"
#include "peftfw/model/loader.hpp"
#include "peftfw/plugin/persistence.hpp"
#include "peftfw/plugin/registry.hpp"
#include "peftfw/recipe/recipe.hpp"
#include "peftfw/train/data_setup.hpp"

namespace fs = std::filesystem;

namespace peftfw::cli {

namespace {

const char* kEvalHelp = R"(Usage: peftfw eval [RECIPE] [section.key=value ...] [--samples N] [--strict]
  Evaluates the run in the recipe's [output] dir on its held-out examples (split.json, written
  by `peftfw run`): greedy generation (stops at <|end_of_text|> / <|start_of_role|>), the
  [eval] tasks' metrics as the seed study computed them (docs/evaluation.md), eval loss and
  perplexity, for the base model and for the trained adapter (RUN/peft). Writes
  RUN/eval/results.json and prints the table. Base weights or adapter tensors holding NaN/Inf,
  or integers where float weights belong, are refused; an adapter whose recorded base
  (peftfw_manifest.json fingerprint) is not the recipe's model gets a warning.
  --samples N   a seeded sample of N held-out examples (default [eval] samples; 0 = all)
  --strict      refuse (exit 2) an adapter that was made for another base instead of warning
Example:
  peftfw eval my_recipe.toml --samples 32
)";

// Token-weighted eval loss of `model` on already tokenized examples.
double eval_loss(CausalLM& model, const std::vector<data::TokenizedExample>& ex, int64_t pad_id) {
  torch::NoGradGuard ng;
  double total = 0.0;
  int64_t tokens = 0;
  const auto device = model.parameters().front().device();
  for (size_t i = 0; i < ex.size(); i += 8) {
    std::vector<int64_t> idx;
    for (size_t j = i; j < std::min(ex.size(), i + 8); ++j) idx.push_back(static_cast<int64_t>(j));
    auto b = data::pad_batch(ex, idx, pad_id);
    auto t = [&](const std::vector<int64_t>& v) {
      return torch::tensor(v, torch::kLong).view({b.rows, b.cols}).to(device);
    };
    ModelBatch mb;
    mb.input_ids = t(b.input_ids);
    mb.attention_mask = t(b.attention_mask);
    mb.labels = t(b.labels);
    const int64_t n = mb.labels.narrow(1, 1, b.cols - 1).ne(-100).sum().item<int64_t>();
    if (n == 0) continue;
    total += model.forward(mb).loss.item<double>() * static_cast<double>(n);
    tokens += n;
  }
  return tokens ? total / static_cast<double>(tokens) : std::nan("");
}

}  // namespace

int cmd_eval(const Args& all_args) {
  Args args;
  std::optional<int64_t> samples;
  bool strict = false;
  for (size_t i = 0; i < all_args.size(); ++i) {
    if (all_args[i] == "-h" || all_args[i] == "--help") {
      std::cout << kEvalHelp;
      return 0;
    }
    if (all_args[i] == "--samples") {
      if (i + 1 >= all_args.size()) throw UsageError{"--samples needs a value"};
      try {
        samples = std::stoll(all_args[++i]);
      } catch (const std::exception&) {
        throw UsageError{"--samples expects an integer, got '" + all_args[i] + "'"};
      }
      if (*samples < 0) throw UsageError{"--samples must be >= 0"};
    } else if (all_args[i] == "--strict") {
      strict = true;
    } else {
      args.push_back(all_args[i]);
    }
  }
  auto r = load_recipe_args(args, /*require_file=*/false);
  const fs::path run_dir = fs::absolute(r.get_string("output", "dir")).lexically_normal();
  const auto split_path = run_dir / "split.json";
  if (!fs::exists(split_path))
    throw InputError(run_dir.string() + ": no split.json; evaluation uses the held-out examples of a "
                     "trained run, so train first with `peftfw run` (same recipe)");
  auto split = data::read_split(split_path.string());
  auto dataset = train::recipe_dataset(r, std::cerr);
  data::check_split_matches(split, dataset, split_path.string());

  std::vector<eval::Task> tasks;
  for (const auto& t : r.get_strings("eval", "tasks")) tasks.push_back(eval::parse_task(t));
  if (tasks.empty()) {
    const auto synth = r.get_string("data", "synth_task");
    if (synth == "none")
      throw InputError(r.source_name() + ": [eval] tasks is empty; name the tasks to score, e.g. "
                       "tasks = [\"classification\"] (classification, mapping, rules)");
    tasks.push_back(eval::parse_task(synth));
  }

  std::vector<int64_t> indices = split.eval;
  const int64_t n = samples.value_or(r.get_int("eval", "samples"));
  if (n > 0 && n < static_cast<int64_t>(indices.size())) {
    auto perm = data::seeded_permutation(static_cast<int64_t>(indices.size()),
                                         data::derive_seed(static_cast<uint64_t>(r.get_int("data", "split_seed")), 43));
    std::vector<int64_t> pick;
    for (int64_t i = 0; i < n; ++i) pick.push_back(indices[static_cast<size_t>(perm[static_cast<size_t>(i)])]);
    std::sort(pick.begin(), pick.end());
    indices = pick;
  }
  if (indices.empty()) throw InputError(split_path.string() + ": the run has no held-out examples");

  auto source = model_source_from_recipe(r);
  auto tmpl = train::recipe_template(r);
  std::vector<std::string> prompts, expected;
  std::vector<data::Example> chosen;
  for (auto i : indices) {
    const auto& ex = dataset.examples[static_cast<size_t>(i)];
    prompts.push_back(tmpl.render_prompt(ex));
    expected.push_back(data::expected_output(ex));
    chosen.push_back(ex);
  }

  eval::GenerateOptions gen;
  gen.max_new_tokens = r.get_int("eval", "max_new_tokens");
  gen.stop_strings = {"<|end_of_text|>", "<|start_of_role|>"};

  struct Variant {
    std::string name;
    fs::path adapter;
  };
  std::vector<Variant> variants = {{"base", {}}};
  if (fs::exists(run_dir / "peft" / "adapter_config.json")) {
    check_adapter_base(run_dir / "peft", source, strict, std::cerr);
    variants.push_back({"adapted", run_dir / "peft"});
  }

  std::vector<eval::RunScores> runs;
  nlohmann::ordered_json out;
  out["run_dir"] = run_dir.string();
  out["split"] = split_path.string();
  out["examples"] = indices.size();
  out["rows"] = nlohmann::json::array();
  for (const auto& v : variants) {
    auto loaded = load_model(source);
    auto& model = *loaded.model;
    if (!v.adapter.empty()) PluginRegistry::instance().persistence("peft")->load(model, v.adapter);
    model.eval();
    auto tokenizer = train::recipe_tokenizer(r, source, model.inventory().vocab_size);
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::string> predictions;
    for (size_t i = 0; i < prompts.size(); i += 8) {
      std::vector<std::string> batch(prompts.begin() + static_cast<long>(i),
                                     prompts.begin() + static_cast<long>(std::min(prompts.size(), i + 8)));
      auto texts = eval::generate_text(model, *tokenizer, batch, gen);
      predictions.insert(predictions.end(), texts.begin(), texts.end());
      std::cerr << "\reval " << v.name << ": " << predictions.size() << "/" << prompts.size() << std::flush;
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cerr << "\n";
    data::TokenizeOptions to;
    to.eos_id = tokenizer->eos_id();
    to.loss_on = *data::loss_on_from_name(r.get_string("data", "loss_on"));
    auto tokenized = data::tokenize_examples(chosen, tmpl, data::encoder_of(*tokenizer), to);
    data::truncate_examples(tokenized, r.get_int("data", "max_length"));
    const double loss = eval_loss(model, tokenized, tokenizer->pad_id().value_or(0));

    eval::RunScores run{v.name, {}};
    nlohmann::ordered_json row;
    row["run"] = run_dir.filename().string() + "/" + v.name;
    row["metrics"] = nlohmann::ordered_json::object();
    for (auto task : tasks) {
      std::vector<eval::Example> ex;
      for (size_t i = 0; i < predictions.size(); ++i) ex.push_back({predictions[i], expected[i]});
      auto scores = eval::evaluate(task, ex);
      for (const auto& m : scores.metrics) row["metrics"][std::string(eval::task_name(task)) + "." + m.name] = m.value;
      run.tasks.push_back(scores);
    }
    row["metrics"]["eval_loss"] = loss;
    row["metrics"]["perplexity"] = std::exp(loss);
    row["metrics"]["examples_per_s"] = static_cast<double>(predictions.size()) / secs;
    // The adapted row also says what training cost (the run's train_summary.json, if present).
    if (!v.adapter.empty() && fs::exists(run_dir / "train_summary.json")) {
      auto ts = nlohmann::json::parse(io::read_text_file((run_dir / "train_summary.json").string()), nullptr, false);
      if (!ts.is_discarded() && ts.contains("trainable_params") && ts.contains("seconds_per_step")) {
        row["metrics"]["trainable_params"] = ts["trainable_params"].get<double>();
        row["metrics"]["s_per_step"] = ts["seconds_per_step"].get<double>();
      }
    }
    row["predictions"] = predictions;
    out["rows"].push_back(row);
    runs.push_back(run);
  }
  fs::create_directories(run_dir / "eval");
  io::write_file_atomic((run_dir / "eval" / "results.json").string(), out.dump(2) + "\n");
  std::cout << eval::render_table(runs);
  for (const auto& row : out["rows"])
    std::cout << row["run"].get<std::string>() << ": eval loss " << row["metrics"]["eval_loss"].get<double>()
              << ", perplexity " << row["metrics"]["perplexity"].get<double>() << ", "
              << row["metrics"]["examples_per_s"].get<double>() << " examples/s\n";
  std::cout << "results: " << (run_dir / "eval" / "results.json").string() << "\n";
  return 0;
}

int cmd_compare(const Args& args) {
  if (args.empty() || args[0] == "-h" || args[0] == "--help") {
    std::cout << "Usage: peftfw compare RUN_DIR [RUN_DIR ...]\n  The study-style table of every "
                 "run's eval/results.json (rows = run/variant, columns = metrics).\n";
    return args.empty() ? 2 : 0;
  }
  std::vector<std::string> columns;
  std::vector<std::pair<std::string, std::map<std::string, double>>> rows;
  for (const auto& dir : args) {
    const auto file = fs::path(dir) / "eval" / "results.json";
    if (!fs::exists(file)) throw InputError(file.string() + ": not found; run `peftfw eval` on that run first");
    std::ifstream f(file);
    auto j = nlohmann::json::parse(f, nullptr, false);
    if (j.is_discarded() || !j.contains("rows")) throw InputError(file.string() + ": not a peftfw eval result");
    for (const auto& row : j["rows"]) {
      std::map<std::string, double> m;
      for (auto& [k, v] : row["metrics"].items()) {
        if (std::find(columns.begin(), columns.end(), k) == columns.end()) columns.push_back(k);
        m[k] = v.get<double>();
      }
      rows.emplace_back(dir + " " + row["run"].get<std::string>(), m);
    }
  }
  std::cout << "| run |";
  for (const auto& c : columns) std::cout << " " << c << " |";
  std::cout << "\n|---|";
  for (size_t i = 0; i < columns.size(); ++i) std::cout << "---|";
  std::cout << "\n";
  for (const auto& [name, m] : rows) {
    std::cout << "| " << name << " |";
    for (const auto& c : columns) {
      auto it = m.find(c);
      if (it == m.end()) std::cout << " - |";
      else std::cout << " " << eval::python_round(it->second, 2) << " |";
    }
    std::cout << "\n";
  }
  return 0;
}

}  // namespace peftfw::cli
