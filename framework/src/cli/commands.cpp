// `peftfw plugins | schema | validate | plan | run`.
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "peftfw/adapters/setup.hpp"
#include "peftfw/data/synth.hpp"
#include "peftfw/train/trainer.hpp"
#include "peftfw/embedded.hpp"
#include "peftfw/error.hpp"
#include "peftfw/model/loader.hpp"
#include "peftfw/model/report.hpp"
#include "peftfw/plugin/registry.hpp"
#include "peftfw/recipe/recipe.hpp"

namespace peftfw::cli {

namespace {

bool wants_help(const Args& args) {
  for (const auto& a : args)
    if (a == "-h" || a == "--help") return true;
  return false;
}

void print_refused(std::ostream& os) {
  for (const auto& r : PluginRegistry::instance().refused())
    os << "peftfw: warning: plugin file " << r.file.string() << " refused: " << r.reason << "\n";
}

}  // namespace

// [RECIPE] [section.key=value ...]; no RECIPE means the embedded default.
recipe::Recipe load_recipe_args(const Args& args, bool require_file) {
  std::string file;
  std::vector<std::string> overrides;
  for (const auto& a : args) {
    if (!a.empty() && a[0] == '-') throw UsageError{"unknown option '" + a + "'"};
    if (a.find('=') != std::string::npos) {
      overrides.push_back(a);
    } else if (file.empty()) {
      file = a;
    } else {
      throw UsageError{"expected one recipe file, got '" + file + "' and '" + a +
                       "' (overrides look like section.key=value)"};
    }
  }
  if (file.empty()) {
    if (require_file) throw UsageError{"missing RECIPE argument"};
    std::cerr << "peftfw: no recipe given; using the embedded default "
              << embedded::kDefaultRecipeName << "\n";
    return recipe::Recipe::from_string(embedded::kDefaultRecipe, embedded::kDefaultRecipeName,
                                       std::filesystem::current_path(), overrides,
                                       PluginRegistry::instance().recipe_schema());
  }
  return recipe::Recipe::load(file, overrides, PluginRegistry::instance().recipe_schema());
}


int cmd_plugins(const Args& args) {
  if (wants_help(args)) {
    std::cout << "Usage: peftfw plugins\n  Lists every loaded plugin (id, kind, version, file) and "
                 "every refused plugin file with the reason.\n";
    return 0;
  }
  if (!args.empty()) throw UsageError{"takes no arguments"};
  auto& reg = PluginRegistry::instance();
  std::cout << "Plugin folders searched:\n";
  for (const auto& f : default_plugin_folders()) std::cout << "  " << f.string() << "\n";
  std::cout << "\nLoaded plugins:\n";
  if (reg.loaded().empty()) std::cout << "  (none)\n";
  for (const auto& p : reg.loaded())
    std::cout << "  " << p.id << "  kind=" << p.kind << "  version=" << p.version
              << "  file=" << p.file.string() << "\n      " << p.description << "\n";
  if (!reg.refused().empty()) {
    std::cout << "\nRefused plugin files:\n";
    for (const auto& r : reg.refused())
      std::cout << "  " << r.file.string() << "\n      " << r.reason << "\n";
  }
  return 0;
}

int cmd_schema(const Args& args) {
  if (wants_help(args)) {
    std::cout << "Usage: peftfw schema [--markdown]\n  Prints every recipe section and key with "
                 "type, default and doc (--markdown: the text of docs/recipes.md).\n";
    return 0;
  }
  bool markdown = false;
  for (const auto& a : args) {
    if (a == "--markdown") markdown = true;
    else throw UsageError{"unknown argument '" + a + "'"};
  }
  const auto& schema = PluginRegistry::instance().recipe_schema();
  std::cout << (markdown ? recipe::schema_to_markdown(schema) : recipe::schema_to_text(schema));
  return 0;
}

int cmd_validate(const Args& args) {
  if (wants_help(args)) {
    std::cout << "Usage: peftfw validate RECIPE [section.key=value ...]\n  Checks the recipe "
                 "against the schema and reports every error as file:line:col.\n  Example: "
                 "peftfw validate my_recipe.toml train.lr=1e-4\n";
    return 0;
  }
  auto recipe = load_recipe_args(args, /*require_file=*/true);
  std::cout << recipe.source_name() << ": OK\n";
  return 0;
}

int cmd_plan(const Args& args) {
  if (wants_help(args)) {
    std::cout << "Usage: peftfw plan [RECIPE] [section.key=value ...]\n  Reads only the model "
                 "config (no weights) and prints the module inventory per layer kind,\n  the SSM "
                 "core parameter groups and the total parameter count.\n  Example: peftfw plan "
                 "my_recipe.toml model.path=/models/my-base\n";
    return 0;
  }
  auto recipe = load_recipe_args(args, /*require_file=*/false);
  print_refused(std::cerr);
  auto source = model_source_from_recipe(recipe);
  auto config = read_model_config(source);
  auto arch = find_architecture(config, source.architecture);
  auto inventory = arch->describe(config);
  std::cout << "Recipe: " << recipe.source_name() << "\nConfig: " << config.path() << "\n\n"
            << inventory_report(inventory);
  auto request = adapter_request_from_recipe(recipe);
  auto plan = plan_adapters(inventory, request);
  for (const auto& w : plan.warnings) std::cerr << "peftfw plan: warning: " << w << "\n";
  std::cout << "\nAdapter: " << request.spec.method;
  if (!plan.label.settings.empty()) std::cout << " (" << plan.label.name << " " << plan.label.settings << ")";
  std::cout << "\n" << plan.coverage;
  if (!plan.ssm_tensors.empty())
    std::cout << "SSM co-training: " << plan.ssm_tensors.size()
              << " tensors in float32 master copies\n";
  std::cout << plan.report;
  return 0;
}

int cmd_run(const Args& args) {
  if (wants_help(args)) {
    std::cout << R"(Usage: peftfw run [RECIPE] [section.key=value ...] [--strict]
  Fine-tunes as the recipe says; with no RECIPE, the embedded tiny default
  (a small random-init hybrid on generated data).
  Everything goes into [output] dir: resolved recipe, split.json, metrics.jsonl/.csv,
  loss.svg, checkpoints/ and one folder per [output] formats entry.
  An interrupted run (Ctrl-C saves a checkpoint, a kill leaves the last one) continues when
  run again. Every input is checked, and every problem reported, before anything is written.
Options:
  --strict   refuse an [adapter] init_from adapter made for another base (default: warn)
Examples:
  peftfw run
  peftfw run my_recipe.toml model.path=/models/my-base
  peftfw run my_recipe.toml train.max_steps=20 output.dir=/tmp/try
)";
    return 0;
  }
  train::TrainOptions options;
  Args rest;
  for (const auto& a : args) {
    if (a == "--strict") options.strict = true;
    else rest.push_back(a);
  }
  auto recipe = load_recipe_args(rest, /*require_file=*/false);
  print_refused(std::cerr);
  auto summary = train::train(recipe, options);
  std::cout << "run folder: " << summary.run_dir.string() << "\n";
  if (summary.first_eval_loss && summary.final_eval_loss)
    std::cout << "eval loss: " << *summary.first_eval_loss << " -> " << *summary.final_eval_loss
              << (summary.best_eval_loss ? " (best " + std::to_string(*summary.best_eval_loss) + " at step " +
                                               std::to_string(summary.best_step) + ")"
                                         : "")
              << "\n";
  return summary.interrupted ? 130 : 0;
}

