// Checks made before `peftfw run` writes anything: each problem is collected,
// and all of them are reported at once.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "peftfw/model/inventory.hpp"

namespace peftfw::train {

class ProblemList {
 public:
  // Runs `check`; a peftfw::Error it throws is recorded (not rethrown). Returns whether it passed.
  bool check(const std::function<void()>& check);
  void add(std::string problem) { problems_.push_back(std::move(problem)); }
  bool empty() const { return problems_.empty(); }
  // InputError listing every problem (each numbered), when there is any.
  void throw_if_any(const std::string& what) const;

 private:
  std::vector<std::string> problems_;
};

// The bytes a model's parameters take in `dtype`, plus `trainable_extra` float32 trainable
// parameters with their gradient and two AdamW moments, computed without overflow and checked
// against the memory of `device` before anything is allocated. InputError naming the config
// file and the largest tensor when a shape overflows or the model cannot fit.
void check_model_fits(const ModelInventory& inventory, const std::string& dtype, const std::string& device,
                      const std::string& config_path, int64_t trainable_extra = 0);

}  // namespace peftfw::train
