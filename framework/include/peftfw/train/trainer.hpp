// `peftfw run`: the training engine.
//
// One call trains what a recipe describes: builds or loads the model, applies
// the adapter and SSM co-training, reads (or synthesises) and splits the data
// (split.json in the run folder), and runs AdamW with warmup + decay,
// gradient accumulation and clipping. It writes metrics.jsonl/.csv and a loss
// curve (loss.svg), checkpoints every save_every steps (trainable tensors,
// optimizer, data position, RNG) keeping the last K, resumes from the newest
// one, stops on a NaN/Inf loss keeping the last good checkpoint, saves and
// exits on Ctrl-C, and exports through the [output] formats.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

namespace peftfw::recipe {
class Recipe;
}

namespace peftfw::train {

struct TrainSummary {
  std::filesystem::path run_dir;
  int64_t steps = 0;                 // optimizer steps done in total
  bool interrupted = false;          // stopped by Ctrl-C after saving a checkpoint
  std::optional<double> first_eval_loss;
  std::optional<double> final_eval_loss;
  std::optional<double> best_eval_loss;
  int64_t best_step = -1;
};

struct TrainOptions {
  // An [adapter] init_from folder made for another base is refused instead of warned about.
  bool strict = false;
};

TrainSummary train(const recipe::Recipe& recipe, const TrainOptions& options = {});

}  // namespace peftfw::train
