// Where modules create their parameters at construction.
//
// Inside a MetaScope every module built from nn:: and blocks:: parts creates
// meta tensors: shapes without storage. Architecture plugins use it to
// describe a model (names, shapes, parameter count) from its config without
// allocating its weights, so `peftfw plan` works for a 70B config on a laptop.
#pragma once

#include <torch/types.h>

namespace peftfw::nn {

// Options for tensors a module creates in its constructor (CPU, or meta in a MetaScope).
torch::TensorOptions param_options();

class MetaScope {
 public:
  MetaScope();
  ~MetaScope();
  MetaScope(const MetaScope&) = delete;
  MetaScope& operator=(const MetaScope&) = delete;

 private:
  bool previous_;
};

}  // namespace peftfw::nn