int cmd_data(const Args& args) {
  const char* help = R"(Usage: peftfw data synth --task classification|mapping|rules --n N --seed S --out FILE.jsonl
  Generates a dataset in the seed study's format (instruction / input / output JSONL),
  deterministic from the seed. N is at most 1000000.
Example:
  peftfw data synth --task classification --n 2000 --seed 0 --out data/classification.jsonl
)";
  if (args.empty() || wants_help(args)) {
    std::cout << help;
    return args.empty() ? 2 : 0;
  }
  if (args[0] != "synth") throw UsageError{"unknown data subcommand '" + args[0] + "' (expected: synth)"};
  std::string task, out;
  int64_t n = -1, seed = 0;
  for (size_t i = 1; i < args.size(); ++i) {
    auto value = [&]() -> std::string {
      if (i + 1 >= args.size()) throw UsageError{args[i] + " needs a value"};
      return args[++i];
    };
    auto number = [&](const std::string& flag, const std::string& v) {
      try {
        size_t used = 0;
        auto x = std::stoll(v, &used);
        if (used != v.size() || x < 0) throw std::invalid_argument(v);
        return static_cast<int64_t>(x);
      } catch (const std::exception&) {
        throw UsageError{flag + " expects a non-negative integer, got '" + v + "'"};
      }
    };
    if (args[i] == "--task") task = value();
    else if (args[i] == "--n") n = number("--n", value());
    else if (args[i] == "--seed") seed = number("--seed", value());
    else if (args[i] == "--out") out = value();
    else throw UsageError{"unknown argument '" + args[i] + "'"};
  }
  auto kind = data::synth_task_from_name(task);
  if (!kind) throw UsageError{"--task must be classification, mapping or rules, got '" + task + "'"};
  if (n < 1 || out.empty()) throw UsageError{"--n (>= 1) and --out are required"};
  // The examples are generated in memory, about 2.2 KB each (0.4 KB each in the file):
  // 1,000,000 need about 2.2 GB and take 15 s.
  constexpr int64_t kMaxSynthExamples = 1'000'000;
  if (n > kMaxSynthExamples) {
    throw UsageError{"--n " + std::to_string(n) + " is over the limit of " +
                     std::to_string(kMaxSynthExamples) +
                     " examples (they are generated in memory, about 2.2 KB each); for more, "
                     "write several files with different --seed values"};
  }
  data::write_synth_jsonl(out, *kind, n, static_cast<uint64_t>(seed));
  std::cout << "wrote " << n << " " << task << " examples to " << out << "\n";
  return 0;
}

}  // namespace peftfw::cli
