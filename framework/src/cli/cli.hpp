// The `peftfw` command line: shared declarations of the subcommands.
#pragma once

#include <string>
#include <vector>

namespace peftfw::recipe {
class Recipe;
}

namespace peftfw::cli {

using Args = std::vector<std::string>;

// Each returns the process exit code; errors are thrown as peftfw::Error.
int cmd_plugins(const Args& args);
int cmd_schema(const Args& args);
int cmd_validate(const Args& args);
int cmd_plan(const Args& args);
int cmd_run(const Args& args);
int cmd_forward(const Args& args);
int cmd_verify_ssm(const Args& args);
int cmd_data(const Args& args);

// [RECIPE] [section.key=value ...]; no RECIPE means the embedded default (when allowed).
recipe::Recipe load_recipe_args(const Args& args, bool require_file);
int cmd_eval(const Args& args);
int cmd_compare(const Args& args);

// Thrown for a command-line mistake; main prints it with the command's usage.
struct UsageError {
  std::string message;
};

}  // namespace peftfw::cli
