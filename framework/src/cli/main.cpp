// peftfw: entry point, subcommand dispatch, exit codes.
// Exit codes: 0 success, 1 runtime failure, 2 usage / recipe / input error.
// Messages go to stderr, results to stdout.
#include <torch/version.h>

#include <cstring>
#include <iostream>

#include "cli.hpp"
#include "peftfw/error.hpp"
#include "peftfw/plugin/abi.hpp"

namespace {

const char* kHelp = R"(peftfw - parameter-efficient fine-tuning of hybrid Mamba/Transformer models

Usage: peftfw <command> [arguments]

Commands:
  run [RECIPE] [section.key=value ...]    fine-tune as the recipe says (no RECIPE: the embedded
                                          tiny default)
  plan [RECIPE] [section.key=value ...]   show the model's modules per layer kind, SSM parameter
                                          groups and parameter count, from the config alone
  validate RECIPE [section.key=value ...] check a recipe; reports every error at once
  schema [--markdown]                     every recipe section and key with type, default, doc
  plugins                                 list loaded plugins (and refused plugin files)
  forward --model DIR [--adapter DIR] --ids "1 2 3;4 5" --out FILE [--dtype float32]
                                          write the logits of each sequence (safetensors)
  verify-ssm ADAPTER --base MODEL         check that an adapter's SSM core tensors really changed
  data synth --task T --n N --seed S --out F  generate a dataset in the seed study's formats
  eval [RECIPE] [k=v ...] [--samples N]   score base and adapted model on the run's held-out split
  compare RUN_DIR [RUN_DIR ...]           the study-style table of several runs' eval results

Options:
  -h, --help      this help (also: peftfw <command> --help)
  --version       version, LibTorch version and plugin ABI

Overrides use TOML syntax for the value and are type-checked like the recipe:
  peftfw run my_recipe.toml train.lr=1e-4 'adapter.target_modules=["in_proj"]'

Examples:
  peftfw run                                    # train the embedded tiny default (~1 minute)
  peftfw plan                                   # the embedded tiny default
  peftfw plan my_recipe.toml model.path=/models/my-base
  peftfw validate my_recipe.toml
  peftfw schema --markdown > docs/recipes.md
  peftfw forward --model ./tiny-ckpt --ids "1 2 3;4 5 6" --out logits.safetensors

Plugins are loaded from the plugins/ folder next to this executable and from every folder
in PEFTFW_PLUGIN_PATH (':'-separated).
)";

}  // namespace

int main(int argc, char** argv) {
  using namespace peftfw::cli;
  Args args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
    std::cout << kHelp;
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version") {
    std::cout << "peftfw " << PEFTFW_VERSION << " (LibTorch " << TORCH_VERSION << ", plugin ABI "
              << PEFTFW_PLUGIN_ABI_VERSION << ")\n";
    return 0;
  }
  const std::string command = args[0];
  Args rest(args.begin() + 1, args.end());
  try {
    if (command == "plugins") return cmd_plugins(rest);
    if (command == "schema") return cmd_schema(rest);
    if (command == "validate") return cmd_validate(rest);
    if (command == "plan") return cmd_plan(rest);
    if (command == "run") return cmd_run(rest);
    if (command == "forward") return cmd_forward(rest);
    if (command == "verify-ssm") return cmd_verify_ssm(rest);
    if (command == "data") return cmd_data(rest);
    if (command == "eval") return cmd_eval(rest);
    if (command == "compare") return cmd_compare(rest);
    std::cerr << "peftfw: unknown command '" << command << "'; run `peftfw --help` for the list\n";
    return 2;
  } catch (const UsageError& e) {
    std::cerr << "peftfw " << command << ": " << e.message << "\n(see `peftfw " << command
              << " --help`)\n";
    return 2;
  } catch (const peftfw::Error& e) {
    std::cerr << "peftfw " << command << ": error: " << e.what() << "\n";
    return e.exit_code();
  } catch (const c10::Error& e) {
    std::cerr << "peftfw " << command << ": error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "peftfw " << command << ": error: " << e.what() << "\n";
    return 1;
  }
}
