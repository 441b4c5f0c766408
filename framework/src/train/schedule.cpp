// Learning-rate schedules (transformers' optimization.py semantics).
#include "peftfw/train/schedule.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace peftfw::train {

double lr_factor(const std::string& schedule, int64_t step, int64_t total, int64_t warmup) {
  if (step < warmup) return static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup));
  if (schedule == "constant") return 1.0;
  const double progress =
      static_cast<double>(step - warmup) / static_cast<double>(std::max<int64_t>(1, total - warmup));
  if (schedule == "linear") return std::max(0.0, 1.0 - progress);
  if (schedule == "cosine") return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
  throw std::logic_error("unknown schedule '" + schedule + "'");
}

int64_t warmup_steps_for(int64_t total, double ratio, int64_t steps) {
  if (steps > 0) return steps;
  return static_cast<int64_t>(std::ceil(static_cast<double>(total) * ratio));
}

}  // namespace peftfw::train
