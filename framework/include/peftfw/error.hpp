// Error types shared by the framework and plugins.
//
// Every user-facing failure is one of these. The CLI maps InputError to exit
// code 2 (bad recipe, bad checkpoint, bad arguments: the user must change
// something) and RuntimeError to exit code 1 (a run failed while working).
// Messages name the file / key / tensor, what was expected, what was found,
// and what to try.
#pragma once

#include <stdexcept>
#include <string>

namespace peftfw {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  virtual int exit_code() const noexcept { return 1; }
};

// The user's input is wrong: recipe, config.json, checkpoint, CLI usage.
class InputError : public Error {
 public:
  using Error::Error;
  int exit_code() const noexcept override { return 2; }
};

// Something failed while running (I/O failure, NaN loss, ...).
class RuntimeError : public Error {
 public:
  using Error::Error;
};

}  // namespace peftfw
