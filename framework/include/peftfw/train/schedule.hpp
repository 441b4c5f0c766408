// Learning-rate schedules, as transformers' get_{cosine,linear,constant}_schedule_with_warmup:
// the optimizer step k (0-based) uses peak_lr * lr_factor(k).
#pragma once

#include <cstdint>
#include <string>

namespace peftfw::train {

double lr_factor(const std::string& schedule, int64_t step, int64_t total_steps, int64_t warmup_steps);

// warmup_steps when > 0, else ceil(total_steps * warmup_ratio) (transformers' rounding).
int64_t warmup_steps_for(int64_t total_steps, double warmup_ratio, int64_t warmup_steps);

}  // namespace peftfw::train
